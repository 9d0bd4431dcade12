"""Model versions and live updates against a real 2-worker `genserve serve`.

Version 2 of each model here is the same tiny checkpoint re-exported (``genserve export``,
default version: the next free one) with its standardisation mean shifted by ``SHIFT``: its
samples are version 1's plus ``SHIFT`` for the same seed, and its log-likelihood at ``x`` is
version 1's at ``x - SHIFT``. So every answer can be checked to be entirely the version it
says answered it. The server polls its models directory every ``POLL_S``; folders
``moons-nsf`` (the swap under load and the rollback), ``faults`` (each fault of the issue) and
``oip`` (the gRPC repository extension through tritonclient) are independent, so the tests run
in any order.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import metric_samples, metric_sum, scrape_metrics
from tritonclient.utils import InferenceServerException

from artifact.repository import version_dirs, version_target
from service.devserver import Server, running_server
from service.grpc import grpc_predict_v2_pb2 as pb
from service.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

SHIFT = np.array([3.0, -2.0])
POLL_S = 0.4
WORKERS = 2
CONVERGE_S = 60.0  # one interval, plus a version's load on 2 busy shared cores
X = np.array([[0.125, 0.25], [1.0, -0.375], [-0.75, 0.5]])
SEED = 11


def _copy_version(src: Path, dst: Path, name: str) -> None:
    """``src`` (a version directory) as ``dst``, its manifest naming model ``name``; the
    manifest is written last, so a reader sees it only once the graphs are in place."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copytree(src, tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    (tmp / "manifest.json").write_text(json.dumps(manifest | {"name": name}))
    tmp.rename(dst)


@pytest.fixture(scope="module")
def staged(tmp_path_factory, checkpoint_factory, artifact_factory) -> Path:
    """``staged/moons-nsf``: version 1 (flat) and version 2 (``2/``, the shifted export)."""
    from cli import main
    from training.checkpoint import load_checkpoint, save_checkpoint
    from training.preprocess import Standardize

    root = tmp_path_factory.mktemp("staged")
    ckpt = load_checkpoint(checkpoint_factory("nsf"))
    steps = [m for m in ckpt.preprocessor.modules() if isinstance(m, Standardize)]
    assert len(steps) == 1
    steps[0].mean += steps[0].mean.new_tensor(SHIFT)
    save_checkpoint(ckpt, root / "shifted-ckpt")
    folder = root / "moons-nsf"
    shutil.copytree(artifact_factory("nsf"), folder)
    assert main(["export", str(root / "shifted-ckpt"), "--out", str(folder),
                 "--calibration-rows", "200", "--no-progress"]) == 0
    assert sorted(version_dirs(folder)[0]) == [1, 2] and (folder / "2" / "manifest.json").is_file()
    return folder


@pytest.fixture(scope="module")
def versions_server(staged: Path, tmp_path_factory):
    models = tmp_path_factory.mktemp("versioned")
    v1 = [p for p in staged.iterdir() if p.is_file()]
    for name in ("moons-nsf", "faults", "oip"):
        (models / name).mkdir()
        for f in v1:
            shutil.copy2(f, models / name / f.name)
        manifest = json.loads((models / name / "manifest.json").read_text())
        (models / name / "manifest.json").write_text(json.dumps(manifest | {"name": name}))
    _copy_version(staged / "2", models / "oip" / "2", "oip")
    log = tmp_path_factory.mktemp("versions-logs") / "server.log"
    env = {"GENSERVE_WORKERS": str(WORKERS), "GENSERVE_MODELS_POLL_S": str(POLL_S),
           "GENSERVE_MAX_BATCH_WAIT_MS": "5"}
    with running_server(models, log, env=env) as server:
        server.models = models
        yield server


def _served_versions(server: Server, model: str) -> list[float]:
    """``genserve_model_version{model}`` of each worker (one sample per pid)."""
    samples = metric_samples(scrape_metrics(server), "genserve_model_version")
    return [v for labels, v in samples.items() if dict(labels).get("model") == model]


def _wait_for(server: Server, model: str, version: int) -> float:
    """Seconds until every worker serves ``version`` of ``model``."""
    start = time.monotonic()
    while True:
        seen = _served_versions(server, model)
        if len(seen) == WORKERS and all(v == version for v in seen):
            return time.monotonic() - start
        assert time.monotonic() - start < CONVERGE_S, f"{model}: workers serve {seen}"
        time.sleep(POLL_S / 4)


def _ask(server: Server, verb: str, model: str, **fields) -> tuple[int, dict]:
    body = {"model": model, **fields}
    if verb == "sample":
        body |= {"n": 4, "seed": SEED}
    else:
        body |= {"x": fields.get("x", X).tolist()}
    return server.post(f"/{verb}", body)


def _references(server: Server, model: str) -> dict:
    """Version 1's answers (before any other version lands) and what version 2's must be."""
    refs = {}
    for verb in ("sample", "log_likelihood", "anomaly_score"):
        status, v1 = _ask(server, verb, model)
        assert status == 200 and v1["version"] == 1, v1
        refs[(verb, 1)] = v1
    _, shifted = _ask(server, "log_likelihood", model, x=X - SHIFT)
    _, shifted_scores = _ask(server, "anomaly_score", model, x=X - SHIFT)
    refs[("sample", 2)] = np.asarray(refs[("sample", 1)]["samples"]) + SHIFT
    refs[("log_likelihood", 2)] = shifted["log_likelihood"]
    refs[("anomaly_score", 2)] = shifted_scores["scores"]
    return refs


def _is_version(verb: str, answer: dict, refs: dict) -> bool:
    """Whether ``answer`` is entirely the version it names."""
    v = answer["version"]
    field = {"sample": "samples", "log_likelihood": "log_likelihood",
             "anomaly_score": "scores"}[verb]
    want = refs[(verb, v)]
    want = want[field] if isinstance(want, dict) else want
    return np.allclose(answer[field], want, atol=2e-3, rtol=1e-4)


class Load:
    """Concurrent callers looping over the three verbs until stopped (bounded)."""

    def __init__(self, server: Server, model: str, callers: int = 16,
                 max_per_caller: int = 400) -> None:
        self.server, self.model = server, model
        self.answers: list[tuple[str, int, dict]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i, max_per_caller))
                         for i in range(callers)]

    def _loop(self, i: int, bound: int) -> None:
        verbs = ("sample", "log_likelihood", "anomaly_score")
        for n in range(bound):
            if self._stop.is_set():
                return
            verb = verbs[(i + n) % 3]
            status, body = _ask(self.server, verb, self.model)
            self.answers.append((verb, status, body))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def test_version_lands_under_load_every_answer_whole_then_rollback(versions_server,
                                                                   staged) -> None:
    server, model = versions_server, "moons-nsf"
    refs = _references(server, model)
    with Load(server, model) as load:
        time.sleep(1.0)
        shutil.copytree(staged / "2", server.models / model / "2")  # file by file, in place
        landed = time.monotonic()
        _wait_for(server, model, 2)
        time.sleep(1.0)
    assert time.monotonic() - landed < CONVERGE_S
    statuses = [status for _, status, _ in load.answers]
    assert len(statuses) > 50 and set(statuses) == {200}, sorted(set(statuses))
    versions = [body["version"] for _, _, body in load.answers]
    assert set(versions) == {1, 2}
    wrong = [(verb, body) for verb, _, body in load.answers if not _is_version(verb, body, refs)]
    assert not wrong, wrong[:2]
    for verb in ("sample", "log_likelihood", "anomaly_score"):  # every worker answers v2 now
        for _ in range(4):
            status, body = _ask(server, verb, model)
            assert status == 200 and body["version"] == 2 and _is_version(verb, body, refs)
    metrics = scrape_metrics(server)
    for version in ("1", "2"):  # each loaded once per worker: v1 is not reloaded when the
        # flat folder gains a version
        assert metric_sum(metrics, "genserve_model_loads_total", model=model, version=version,
                          result="ok") == WORKERS
    assert metric_sum(metrics, "genserve_requests_total", model=model, version="2",
                      verb="sample", status="200") > 0
    # roll back by policy: every worker serves v1 again; v2 still answers when pinned
    (server.models / model / "policy.json").write_text('{"default": 1}')
    _wait_for(server, model, 1)
    for _ in range(4):
        status, body = _ask(server, "sample", model)
        assert status == 200 and body["version"] == 1 and _is_version("sample", body, refs)
    status, body = _ask(server, "log_likelihood", model, version=2)
    assert status == 200 and body["version"] == 2 and _is_version("log_likelihood", body, refs)
    status, raw = server.get("/models")
    card = next(m for m in json.loads(raw)["models"] if m["name"] == model)
    assert card["version"] == 1
    assert card["versions"] == [{"version": 1, "state": "ready", "reason": None},
                                {"version": 2, "state": "ready", "reason": None}]
    status, body = _ask(server, "sample", model, version=7)
    assert status == 404
    assert body["error"] == (f"model '{model}' has no version 7 serving; its versions "
                             "serving: 1, 2 (without 'version': 1)")


def _failed(server: Server) -> dict[str, str]:
    return json.loads(server.get("/models")[1])["failed"]


def _failure(server: Server, key: str, what: str) -> str:
    """Why ``key`` is failed, from the first ``/models`` answer that lists it (the workers
    converge one poll apart, so a second request may reach one that has not yet)."""
    deadline = time.monotonic() + CONVERGE_S
    while (why := _failed(server).get(key)) is None:
        assert time.monotonic() < deadline, what
        time.sleep(POLL_S / 2)
    return why


def _wait_until(check, what: str) -> None:
    deadline = time.monotonic() + CONVERGE_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(POLL_S / 2)


def test_faults_are_refused_or_finish_and_the_old_version_serves(versions_server,
                                                                 staged) -> None:
    server, model = versions_server, "faults"
    folder = server.models / model
    refs = _references(server, model)
    # a half-copied version: its manifest first, its graphs later; loaded once they match
    (folder / "2").mkdir()
    manifest = json.loads((staged / "2" / "manifest.json").read_text()) | {"name": model}
    (folder / "2" / "manifest.json").write_text(json.dumps(manifest))
    why = _failure(server, "faults/2", "the half-copied version is not shown")
    assert "is missing" in why or "sha256" in why
    time.sleep(3 * POLL_S)
    assert _ask(server, "sample", model)[1]["version"] == 1
    for graph in sorted(p for p in (staged / "2").iterdir() if p.name != "manifest.json"):
        shutil.copy2(graph, folder / "2" / graph.name)
    _wait_for(server, model, 2)
    assert "faults/2" not in _failed(server)
    assert metric_sum(scrape_metrics(server), "genserve_model_loads_total", model=model,
                      version="2", result="ok") == WORKERS  # loaded once in each worker
    # a corrupted graph: refused with the reason, version 2 goes on serving
    # (corrupted while hidden, then moved in, so no poll sees it whole)
    hidden = folder / ".3"
    _copy_version(staged / "2", hidden, model)
    graph = hidden / "log_prob.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    hidden.rename(folder / "3")
    why = _failure(server, "faults/3", "the corrupted version is not refused")
    assert "log_prob.onnx" in why
    assert "sha256" in why
    # every worker refuses version 3 (404); once each has polled, each says it is failed
    def refused_as_failed() -> bool:
        status, body = _ask(server, "sample", model, version=3)
        assert status == 404, body
        return "(it is failed: " in body["error"]
    _wait_until(lambda: all(refused_as_failed() for _ in range(4)),
                "a request for the corrupted version is not told it is failed")
    assert _ask(server, "sample", model)[1]["version"] == 2
    # version 2 removed while requests use it: they finish; version 1 serves after
    with Load(server, model, callers=8) as load:
        time.sleep(1.0)
        shutil.rmtree(folder / "2")
        _wait_for(server, model, 1)
        time.sleep(0.5)
    assert {status for _, status, _ in load.answers} == {200}
    assert {body["version"] for _, _, body in load.answers} == {1, 2}
    assert all(_is_version(verb, body, refs) for verb, _, body in load.answers)
    _wait_until(lambda: "released model faults version 2" in server.log.read_text(),
                "version 2's graph sessions are not released")
    # unload the model's last serving version with requests queued: they finish, then 404
    with Load(server, model, callers=8) as load:
        time.sleep(1.0)
        status, answer = server.post(f"/models/{model}/unload", {})
        assert status == 200, answer
        assert answer["version"] is None
        assert [v["state"] for v in answer["versions"]] == ["unloaded", "unloaded"]
        _wait_for(server, model, 0)  # every worker: the model no longer serves
        time.sleep(1.0)
    statuses = [status for _, status, _ in load.answers]  # in the order they were answered
    assert set(statuses) == {200, 404} and statuses.index(404) > 0
    assert all(_ask(server, verb, model)[0] == 404 for verb in ("sample", "log_likelihood")
               for _ in range(4))  # new requests, in either worker
    assert all(body["error"].startswith(f"unknown model '{model}'")
               for _, status, body in load.answers if status == 404)
    assert "faults" in json.loads(server.get("/models")[1])["unloaded"]
    status, answer = server.post(f"/models/{model}/load", {"version": 1})
    assert status == 200 and answer["version"] == 1, answer
    _wait_for(server, model, 1)
    # a load request for a path outside the models directory: 400, nothing loads
    for name in ("..", "../..%2Fetc", "%2E%2E", "a/../../b", ".hidden"):
        status, body = server.post(f"/models/{name}/load", {})
        assert status == 400 and "not a model folder" in body["error"], (name, body)
    status, body = server.post("/models/nowhere/load", {})
    assert status == 404 and body["error"].startswith("no model folder 'nowhere'")
    status, body = server.post(f"/models/{model}/load", {"version": 0})
    assert status == 400 and "version" in body["error"]


def test_grpc_model_version_and_repository_extension(versions_server) -> None:
    server = versions_server
    client = triton.InferenceServerClient(server.grpc_address)
    try:
        index = client.get_model_repository_index(as_json=True)["models"]
        oip = {(m["name"], m["version"]): m["state"] for m in index
               if m["name"].startswith("oip.")}
        assert oip == {(f"oip.{verb}", v): "READY" for v in ("1", "2")
                       for verb in ("sample", "log_likelihood", "anomaly_score")}
        assert client.get_model_metadata("oip.sample").versions == ["1", "2"]
        assert client.is_model_ready("oip.sample", "1")
        assert not client.is_model_ready("oip.sample", "5")

        def sample(version: str = "") -> tuple[str, np.ndarray]:
            n = triton.InferInput("n", [1], "INT64")
            n.set_data_from_numpy(np.array([4], dtype=np.int64))
            seed = triton.InferInput("seed", [1], "INT64")
            seed.set_data_from_numpy(np.array([SEED], dtype=np.int64))
            result = client.infer("oip.sample", [n, seed], model_version=version)
            return result.get_response().model_version, result.as_numpy("samples")

        (v1, s1), (v2, s2) = sample("1"), sample()
        assert (v1, v2) == ("1", "2")
        np.testing.assert_allclose(s2, s1 + SHIFT, atol=1e-4)
        with pytest.raises(InferenceServerException) as err:
            sample("9")
        assert err.value.status() == "StatusCode.NOT_FOUND"
        assert "has no version 9 serving; its versions serving: 1, 2" in err.value.message()

        channel = grpc.insecure_channel(server.grpc_address)
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        unload = pb.RepositoryModelUnloadRequest(model_name="oip")
        unload.parameters["version"].int64_param = 2  # tritonclient's unload takes no version
        stub.RepositoryModelUnload(unload, timeout=30)
        _wait_for(server, "oip", 1)
        assert all(sample()[0] == "1" for _ in range(4))
        index = client.get_model_repository_index(as_json=True)["models"]
        v2 = [m for m in index if m["name"] == "oip.sample" and m["version"] == "2"]
        assert v2 == [{"name": "oip.sample", "version": "2", "state": "UNAVAILABLE",
                       "reason": "unloaded through the repository API"}]
        client.unload_model("oip")  # every version: the model no longer serves
        _wait_for(server, "oip", 0)
        with pytest.raises(InferenceServerException) as err:
            sample()
        assert err.value.status() == "StatusCode.NOT_FOUND"
        client.load_model("oip.sample")  # NAME.VERB names its model folder too
        _wait_for(server, "oip", 2)
        assert sample()[0] == "2"

        for name, code in (("../oip", "INVALID_ARGUMENT"), ("nowhere", "NOT_FOUND")):
            with pytest.raises(InferenceServerException) as err:
                client.load_model(name)
            assert err.value.status() == f"StatusCode.{code}", err.value.message()
        unload.parameters["version"].string_param = "two"
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelUnload(unload, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "version" in err.value.details()
        channel.close()
    finally:
        client.close()


def test_export_version_targets(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    assert version_target(folder, None) == (folder, 1)  # a new folder: flat, version 1
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    assert version_target(folder, None) == (folder / "2", 2)
    assert version_target(folder, 1) == (folder, 1)  # flat files only: re-export in place
    (folder / "2").mkdir()
    (folder / "2" / "manifest.json").write_text("{}")
    assert version_target(folder, None) == (folder / "3", 3)
    assert version_target(folder, 7) == (folder / "7", 7)
    with pytest.raises(ValueError, match="holds version 1 as flat files beside versions 2"):
        version_target(folder, 1)
    with pytest.raises(ValueError, match="--version must be an integer from 1"):
        version_target(folder, 0)
    assert version_dirs(folder) == ({1: folder, 2: folder / "2"}, {})
