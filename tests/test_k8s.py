"""k8s/: every overlay renders, every object validates offline, and the manifests agree with
the code they deploy — the real service, the real bento's Dockerfile, the real CLIs.

Rendering uses ``kubectl kustomize`` (or a standalone ``kustomize``). Built-in kinds are
validated strictly (no unknown fields) by kubernetes-validate against Kubernetes 1.30, the
oldest version the manifests target (``lifecycle.preStop.sleep``, ContainerResource HPA
metrics), and against the newest schemas it bundles. CRDs are not in those schemas: the
allow-list ``CRD_SCHEMAS`` holds a minimal schema for each CRD kind used (only
ServiceMonitor); any other kind without a schema fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate as kv
import pytest
import yaml

from service.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
SERVING = sorted(p.relative_to(K8S).as_posix() for p in (K8S / "overlays").iterdir()
                 if (p / "kustomization.yaml").is_file())
TRAINING = "training"
KUBE_VERSIONS = ("1.30.0", kv.latest_version())
BENTO_UID = 1034  # BentoML's generated Dockerfile: user bentoml (checked below, not assumed)

# CRDs: the fields genserve uses, with additionalProperties false so a typo still fails.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SECRET_KEY = {"type": "object", "required": ["name", "key"], "additionalProperties": False,
               "properties": {"name": {"type": "string"}, "key": {"type": "string"}}}
_SECRET_OR_CONFIGMAP = {"type": "object", "additionalProperties": False, "minProperties": 1,
                        "maxProperties": 1,
                        "properties": {"secret": _SECRET_KEY, "configMap": _SECRET_KEY}}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "ServiceMonitor"},
            "metadata": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                               "labels": _LABELS, "annotations": _LABELS},
            },
            "spec": {
                "type": "object", "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object", "additionalProperties": False,
                                 "required": ["matchLabels"],
                                 "properties": {"matchLabels": _LABELS}},
                    "namespaceSelector": {"type": "object"},
                    "endpoints": {
                        "type": "array", "minItems": 1,
                        "items": {
                            "type": "object", "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "scheme": {"enum": ["http", "https"]},
                                "interval": {"type": "string",
                                             "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "scrapeTimeout": {"type": "string",
                                                  "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "tlsConfig": {
                                    "type": "object", "additionalProperties": False,
                                    "properties": {"serverName": {"type": "string"},
                                                   "ca": _SECRET_OR_CONFIGMAP,
                                                   "insecureSkipVerify": {"type": "boolean"}},
                                },
                                "authorization": {
                                    "type": "object", "additionalProperties": False,
                                    "required": ["credentials"],
                                    "properties": {"type": {"type": "string"},
                                                   "credentials": _SECRET_KEY},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


# --- rendering and validation -------------------------------------------------------------


def kustomize(path: Path) -> list[dict]:
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    else:
        pytest.fail("the k8s/ tests render the manifests with `kubectl kustomize` (or a "
                    "standalone `kustomize build`), and neither is on PATH: install kubectl "
                    "(https://kubernetes.io/docs/tasks/tools/, e.g. `apt-get install kubectl` "
                    "from the Kubernetes apt repository, or `snap install kubectl --classic`)",
                    pytrace=False)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stderr}"
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: kustomize(K8S / name) for name in (*SERVING, TRAINING)}


def validate(obj: dict) -> None:
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CRD_SCHEMAS:
        jsonschema.validate(obj, CRD_SCHEMAS[key])
        return
    for version in KUBE_VERSIONS:
        kv.validate(obj, version, strict=True)  # SchemaNotFoundError for unknown kinds


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod: dict, name: str) -> dict:
    (c,) = [c for c in pod["containers"] if c["name"] == name]
    return c


def port_named(c: dict, name: str) -> int:
    (p,) = [p["containerPort"] for p in c.get("ports", []) if p["name"] == name]
    return p


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def arg_value(args: list[str], flag: str) -> str:
    for i, a in enumerate(args):
        if a == flag:
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {args}")


def test_the_overlays_are_cpu_gpu_and_models_volume() -> None:
    assert {"overlays/cpu", "overlays/gpu"} <= set(SERVING)
    assert "overlays/models-volume" in SERVING  # the volume-filled-by-init-container variant


@pytest.mark.parametrize("name", [*SERVING, TRAINING])
def test_overlay_renders_and_every_object_validates_offline(rendered, name: str) -> None:
    objs = rendered[name]
    assert objs
    for obj in objs:
        try:
            validate(obj)
        except (kv.ValidationError, kv.SchemaNotFoundError,
                jsonschema.ValidationError) as err:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata'].get('name')}: {err}")
    kinds = sorted(o["kind"] for o in objs)
    if name == TRAINING:
        assert kinds == ["Job", "NetworkPolicy", "PersistentVolumeClaim", "Service"]
    else:
        volume = ["PersistentVolumeClaim"] if name == "overlays/models-volume" else []
        assert kinds == sorted(["Namespace", "ConfigMap", "Service", "Deployment",
                                "HorizontalPodAutoscaler", "PodDisruptionBudget",
                                "NetworkPolicy", "ServiceMonitor", *volume])
        assert one(objs, "HorizontalPodAutoscaler")["apiVersion"] == "autoscaling/v2"


def test_validation_is_strict_not_vacuous(rendered) -> None:
    deployment = json.loads(json.dumps(one(rendered["overlays/cpu"], "Deployment")))
    container(deployment["spec"]["template"]["spec"], "genserve")["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        validate(deployment)
    monitor = json.loads(json.dumps(one(rendered["overlays/cpu"], "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["paht"] = "/metrics"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)
    with pytest.raises(kv.SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Unlisted", "metadata": {"name": "x"}})


# --- hardening ------------------------------------------------------------------------------


def pod_templates(objs: list[dict]) -> list[tuple[str, dict]]:
    return [(o["kind"], o["spec"]["template"]["spec"]) for o in objs
            if o["kind"] in ("Deployment", "Job")]


@pytest.mark.parametrize("name", [*SERVING, TRAINING])
def test_pods_are_hardened(rendered, name: str) -> None:
    pods = pod_templates(rendered[name])
    assert pods
    for kind, pod in pods:
        assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc.get("privileged") is False
            assert sc["readOnlyRootFilesystem"] is True and sc["runAsNonRoot"] is True
            assert sc["capabilities"] == {"drop": ["ALL"]}
            for kind_ in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind_]), (c["name"], kind_)
        for c in pod["containers"]:  # the root filesystem is read-only: /tmp is a volume
            (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[tmp["name"]] and not tmp.get("readOnly")
        if kind == "Deployment":
            env = {e["name"]: e.get("value") for e in container(pod, "genserve")["env"]}
            assert env["BENTOML_HOME"].startswith("/tmp/")  # BentoML writes under its home


# --- the serving objects fit together -----------------------------------------------------


@pytest.mark.parametrize("name", SERVING)
def test_serving_objects_reference_each_other(rendered, name: str) -> None:
    objs = rendered[name]
    deployment, service = one(objs, "Deployment"), one(objs, "Service")
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    assert selects(service["spec"]["selector"], labels)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert (ports["http"]["port"], ports["grpc"]["port"]) == (3000, 8001)
    http = container(pod, "genserve")
    assert [c["name"] for c in pod["containers"]] == ["genserve"]  # no gRPC sidecar
    assert port_named(http, ports["http"]["targetPort"]) == 3000
    assert port_named(http, ports["grpc"]["targetPort"]) == 8001

    hpa = one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    metrics = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert metrics["ContainerResource"]["containerResource"]["name"] == "cpu"
    assert metrics["ContainerResource"]["containerResource"]["container"] == "genserve"
    assert metrics["Pods"]["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]

    pdb = one(objs, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"], labels)
    policy = one(objs, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert allowed == {"http", "grpc"}
    monitor = one(objs, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= set(ports)

    # the generated, hash-named ConfigMap is the one the container reads
    (ref,) = [e["configMapRef"]["name"] for e in http["envFrom"]]
    assert one(objs, "ConfigMap", ref)
    # volumes the containers mount exist
    names = {v["name"] for v in pod["volumes"]}
    for c in pod.get("initContainers", []) + pod["containers"]:
        assert {m["name"] for m in c.get("volumeMounts", [])} <= names


@pytest.mark.parametrize("name", SERVING)
def test_configmap_holds_valid_service_settings(rendered, name: str) -> None:
    objs = rendered[name]
    data = one(objs, "ConfigMap")["data"]
    fields = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    assert set(data) <= fields, f"not service settings: {sorted(set(data) - fields)}"
    settings = load_settings(data)  # the service's own parser: types and bounds
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    http = container(pod, "genserve")
    gpus = http["resources"]["limits"].get("nvidia.com/gpu")
    image = http["image"]
    if name == "overlays/gpu":
        assert settings.device == "cuda" and gpus == "1"
        assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu"
                                           for t in pod["tolerations"])
        assert image.endswith("-gpu")
    else:
        assert settings.device == "cpu" and gpus is None and "nodeSelector" not in pod
        assert not image.endswith("-gpu")
    if name == "overlays/models-volume":
        (init,) = pod["initContainers"]
        (mount,) = [m for m in http["volumeMounts"] if m["mountPath"] == str(settings.models_dir)]
        volume = {v["name"]: v for v in pod["volumes"]}[mount["name"]]
        claim = one(rendered[name], "PersistentVolumeClaim")
        # one volume shared by every pod: a version copied in once goes live in all of them
        assert mount["readOnly"] and volume["persistentVolumeClaim"]["claimName"] == \
            claim["metadata"]["name"] and claim["spec"]["accessModes"] == ["ReadWriteMany"]
        assert any(m["name"] == mount["name"] for m in init["volumeMounts"])
        assert init["command"][:2] == ["cp", "-Rn"]  # seeds it, keeps versions added since
        assert settings.models_poll_s <= 30
    else:
        assert "initContainers" not in pod


# --- access control and TLS (docs/SECURITY.md) ------------------------------------------------


def _mount_of(c: dict, file: Path) -> dict:
    (mount,) = [m for m in c.get("volumeMounts", []) if Path(m["mountPath"]) == file.parent]
    return mount


@pytest.mark.parametrize("name", SERVING)
def test_keys_and_certificate_come_from_mounted_secrets(rendered, name: str) -> None:
    objs = rendered[name]
    settings = load_settings(one(objs, "ConfigMap")["data"])
    assert settings.api_keys is None  # tokens never sit in a ConfigMap
    assert settings.api_keys_file and settings.metrics_token_file and settings.rate_limit_rps
    assert settings.tls_certfile and settings.tls_keyfile
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    http = container(pod, "genserve")
    secrets: set[tuple[str, str]] = set()
    for file in (settings.api_keys_file, settings.tls_certfile, settings.tls_keyfile,
                 settings.metrics_token_file):
        mount = _mount_of(http, Path(file))
        # a subPath mount would not follow the Secret's updates (no key rotation)
        assert mount.get("readOnly") is True and "subPath" not in mount, file
        secret = volumes[mount["name"]]["secret"]
        assert secret["defaultMode"] & 0o007 == 0  # not world-readable
        secrets.add((secret["secretName"], Path(file).name))
    # Prometheus scrapes over TLS with the metrics token, from the same Secrets
    (endpoint,) = one(objs, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    cred = endpoint["authorization"]["credentials"]
    assert (cred["name"], cred["key"]) in secrets
    assert cred["key"] == Path(settings.metrics_token_file).name
    ca = endpoint["tlsConfig"]["ca"]["secret"]
    assert (ca["name"], ca["key"]) in secrets
    # the plaintext health port is for the kubelet only: not in the Service, not admitted
    service_ports = {p["targetPort"] for p in one(objs, "Service")["spec"]["ports"]}
    policy = one(objs, "NetworkPolicy")
    admitted = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert "grpc-health" not in service_ports | admitted
    assert all("from" not in rule for rule in policy["spec"]["ingress"])  # ports decide
    # every Secret is documented with the command that creates it, with the right keys
    guide = (ROOT / "docs" / "DEPLOY.md").read_text()
    for secret_name, key in sorted(secrets):
        if key in ("tls.crt", "tls.key"):
            assert f"kubectl create secret tls {secret_name} " in guide, secret_name
        else:
            assert re.search(rf"kubectl create secret generic {secret_name} [^\n]*"
                             rf"--from-file={re.escape(key)}=", guide), (secret_name, key)


# --- the manifests agree with the running service ---------------------------------------------


def adapter_rule() -> dict:
    values = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    return rule


def test_probe_and_metrics_paths_answer_on_the_real_service(rendered, server) -> None:
    objs = rendered["overlays/cpu"]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    http = container(pod, "genserve")
    probes = {k: http[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/livez"
    assert probes["readinessProbe"]["path"] == "/readyz"
    # the startup probe waits for the models: it is the readiness path, with a long budget
    assert probes["startupProbe"]["path"] == "/readyz"
    startup = http["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    tls = load_settings(one(objs, "ConfigMap")["data"]).tls_certfile is not None
    for kind, probe in probes.items():
        assert probe["port"] == "http"
        assert probe.get("scheme", "HTTP") == ("HTTPS" if tls else "HTTP"), kind
        status, _ = server.get(probe["path"])
        assert status == 200, f"{kind} {probe['path']} answered {status}"

    # /metrics as Prometheus scrapes it, including the series the autoscaler is fed from
    (endpoint,) = one(objs, "ServiceMonitor")["spec"]["endpoints"]
    assert server.post("/sample", {"model": "moons-nsf", "n": 2, "seed": 0})[0] == 200
    status, body = server.get(endpoint["path"])
    assert status == 200
    text = body.decode()
    rule = adapter_rule()
    metric = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{", rule["seriesQuery"]).group(1)
    assert re.match(rule["name"]["matches"], metric)
    assert re.search(rf'^{metric}\{{[^}}]*endpoint="/sample"', text, re.M), (
        f"{metric} with endpoint=/sample is not on {endpoint['path']}")
    assert "genserve_requests_total" in text
    # the endpoints the adapter counts are the service's verbs
    verbs = re.search(r'endpoint=~"([^"]+)"', rule["metricsQuery"]).group(1).split("|")
    status, raw = server.get("/docs.json")
    assert status == 200
    paths = set(json.loads(raw)["paths"])
    assert set(verbs) <= paths and {"/sample", "/log_likelihood", "/anomaly_score"} <= set(verbs)


def test_http_container_args_are_bentoml_serve_on_the_http_port(rendered) -> None:
    from bentoml_cli.cli import cli

    pod = one(rendered["overlays/cpu"], "Deployment")["spec"]["template"]["spec"]
    http = container(pod, "genserve")
    assert "command" not in http  # the bento image's entrypoint: `serve ...` = bentoml serve
    args = http["args"]
    assert args[0] == "serve"
    params = cli.commands["serve"].make_context("serve", [*args[1:], "/bento"]).params
    assert params["port"] == port_named(http, "http") == 3000
    assert params["host"] == "0.0.0.0"


def test_grpc_health_port_serves_health_in_plaintext_from_the_workers(rendered, tmp_path: Path,
                                                                      ) -> None:
    """The overlay's gRPC settings, on a real server: TLS on the OIP port, and the kubelet's
    gRPC probe answered on the plaintext health-only port by the serving workers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.devserver import reserve_port, running_server

    objs = rendered["overlays/cpu"]
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    genserve = container(pod, "genserve")
    settings = load_settings(one(objs, "ConfigMap")["data"])
    assert settings.grpc and settings.grpc_host == "0.0.0.0"
    assert settings.grpc_port == port_named(genserve, "grpc") == 8001
    assert settings.tls_certfile is not None  # TLS on 8001: probes need the plaintext port
    assert settings.grpc_health_port == port_named(genserve, "grpc-health") != 8001
    with reserve_port() as health:
        port = health.getsockname()[1]
        env = {"GENSERVE_GRPC_HEALTH_PORT": str(port)}
        with running_server(ROOT / "exported_models", tmp_path / "server.log", env=env), \
                grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            # what the kubelet's grpc readiness probe asks (service "")
            status = stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


# --- the image: BentoML's generated Dockerfile, from a real offline build --------------------


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = dict(os.environ, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if not shutil.which("uv", path=env["PATH"]):
        pytest.fail("`bentoml build` offline needs uv beside this Python (the dev extra "
                    "installs it: make install)", pytrace=False)
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", str(ROOT)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (path,) = [p for p in (home / "bentos" / "genserve").iterdir() if p.name != "latest"]
    return path


def _dockerfile_values(text: str) -> dict[str, str]:
    values = {}
    for m in re.finditer(r"^(?:ARG|ENV)\s+([A-Z_]+)=(\S+)$", text, re.M):
        values.setdefault(m.group(1), m.group(2))
    return values


def test_generated_dockerfile_runs_non_root_and_serves_what_the_manifests_expect(
    rendered, bento: Path
) -> None:
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    values = _dockerfile_values(dockerfile)
    users = re.findall(r"^USER\s+(\S+)$", dockerfile, re.M)
    assert users and users[-1] == values["BENTO_USER"] == "bentoml"  # last USER wins
    uid, gid = int(values["BENTO_USER_UID"]), int(values["BENTO_USER_GID"])
    assert uid == BENTO_UID and uid != 0
    exposed = {int(p) for p in re.findall(r"^EXPOSE\s+(\d+)$", dockerfile, re.M)}
    entry = (bento / "env" / "docker" / "entrypoint.sh").read_text()
    assert 'exec bentoml "$@" "$BENTO_PATH"' in entry  # `serve ...` args -> bentoml serve
    bento_path = values["BENTO_PATH"]
    for name in SERVING:
        objs = rendered[name]
        pod = one(objs, "Deployment")["spec"]["template"]["spec"]
        assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (
            uid, gid)
        assert port_named(container(pod, "genserve"), "http") in exposed
        settings = load_settings(one(objs, "ConfigMap")["data"])
        if name != "overlays/models-volume":
            assert str(settings.models_dir) == f"{bento_path}/src/exported_models"
    assert list((bento / "src" / "exported_models").glob("*/manifest.json"))
    # the workers serve gRPC in this image: its packages
    requirements = (bento / "env" / "python" / "requirements.txt").read_text().lower()
    needed = ("grpcio", "grpcio-health-checking", "grpcio-reflection")
    listed = {re.split(r"[<>=!~\[; ]", line.strip())[0] for line in requirements.splitlines()}
    missing = [p for p in needed if p not in listed]
    assert not missing, f"bentofile.yaml python.packages lacks {missing} (gRPC)"


def test_gpu_bentofile_tracks_the_main_bentofile() -> None:
    from bentoml._internal.bento.build_config import BentoBuildConfig

    main = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    gpu_path = K8S / "build" / "bentofile-gpu.yaml"
    gpu = yaml.safe_load(gpu_path.read_text())
    for key in ("service", "include", "exclude", "envs"):
        assert gpu[key] == main[key], key
    assert gpu["docker"]["python_version"] == main["docker"]["python_version"]
    pkgs = {re.split(r"[<>=!~]", p)[0]: p for p in gpu["python"]["packages"]}
    main_pkgs = {re.split(r"[<>=!~]", p)[0]: p for p in main["python"]["packages"]}
    assert "onnxruntime-gpu" in pkgs and "onnxruntime" not in pkgs  # never both
    assert set(main_pkgs) - {"onnxruntime"} <= set(pkgs)
    with open(gpu_path) as fh:  # BentoML's own validation (cuda_version among its supported)
        config = BentoBuildConfig.from_yaml(fh)
    assert config.docker.cuda_version and config.docker.cuda_version.startswith("12.")


def test_other_images_run_non_root_as_their_pods_expect(rendered) -> None:
    job = one(rendered[TRAINING], "Job")["spec"]["template"]["spec"]
    train_df = (K8S / "build" / "train.Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\d+)(?::(\d+))?$", train_df, re.M)[-1]
    assert int(user[0]) == job["securityContext"]["runAsUser"] != 0
    models_df = (K8S / "build" / "models.Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\d+)(?::(\d+))?$", models_df, re.M)[-1]
    pod = one(rendered["overlays/models-volume"], "Deployment")["spec"]["template"]["spec"]
    assert int(user[0]) == pod["securityContext"]["runAsUser"]


# --- multi-node training Job ------------------------------------------------------------------


def test_training_job_runs_torchrun_per_index_and_checkpoints_to_the_volume(rendered) -> None:
    from torch.distributed.run import get_args_parser

    from cli import build_parser

    objs = rendered[TRAINING]
    job = one(objs, "Job")
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (trainer,) = pod["containers"]
    assert trainer["command"] == ["torchrun"]
    env = {e["name"]: e for e in trainer["env"]}
    # $(NODE_RANK) is the pod's completion index
    args = [a.replace("$(NODE_RANK)", "1") for a in trainer["args"]]
    assert "$(NODE_RANK)" in " ".join(trainer["args"])
    assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    run = get_args_parser().parse_args(args)
    assert int(run.nnodes) == spec["completions"] and run.node_rank == 1
    assert run.module and run.training_script == "cli"
    # the rendezvous host is pod 0 through the headless Service named by the pod's subdomain
    service = one(objs, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service["spec"]["selector"], spec["template"]["metadata"]["labels"])
    assert run.master_addr == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert run.master_port in {p["port"] for p in service["spec"]["ports"]}
    # the training command is the real CLI's, and it writes onto the checkpoint volume
    ns = build_parser().parse_args(run.training_script_args)
    assert ns.command == "train"
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in trainer["volumeMounts"]
                if "persistentVolumeClaim" in volumes[m["name"]]]
    assert Path(ns.out).is_relative_to(mount["mountPath"]) and not mount.get("readOnly")
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = one(objs, "PersistentVolumeClaim", claim)
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]  # pods on several nodes mount it
