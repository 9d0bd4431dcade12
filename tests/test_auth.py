"""Access control and transport security (docs/SECURITY.md), against real processes.

One ``genserve serve``, HTTP and gRPC with TLS (a self-signed certificate made here with
``cryptography``), API keys from a file (reloaded every 0.3 s) and a per-key rate limit,
serves every server test of this file. Keys, token buckets and the
access log are also checked as plain objects, fast.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import metric_samples, scrape_metrics
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.access_log import access_logger, log_access
from service.auth import KeyFileError, KeyStore, RateLimiter, parse_keys, security_config
from service.devserver import reserve_port, running_server
from service.grpc import grpc_predict_v2_pb2 as pb
from service.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from service.grpc.server import _status as grpc_status
from service.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
MODEL = "moons-nsf"
TOKENS = {"alice": "alice-0123456789abcdef-token",
          "bob": "bob-0123456789abcdef-token",
          "tight-http": "tight-http-0123456789abcdef",
          "tight-grpc": "tight-grpc-0123456789abcdef"}
CAROL = "carol-0123456789abcdef-token"
METRICS_TOKEN = "metrics-0123456789abcdef-token"
# A value that appears in request payloads only: it must never reach a log.
MARKER = 0.7071067811865
X = np.array([[MARKER, 0.25], [1.0, -0.375]], dtype=np.float32)


def bearer(name_or_token: str) -> str:
    return f"Bearer {TOKENS.get(name_or_token, name_or_token)}"


def write_keys(path: Path, keys: dict) -> None:
    """Replace the key file at once, as Kubernetes updates a mounted Secret."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(keys))
    os.replace(tmp, path)


def key_file_content(names: list[str], extra: dict | None = None) -> dict:
    content: dict = {name: TOKENS[name] for name in names}
    for name in ("tight-http", "tight-grpc"):  # 2 at once, then one every 2 s
        content[name] = {"token": TOKENS[name], "rps": 0.5, "burst": 2}
    return {**content, **(extra or {})}


# --- keys, buckets and logs as plain objects -------------------------------------------------


def test_key_formats_parse_and_bad_keys_say_what_is_wrong() -> None:
    as_json = parse_keys(json.dumps({"alice": TOKENS["alice"],
                                     "bob": {"token": TOKENS["bob"], "rps": 2, "burst": 4}}),
                         "f")
    as_lines = parse_keys(f"# comment\nalice:{TOKENS['alice']}\n\nbob: {TOKENS['bob']}\n", "f")
    inline = parse_keys(f"alice:{TOKENS['alice']},bob:{TOKENS['bob']}", "env")
    for keys in (as_json, as_lines, inline):
        assert [k.name for k in keys] == ["alice", "bob"]
        assert keys[0].digest == hashlib.sha256(TOKENS["alice"].encode()).digest()
    assert (as_json[1].rps, as_json[1].burst) == (2.0, 4)
    bad = {"short": "alice:tooshort", "name": f"al ice:{TOKENS['alice']}",
           "twice": f"alice:{TOKENS['alice']}\nalice:{TOKENS['bob']}",
           "shared": f"alice:{TOKENS['alice']}\nbob:{TOKENS['alice']}",
           "json": '{"alice": ', "field": json.dumps({"alice": {"token": TOKENS["alice"],
                                                               "rate": 1}}),
           "line": TOKENS["alice"]}
    for what, text in bad.items():
        with pytest.raises(KeyFileError) as info:
            parse_keys(text, "keys.txt")
        assert "keys.txt" in str(info.value), what
        assert TOKENS["alice"] not in str(info.value) and "tooshort" not in str(info.value)


def test_only_a_bearer_header_with_a_known_token_authenticates() -> None:
    store = KeyStore(f"alice:{TOKENS['alice']},bob:{TOKENS['bob']}", None)
    assert store.enabled
    assert store.authenticate(bearer("alice")).name == "alice"
    assert store.authenticate(f"bearer  {TOKENS['bob']} ".encode()).name == "bob"
    for header in (None, "", "Bearer", "Bearer ", f"Basic {TOKENS['alice']}",
                   TOKENS["alice"], bearer("wrong-0123456789abcdef"), bearer("alice") + "x"):
        assert store.authenticate(header) is None, header
    assert not KeyStore(None, None).enabled  # no key source: access control off


def test_access_control_and_tls_are_off_by_default() -> None:
    settings = load_settings({})
    assert not KeyStore.from_settings(settings).enabled
    assert not KeyStore.for_metrics(settings).enabled
    assert security_config(settings) == {}
    assert RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst).acquire("x") == 0.0


def test_key_file_reloads_when_it_changes_and_keeps_keys_when_it_breaks(tmp_path: Path) -> None:
    now = [0.0]
    path = tmp_path / "keys"
    path.write_text(f"alice:{TOKENS['alice']}\n")
    store = KeyStore(None, path, reload_s=1.0, clock=lambda: now[0])
    write_keys(path, {"bob": TOKENS["bob"]})
    assert store.authenticate(bearer("alice")) is not None  # not checked again yet
    now[0] = 1.5
    assert store.authenticate(bearer("alice")) is None
    assert store.authenticate(bearer("bob")).name == "bob"
    path.write_text("{ half written")
    now[0] = 3.0
    assert store.authenticate(bearer("bob")).name == "bob"  # the previous keys stay
    with pytest.raises(KeyFileError, match="cannot read the API key file"):
        KeyStore(None, tmp_path / "missing")


def test_token_bucket_limits_bursts_and_refills() -> None:
    now = [0.0]
    limiter = RateLimiter(rps=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # one bucket per key
    now[0] = 0.5
    assert limiter.acquire("a") == 0.0 and limiter.acquire("a") > 0
    key = parse_keys(json.dumps({"k": {"token": TOKENS["alice"], "rps": 0.5, "burst": 1}}),
                     "f")[0]
    assert limiter.acquire("k", key) == 0.0 and limiter.acquire("k", key) == pytest.approx(2.0)
    # two workers: each holds half the rate and half the burst
    per_worker = RateLimiter(rps=4.0, burst=4, workers=2, clock=lambda: now[0])
    assert [per_worker.acquire("a") > 0 for _ in range(3)] == [False, False, True]


def test_any_retry_hint_becomes_grpc_trailing_metadata() -> None:
    for status, code in ((429, grpc.StatusCode.RESOURCE_EXHAUSTED),
                         (503, grpc.StatusCode.UNAVAILABLE)):
        err = grpc_status(status, "later", [(b"retry-after", b"3")])
        assert (err.code, err.message, err.trailers) == (code, "later", (("retry-after", "3"),))
    assert grpc_status(401, "x", []).code == grpc.StatusCode.UNAUTHENTICATED
    assert grpc_status(400, "x", []).trailers == ()
    assert grpc_status(418, "x", []).code == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_status(599, "x", []).code == grpc.StatusCode.INTERNAL


def test_access_log_lines_are_json_and_can_be_turned_off() -> None:
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    fields = {"protocol": "http", "key": 'al"ice', "verb": "sample", "model": MODEL,
              "version": 2, "rows": 3, "status": 200, "latency_s": 0.0125}
    capture = Capture()
    logger = access_logger(False)
    logger.addHandler(capture)
    try:
        log_access(logger, **fields)
        assert lines == []
        logger = access_logger(True)
        before = datetime.now(UTC).replace(microsecond=0)
        log_access(logger, **fields)
        log_access(logger, **fields | {"protocol": "grpc", "key": None, "version": None,
                                       "rows": None, "status": "OK", "latency_s": 2.5e-8})
    finally:
        logger.removeHandler(capture)
    first, second = (json.loads(line) for line in lines)
    assert first == {**{k: v for k, v in fields.items() if k != "latency_s"},
                     "ts": first["ts"], "latency_ms": 12.5}
    assert second["key"] is None and second["rows"] is None and second["status"] == "OK"
    assert second["version"] is None
    assert second["latency_ms"] == 0.0
    ts = datetime.fromisoformat(first["ts"])  # ISO 8601 in UTC, to the millisecond
    assert ts.utcoffset() == timedelta(0)
    assert len(first["ts"]) == len("2026-01-01T00:00:00.000+00:00")
    assert before <= ts <= datetime.now(UTC)


# --- real processes: HTTP and gRPC with TLS, keys and rate limits ----------------------------


def write_self_signed_certificate(key_path: Path, cert_path: Path) -> None:
    """A P-256 key and a one-day self-signed certificate for localhost and 127.0.0.1, PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("secrets")
    write_self_signed_certificate(d / "tls.key", d / "tls.crt")
    write_keys(d / "keys.json", key_file_content(["alice", "bob"]))
    (d / "metrics-token").write_text(METRICS_TOKEN + "\n")
    return d


@pytest.fixture(scope="module")
def secure_env(secrets_dir: Path) -> dict[str, str]:
    return {"GENSERVE_API_KEYS_FILE": str(secrets_dir / "keys.json"),
            "GENSERVE_API_KEYS_RELOAD_S": "0.3",
            "GENSERVE_METRICS_TOKEN_FILE": str(secrets_dir / "metrics-token"),
            "GENSERVE_RATE_LIMIT_RPS": "100",
            "GENSERVE_TLS_CERTFILE": str(secrets_dir / "tls.crt"),
            "GENSERVE_TLS_KEYFILE": str(secrets_dir / "tls.key")}


@pytest.fixture(scope="module")
def model_dir(request: pytest.FixtureRequest) -> Path:
    """A flow model folder: the committed default one when it verifies (exporting to ONNX
    takes minutes on a busy 2-core machine), else the session's tiny exported model."""
    from artifact.manifest import ManifestError, read_manifest

    committed = ROOT / "exported_models" / MODEL
    try:
        read_manifest(committed, verify=True)
        return committed
    except ManifestError:
        return request.getfixturevalue("artifact_factory")("nsf")


@pytest.fixture(scope="module")
def secure_server(model_dir: Path, secure_env: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory):
    models = tmp_path_factory.mktemp("secure-models")
    shutil.copytree(model_dir, models / MODEL)
    log = tmp_path_factory.mktemp("secure-logs") / "server.log"
    with reserve_port() as health:
        env = dict(secure_env, GENSERVE_GRPC_HEALTH_PORT=str(health.getsockname()[1]))
        with running_server(models, log, env=env) as server:
            server.health_address = f"127.0.0.1:{health.getsockname()[1]}"
            yield server


@pytest.fixture(scope="module")
def secure_grpc(secure_server, secrets_dir: Path):
    """The secure server's gRPC edge over TLS; its plaintext health-only port answers the
    kubelet's probe."""
    with grpc.insecure_channel(secure_server.health_address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    credentials = grpc.ssl_channel_credentials((secrets_dir / "tls.crt").read_bytes())
    with grpc.secure_channel(secure_server.grpc_address, credentials) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel), secure_server.grpc_address, \
            secure_server.log


def ll_request(x: np.ndarray = X) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=f"{MODEL}.log_likelihood")
    t = req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    t.contents.fp32_contents.extend(x.reshape(-1).tolist())
    return req


def infer(stub, token: str | None) -> tuple[grpc.StatusCode, str, dict, object]:
    """``(code, details, trailing metadata, response or None)`` of one ModelInfer call."""
    metadata = [("authorization", bearer(token))] if token else []
    try:
        resp, call = stub.ModelInfer.with_call(ll_request(), metadata=metadata, timeout=30)
    except grpc.RpcError as err:
        return err.code(), err.details(), dict(err.trailing_metadata() or ()), None
    return call.code(), "", dict(call.trailing_metadata() or ()), resp


def http_ll(server, token: str | None, x: np.ndarray = X) -> tuple[int, dict, dict]:
    headers = {"Authorization": bearer(token)} if token else {}
    body = json.dumps({"model": MODEL, "x": x.tolist()}).encode()
    status, resp_headers, raw = server.exchange("POST", "/log_likelihood", body, headers)
    return status, resp_headers, json.loads(raw)


def test_http_answers_401_without_a_valid_token_and_200_with_one(secure_server) -> None:
    answers = []
    for headers in ({}, {"Authorization": "Basic YWxpY2U6eA=="}, {"Authorization": "Bearer"},
                    {"Authorization": bearer("wrong-0123456789abcdef")},
                    {"Authorization": TOKENS["alice"]}):
        body = json.dumps({"model": MODEL, "x": X.tolist()}).encode()
        status, resp_headers, raw = secure_server.exchange("POST", "/log_likelihood", body,
                                                           headers)
        assert status == 401 and resp_headers["www-authenticate"].startswith("Bearer")
        answers.append(raw)
    assert len(set(answers)) == 1  # the same words whatever was wrong
    message = json.loads(answers[0])["error"]
    assert "token is required" in message and "alice" not in message and "bob" not in message
    for verb, payload in (("sample", {"model": MODEL, "n": 3, "seed": 1}),
                          ("anomaly_score", {"model": MODEL, "x": X.tolist()})):
        assert secure_server.post(f"/{verb}", payload)[0] == 401
        status, answer = secure_server.post(f"/{verb}", payload,
                                            headers={"Authorization": bearer("bob")})
        assert status == 200, answer
    status, _, answer = http_ll(secure_server, "alice")
    assert status == 200 and len(answer["log_likelihood"]) == len(X)
    # probes and the model list stay open
    for path in ("/livez", "/readyz", "/models"):
        assert secure_server.get(path)[0] == 200, path


def test_metrics_ask_for_their_own_token(secure_server) -> None:
    assert secure_server.get("/metrics")[0] == 401
    assert secure_server.exchange("GET", "/metrics",
                                  headers={"Authorization": bearer("alice")})[0] == 401
    status, _, raw = secure_server.exchange("GET", "/metrics",
                                            headers={"Authorization": bearer(METRICS_TOKEN)})
    assert status == 200
    assert not any(token in raw.decode() for token in (*TOKENS.values(), METRICS_TOKEN))
    counts = metric_samples(
        scrape_metrics(secure_server, headers={"Authorization": bearer(METRICS_TOKEN)}),
        "genserve_key_requests_total")
    keys = [dict(labels) for labels, value in counts.items() if value >= 1]
    assert {"key": "alice", "status": "200", "verb": "log_likelihood"} in keys, keys
    assert any(k["key"] == "none" and k["status"] == "401" for k in keys), keys


def test_the_repository_api_asks_for_the_admin_token(secure_server, secure_grpc) -> None:
    path = f"/models/{MODEL}/load"
    for headers in ({}, {"Authorization": bearer("alice")}):  # an API key is not the admin's
        status, answer = secure_server.post(path, {}, headers=headers)
        assert status == 401 and "token" in answer["error"], answer
    status, answer = secure_server.post(path, {}, headers={"Authorization": bearer(
        METRICS_TOKEN)})
    assert status == 200 and answer["version"] == 1, answer
    assert answer["versions"] == [{"version": 1, "state": "ready", "reason": None}]
    stub, _, _ = secure_grpc
    request = pb.RepositoryModelLoadRequest(model_name=MODEL)
    with pytest.raises(grpc.RpcError) as err:
        stub.RepositoryModelLoad(request, timeout=30, metadata=(("authorization",
                                                                 bearer("alice")),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    stub.RepositoryModelLoad(request, timeout=30,
                             metadata=(("authorization", bearer(METRICS_TOKEN)),))


def test_tls_round_trip_with_the_self_signed_certificate(secure_server, secrets_dir) -> None:
    assert secure_server.url.startswith("https://127.0.0.1:")
    port = int(secure_server.url.rsplit(":", 1)[1])
    served = ssl.get_server_certificate(("127.0.0.1", port))
    expected = (secrets_dir / "tls.crt").read_text()
    assert ssl.PEM_cert_to_DER_cert(served) == ssl.PEM_cert_to_DER_cert(expected)
    # plaintext HTTP to the TLS port gets no answer from the service
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
    # an https client that does not trust the certificate refuses it
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{secure_server.url}/readyz", timeout=5)


def test_grpc_answers_unauthenticated_without_a_valid_token(secure_grpc, secure_server) -> None:
    stub, _, _ = secure_grpc
    details = set()
    for token in (None, "wrong-0123456789abcdef"):
        code, detail, _, _ = infer(stub, token)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        details.add(detail)
    (detail,) = details
    assert "token is required" in detail and "alice" not in detail
    code, _, _, resp = infer(stub, "alice")
    assert code == grpc.StatusCode.OK
    got = list(resp.outputs[0].contents.fp64_contents)
    assert got == http_ll(secure_server, "alice")[2]["log_likelihood"]


def test_grpc_speaks_tls_only(secure_grpc, secrets_dir) -> None:
    _, address, _ = secure_grpc
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ServerLive(pb.ServerLiveRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def until_refused(call, ok, limit: int = 8) -> tuple[int, object]:
    """Call until refused: ``(calls that passed, the refusal)``. Slow calls refill the bucket
    (0.5 per second) as they go, so the count is at least the burst of 2, rarely more."""
    for passed in range(limit):
        answer = call()
        if answer[0] != ok:
            return passed, answer
    raise AssertionError(f"{limit} calls in a row passed a limit of 0.5/s, burst 2")


def test_http_rate_limit_is_reached_then_recovers(secure_server) -> None:
    passed, (status, headers, answer) = until_refused(
        lambda: http_ll(secure_server, "tight-http"), 200)
    assert passed >= 2 and status == 429
    retry = int(headers["retry-after"])
    assert 1 <= retry <= 2 and answer["retry_after_s"] == retry and "retry" in answer["error"]
    assert http_ll(secure_server, "alice")[0] == 200  # other keys are not limited by it
    time.sleep(retry)
    assert http_ll(secure_server, "tight-http")[0] == 200


def test_grpc_rate_limit_counts_each_call_once(secure_grpc) -> None:
    stub, _, _ = secure_grpc
    # burst 2: two calls pass, so a call is counted once
    passed, (code, detail, trailers, _) = until_refused(lambda: infer(stub, "tight-grpc"),
                                                        grpc.StatusCode.OK)
    assert passed >= 2
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in detail
    retry = int(trailers["retry-after"])
    assert 1 <= retry <= 2
    time.sleep(retry)
    assert infer(stub, "tight-grpc")[0] == grpc.StatusCode.OK


def test_keys_rotate_by_rewriting_the_file(secure_server, secure_grpc, secrets_dir) -> None:
    stub, _, _ = secure_grpc
    path = secrets_dir / "keys.json"
    assert http_ll(secure_server, "bob")[0] == 200
    write_keys(path, key_file_content(["alice"], {"carol": CAROL}))
    try:
        deadline = time.monotonic() + 15
        while True:  # the worker re-reads the file within a few reload periods
            state = (http_ll(secure_server, "bob")[0], http_ll(secure_server, CAROL)[0],
                     infer(stub, "bob")[0], infer(stub, CAROL)[0])
            if state == (401, 200, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK):
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.3)
        assert http_ll(secure_server, "alice")[0] == 200  # unchanged keys keep working
    finally:
        write_keys(path, key_file_content(["alice", "bob"]))


def access_lines(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()
            if line.startswith('{"ts":')]


def settled_access_lines(log: Path, quiet_s: float = 1.0, deadline_s: float = 30) -> int:
    """The number of access lines once none has arrived for ``quiet_s``: the workers write
    through pipes, so an earlier test's lines may still be on their way."""
    deadline = time.monotonic() + deadline_s
    count, since = len(access_lines(log)), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.1)
        now = len(access_lines(log))
        if now != count:
            count, since = now, time.monotonic()
    return count


def test_access_log_is_json_without_payloads_or_tokens(secure_server, secure_grpc) -> None:
    stub, _, _ = secure_grpc
    before = settled_access_lines(secure_server.log)
    infer(stub, "alice")
    infer(stub, None)
    http_ll(secure_server, "alice")
    http_ll(secure_server, None)
    # the worker writes its lines through a pipe: wait until all four have arrived
    deadline = time.monotonic() + 30
    while len(access_lines(secure_server.log)) < before + 4:
        assert time.monotonic() < deadline, "the access lines did not reach the log"
        time.sleep(0.1)
    fields = {"ts", "protocol", "key", "verb", "model", "version", "rows", "status",
              "latency_ms"}
    lines = access_lines(secure_server.log)[before:]
    http_lines = [line for line in lines if line["protocol"] == "http"]
    grpc_lines = [line for line in lines if line["protocol"] == "grpc"]
    assert len(http_lines) == len(grpc_lines) == 2  # one line per request, either way
    for line in http_lines + grpc_lines:
        assert set(line) == fields and line["latency_ms"] >= 0
    # two workers write through their own pipes: the lines may arrive in either order
    http_lines.sort(key=lambda line: line["key"] is None)
    grpc_lines.sort(key=lambda line: line["key"] is None)
    assert {"protocol": "http", "key": "alice", "verb": "log_likelihood", "model": MODEL,
            "version": 1, "rows": len(X), "status": 200}.items() <= http_lines[0].items()
    assert (http_lines[1]["key"], http_lines[1]["version"], http_lines[1]["status"]) == (
        None, None, 401)
    assert {"protocol": "grpc", "key": "alice", "verb": "log_likelihood", "model": MODEL,
            "version": 1, "rows": len(X), "status": "OK"}.items() <= grpc_lines[0].items()
    assert (grpc_lines[1]["key"], grpc_lines[1]["status"]) == (None, "UNAUTHENTICATED")
    # one access line per request: BentoML's own access log (scheme=...,path=...) is off
    assert "path=/log_likelihood" not in secure_server.log.read_text()
    text = secure_server.log.read_text()
    assert not any(t in text for t in (*TOKENS.values(), CAROL, METRICS_TOKEN))
    assert str(MARKER)[:8] not in text, "the log holds payload data"


def test_unreadable_key_file_is_a_one_line_startup_error(tmp_path: Path) -> None:
    env = dict(os.environ, GENSERVE_API_KEYS_FILE=str(tmp_path / "missing-keys"),
               GENSERVE_MODELS_DIR=str(tmp_path),
               BENTOML_DO_NOT_TRACK="True")
    commands = {
        "genserve serve": [sys.executable, "-m", "cli", "serve", "--port", "0",
                           "--grpc-port", "0"],
        "bentoml serve": [sys.executable, "-m", "bentoml", "serve", "service.http.api:GenServe",
                          "--port", "0"],
    }
    procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
             for name, cmd in commands.items()}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode != 0, (name, err)
        assert "Traceback" not in err and len(lines) == 1, (name, err)
        assert "cannot read the API key file" in lines[0] and "missing-keys" in lines[0], name
