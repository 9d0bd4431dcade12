"""The gRPC side (Open Inference Protocol v2) against real servers.

A standard OIP client from PyPI (tritonclient[grpc]) talks to the gRPC edge that the session's
real `genserve serve` (the `server` fixture) serves from its worker, beside HTTP: every verb
of every family gives the numbers HTTP gives; health, readiness, metadata, reflection, the
repository index and each error code are exercised. A second server with two workers shows
gRPC and HTTP callers batched together, one gRPC port shared by the workers, no other
process, and health turning NOT_SERVING when the worker is told to stop.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton
from conftest import metric_sum, scrape_metrics
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.devserver import listening_ports, running_server
from service.grpc import grpc_predict_v2_pb2 as pb
from service.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("moons-nsf", "moons-ddpm", "moons-cfm")
# Fixed-step options for the ODE models keep the file fast; flows take none.
SAMPLE_OPTS = {"moons-nsf": {}, "moons-ddpm": {"steps": 12, "solver": "ddim"},
               "moons-cfm": {"steps": 8, "solver": "heun"}}
LL_OPTS = {"moons-nsf": {}, "moons-ddpm": {"steps": 8, "solver": "rk4"},
           "moons-cfm": {"steps": 8, "solver": "rk4"}}
X = np.array([[0.125, 0.25], [1.0, -0.375], [-0.75, 0.5], [3.0, 3.0]], dtype=np.float32)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def grpc_address(server) -> str:
    """The session server's own gRPC edge (served by its worker, beside HTTP)."""
    return server.grpc_address


@pytest.fixture(scope="module")
def client(grpc_address: str):
    c = triton.InferenceServerClient(grpc_address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(grpc_address: str):
    with grpc.insecure_channel(grpc_address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def two_workers(served_models: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("grpc-2w") / "server.log"
    env = {"GENSERVE_WORKERS": "2", "GENSERVE_MAX_BATCH_WAIT_MS": "50",
           "GENSERVE_MAX_ROWS": "500", "GENSERVE_MAX_STEPS": "200"}
    with running_server(served_models, log, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def client2(two_workers):
    """tritonclient against the 2-worker server: the verbs' answers equal HTTP's whichever
    worker takes each call."""
    c = triton.InferenceServerClient(two_workers.grpc_address)
    yield c
    c.close()


def _input(name: str, array: np.ndarray, datatype: str) -> triton.InferInput:
    t = triton.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def _x(array: np.ndarray = X) -> triton.InferInput:
    return _input("x", array, "FP32")


def _n(n: int) -> triton.InferInput:
    return _input("n", np.array([n], dtype=np.int64), "INT64")


def _http(server, verb: str, body: dict) -> dict:
    status, answer = server.post(f"/{verb}", body)
    assert status == 200, answer
    return answer


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(InferenceServerException) as info:
        call()
    # tritonclient reports the status as text, "StatusCode.NOT_FOUND"
    return grpc.StatusCode[info.value.status().rsplit(".", 1)[-1]], info.value.message()


# --- every verb, every family, 2 workers: the numbers HTTP gives -------------------------


@pytest.mark.parametrize("model", MODELS)
def test_log_likelihood_matches_http(model: str, client2, two_workers) -> None:
    opts = LL_OPTS[model]
    result = client2.infer(f"{model}.log_likelihood", [_x()], parameters=opts)
    http = _http(two_workers, "log_likelihood", {"model": model, "x": X.tolist(), **opts})
    np.testing.assert_array_equal(result.as_numpy("log_likelihood"), http["log_likelihood"])
    np.testing.assert_array_equal(result.as_numpy("bits_per_dim"), http["bits_per_dim"])
    assert result.as_numpy("std_error") is None
    params = result.get_response().parameters
    assert params["method"].string_param == http["method"]
    assert params["nfe"].int64_param == http["nfe"]


def test_hutchinson_log_likelihood_has_std_error(client2, two_workers) -> None:
    opts = {"method": "hutchinson", "probes": 4, "seed": 3, "steps": 6, "solver": "rk4"}
    result = client2.infer("moons-cfm.log_likelihood", [_x()], parameters=opts)
    http = _http(two_workers, "log_likelihood", {"model": "moons-cfm", "x": X.tolist(), **opts})
    np.testing.assert_array_equal(result.as_numpy("log_likelihood"), http["log_likelihood"])
    np.testing.assert_array_equal(result.as_numpy("std_error"), http["std_error"])


@pytest.mark.parametrize("model", MODELS)
def test_anomaly_score_matches_http(model: str, client2, two_workers) -> None:
    result = client2.infer(f"{model}.anomaly_score", [_x()])
    http = _http(two_workers, "anomaly_score", {"model": model, "x": X.tolist()})
    np.testing.assert_array_equal(result.as_numpy("scores"), http["scores"])
    np.testing.assert_array_equal(result.as_numpy("percentile"), http["percentile"])
    np.testing.assert_array_equal(result.as_numpy("is_anomaly"), http["is_anomaly"])
    assert result.as_numpy("is_anomaly").dtype == np.bool_
    np.testing.assert_array_equal(result.as_numpy("threshold"), [http["threshold"]])


def test_anomaly_target_fpr_parameter(client, server) -> None:
    # tritonclient has no float parameters: a number may travel as a string
    result = client.infer("moons-nsf.anomaly_score", [_x()], parameters={"target_fpr": "0.2"})
    http = _http(server, "anomaly_score", {"model": "moons-nsf", "x": X.tolist(),
                                           "target_fpr": 0.2})
    assert result.as_numpy("threshold")[0] == http["threshold"]
    default = _http(server, "anomaly_score", {"model": "moons-nsf", "x": X.tolist()})
    assert http["threshold"] < default["threshold"]


@pytest.mark.parametrize("model", MODELS)
def test_sample_matches_http(model: str, client2, two_workers) -> None:
    opts = SAMPLE_OPTS[model]
    seed = _input("seed", np.array([11], dtype=np.int64), "INT64")
    result = client2.infer(f"{model}.sample", [_n(5), seed], parameters=opts)
    http = _http(two_workers, "sample", {"model": model, "n": 5, "seed": 11, **opts})
    samples = result.as_numpy("samples")
    assert samples.shape == (5, 2) and samples.dtype == np.float64
    np.testing.assert_array_equal(samples, http["samples"])
    params = result.get_response().parameters
    assert params["seed"].int64_param == 11
    assert params["solver"].string_param == http["solver"]
    assert params["nfe"].int64_param == http["nfe"] >= 1
    # the seed as a parameter is the same request
    again = client2.infer(f"{model}.sample", [_n(5)], parameters={"seed": 11, **opts})
    np.testing.assert_array_equal(again.as_numpy("samples"), samples)


def test_concurrent_calls_share_the_batches(client, server) -> None:
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(3 + i, 2)).astype(np.float32) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda x: client.infer("moons-nsf.log_likelihood", [_x(x)]), xs))
    for x, result in zip(xs, results, strict=True):
        http = _http(server, "log_likelihood", {"model": "moons-nsf", "x": x.tolist()})
        np.testing.assert_allclose(result.as_numpy("log_likelihood"), http["log_likelihood"],
                                   rtol=1e-6)


def test_requested_outputs_only(client) -> None:
    out = [triton.InferRequestedOutput("is_anomaly")]
    result = client.infer("moons-nsf.anomaly_score", [_x()], outputs=out)
    assert [o.name for o in result.get_response().outputs] == ["is_anomaly"]


def test_typed_contents_request_gets_typed_outputs(stub, server) -> None:
    req = pb.ModelInferRequest(model_name="moons-nsf.log_likelihood", id="req-7")
    x = req.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
    x.contents.fp32_contents.extend(X.reshape(-1).tolist())
    resp = stub.ModelInfer(req, timeout=30)
    http = _http(server, "log_likelihood", {"model": "moons-nsf", "x": X.tolist()})
    assert resp.id == "req-7" and not resp.raw_output_contents
    outputs = {o.name: o for o in resp.outputs}
    assert list(outputs["log_likelihood"].shape) == [len(X)]
    assert list(outputs["log_likelihood"].contents.fp64_contents) == http["log_likelihood"]
    # FP64 rows and an INT64 `n` in typed contents work too
    req = pb.ModelInferRequest(model_name="moons-nsf.sample")
    req.inputs.add(name="n", datatype="INT64", shape=[1]).contents.int64_contents.append(3)
    req.parameters["seed"].int64_param = 5
    resp = stub.ModelInfer(req, timeout=30)
    samples = np.reshape(resp.outputs[0].contents.fp64_contents, list(resp.outputs[0].shape))
    np.testing.assert_array_equal(samples, _http(server, "sample", {"model": "moons-nsf", "n": 3,
                                                                    "seed": 5})["samples"])


def test_grpc_calls_reach_the_shared_metrics(client, server) -> None:
    def count() -> float:
        return metric_sum(scrape_metrics(server), "genserve_requests_total", model="moons-cfm",
                          verb="anomaly_score", status="200")

    before = count()
    client.infer("moons-cfm.anomaly_score", [_x()])
    assert count() == before + 1


# --- health, readiness, metadata, reflection ------------------------------------------------


def test_live_ready_and_server_metadata(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "genserve" and meta.version


def test_standard_health_check(grpc_address: str) -> None:
    with grpc.insecure_channel(grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            req = health_pb2.HealthCheckRequest(service=service)
            assert health.Check(req, timeout=5).status == SERVING


def test_reflection_lists_the_services(grpc_address: str) -> None:
    with grpc.insecure_channel(grpc_address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="inference.GRPCInferenceService")]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in listed.list_services_response.service}
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


def test_model_ready(client) -> None:
    for model in MODELS:
        for verb in ("sample", "log_likelihood", "anomaly_score"):
            assert client.is_model_ready(f"{model}.{verb}")
    assert client.is_model_ready("moons-nsf.sample", "1")
    for name in ("nope.sample", "moons-nsf", "moons-nsf.train", "broken.sample"):
        assert not client.is_model_ready(name)
    assert not client.is_model_ready("moons-nsf.sample", "2")


def test_model_metadata_describes_each_signature(client) -> None:
    def tensors(meta, side: str) -> dict:
        return {t.name: (t.datatype, list(t.shape)) for t in getattr(meta, side)}

    meta = client.get_model_metadata("moons-nsf.log_likelihood")
    assert meta.versions == ["1"]
    assert tensors(meta, "inputs") == {"x": ("FP32", [-1, 2])}
    assert tensors(meta, "outputs") == {"log_likelihood": ("FP64", [-1]),
                                        "bits_per_dim": ("FP64", [-1])}
    assert "std_error" in tensors(client.get_model_metadata("moons-ddpm.log_likelihood"),
                                  "outputs")
    meta = client.get_model_metadata("moons-cfm.anomaly_score")
    assert tensors(meta, "outputs") == {"scores": ("FP64", [-1]), "is_anomaly": ("BOOL", [-1]),
                                        "percentile": ("FP64", [-1]),
                                        "threshold": ("FP64", [1])}
    meta = client.get_model_metadata("moons-ddpm.sample")
    assert tensors(meta, "inputs") == {"n": ("INT64", [1]), "seed": ("INT64", [1])}
    assert tensors(meta, "outputs") == {"samples": ("FP64", [-1, 2])}
    code, message = _code(lambda: client.get_model_metadata("nope.sample"))
    assert code == grpc.StatusCode.NOT_FOUND and "moons-nsf.sample" in message


# --- errors map to gRPC status codes ---------------------------------------------------------


def test_invalid_argument(client, stub) -> None:
    ll = "moons-nsf.log_likelihood"
    bad = grpc.StatusCode.INVALID_ARGUMENT
    code, message = _code(lambda: client.infer(ll, [_x(np.zeros((2, 3), np.float32))]))
    assert code == bad and "expects [rows, 2]" in message
    nan = X.copy()
    nan[1, 0] = np.nan
    code, message = _code(lambda: client.infer(ll, [_x(nan)]))
    assert code == bad and "non-finite value at row 1, column 0" in message
    code, message = _code(lambda: client.infer(ll, [_input("x", X.astype(np.int64), "INT64")]))
    assert code == bad and "send FP32" in message
    code, message = _code(lambda: client.infer("moons-nsf.sample", [_n(2)],
                                               parameters={"solver": "euler"}))
    assert code == bad and "unknown solver 'euler'" in message  # the HTTP side's message
    code, message = _code(lambda: client.infer(ll, [_x()], parameters={"bogus": 1}))
    assert code == bad and "unknown parameter 'bogus'" in message
    # raw contents whose size does not match the declared shape
    req = pb.ModelInferRequest(model_name=ll, raw_input_contents=[X.tobytes()[:-4]])
    req.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(req, timeout=10)
    assert info.value.code() == bad and "needs 32" in info.value.details()


def test_not_found(client) -> None:
    code, message = _code(lambda: client.infer("nope.log_likelihood", [_x()]))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'nope.log_likelihood'" in message and "moons-cfm.sample" in message


def test_resource_exhausted(client, server) -> None:
    rows = np.zeros((501, 2), np.float32)
    code, message = _code(lambda: client.infer("moons-nsf.log_likelihood", [_x(rows)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    status, http = server.post("/log_likelihood", {"model": "moons-nsf", "x": rows.tolist()})
    assert status == 413 and message == http["error"]  # the same words as HTTP
    code, _ = _code(lambda: client.infer("moons-nsf.sample", [_n(2001)]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_call_past_its_deadline_is_deadline_exceeded_and_the_server_goes_on(client) -> None:
    # the test server's limits: 500 rows, 200 steps; 800 network passes over 500 rows
    rows = np.random.default_rng(0).normal(size=(500, 2)).astype(np.float32)
    slow = {"steps": 200, "solver": "rk4"}
    code, msg = _code(lambda: client.infer("moons-cfm.log_likelihood", [_x(rows)],
                                         parameters=slow, client_timeout=0.05))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED, msg
    # the server goes on answering
    for _ in range(3):
        result = client.infer("moons-nsf.log_likelihood", [_x()])
        assert result.as_numpy("log_likelihood").shape == (len(X),)


def test_repository_index_lists_every_oip_model(client) -> None:
    index = client.get_model_repository_index()
    names = {m.name: (m.version, m.state) for m in index.models}
    for model in MODELS:
        for verb in ("sample", "log_likelihood", "anomaly_score"):
            assert names[f"{model}.{verb}"] == ("1", "READY")
    broken = [m for m in index.models if m.name.startswith("broken.")]  # refused at start
    assert {m.name for m in broken} == {f"broken.{verb}" for verb in
                                        ("sample", "log_likelihood", "anomaly_score")}
    assert all((m.version, m.state) == ("1", "UNAVAILABLE") and
               "log_prob.onnx fails its sha256 check" in m.reason for m in broken)
    ready = client.get_model_repository_index(as_json=True)
    assert {m["name"] for m in ready["models"]} == set(names)


# --- two workers, one port: gRPC and HTTP in the same batches -------------------------------




def test_two_workers_share_one_grpc_port_and_no_other_process_serves_it(two_workers) -> None:
    port = int(two_workers.grpc_address.rsplit(":", 1)[1])
    root = psutil.Process(two_workers.proc.pid)

    def holders() -> list[psutil.Process]:
        return [p for p in [root, *root.children(recursive=True)]
                if port in listening_ports(p.pid)]

    _wait_until(lambda: len(holders()) == 2)  # each worker, once started, holds a socket
    tree = [root, *root.children(recursive=True)]
    commands = [" ".join(p.cmdline()) for p in tree]
    assert not any("service.grpc" in c or "grpc_server" in c for c in commands), commands
    # every call reaches a worker through the one port; each answers like HTTP
    c = triton.InferenceServerClient(two_workers.grpc_address)
    for model in MODELS:
        opts = LL_OPTS[model]
        got = c.infer(f"{model}.log_likelihood", [_x()], parameters=opts)
        http = _http(two_workers, "log_likelihood", {"model": model, "x": X.tolist(), **opts})
        np.testing.assert_array_equal(got.as_numpy("log_likelihood"), http["log_likelihood"])
        got = c.infer(f"{model}.sample", [_n(4)], parameters={"seed": 2, **SAMPLE_OPTS[model]})
        http = _http(two_workers, "sample", {"model": model, "n": 4, "seed": 2,
                                              **SAMPLE_OPTS[model]})
        np.testing.assert_array_equal(got.as_numpy("samples"), http["samples"])
        got = c.infer(f"{model}.anomaly_score", [_x()])
        http = _http(two_workers, "anomaly_score", {"model": model, "x": X.tolist()})
        np.testing.assert_array_equal(got.as_numpy("scores"), http["scores"])
    c.close()


def test_grpc_and_http_callers_share_batches_and_keep_their_answers(two_workers) -> None:
    """Concurrent callers of both transports on the PF-ODE likelihood: the batch histogram
    shows graph calls that served both, and each answer equals the request's lone answer."""
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(int(rng.integers(1, 6)), 2)).astype(np.float32) for _ in range(48)]
    body = {"model": "moons-cfm", "method": "hutchinson", "probes": 3, "seed": 9}
    lone = [_http(two_workers, "log_likelihood", {**body, "x": x.tolist()})["log_likelihood"]
            for x in xs]
    c = triton.InferenceServerClient(two_workers.grpc_address)
    params = {k: v for k, v in body.items() if k != "model"}

    def call(i: int) -> list[float]:
        if i % 2:
            return list(c.infer("moons-cfm.log_likelihood", [_x(xs[i])],
                                parameters=params).as_numpy("log_likelihood"))
        return _http(two_workers, "log_likelihood", {**body, "x": xs[i].tolist()})[
            "log_likelihood"]

    for _ in range(2):
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(call, range(len(xs))))
        for i, (got, want) in enumerate(zip(answers, lone, strict=True)):
            assert list(got) == list(want), i
    c.close()
    mixed = metric_sum(scrape_metrics(two_workers), "genserve_batch_requests_count",
                       model="moons-cfm", verb="log_likelihood", transports="grpc+http")
    assert mixed > 0, "no graph batch served gRPC and HTTP callers together"


def test_health_turns_not_serving_on_sigterm_and_calls_in_flight_drain(
        served_models: Path, tmp_path: Path) -> None:
    env = {"GENSERVE_MAX_ROWS": "500", "GENSERVE_MAX_STEPS": "400", "GENSERVE_GRPC_GRACE_S": "30"}
    rows = np.random.default_rng(0).normal(size=(400, 2)).astype(np.float32)
    slow = {"steps": 400, "solver": "rk4"}  # seconds of PF-ODE work on 2 cores
    with running_server(served_models, tmp_path / "server.log", env=env) as s, \
            grpc.insecure_channel(s.grpc_address) as channel, ThreadPoolExecutor(2) as pool:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == SERVING
        c = triton.InferenceServerClient(s.grpc_address)
        in_flight = [
            pool.submit(lambda: c.infer("moons-cfm.log_likelihood", [_x(rows)],
                                        parameters=slow).as_numpy("log_likelihood")),
            pool.submit(lambda: _http(s, "log_likelihood", {"model": "moons-cfm",
                                                            "x": rows.tolist(), **slow})),
        ]
        _wait_until(lambda: metric_sum(scrape_metrics(s), "genserve_batch_rows_count",
                                       model="moons-cfm", verb="log_likelihood") > 0)
        os.kill(s.proc.pid, signal.SIGTERM)  # genserve serve: what the kubelet signals
        statuses = set()
        deadline = time.monotonic() + 20
        while NOT_SERVING not in statuses and time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                statuses.add(health.Check(health_pb2.HealthCheckRequest(), timeout=2).status)
        assert NOT_SERVING in statuses, statuses  # while the calls in flight still run
        assert in_flight[0].result(timeout=120).shape == (len(rows),)
        assert len(in_flight[1].result(timeout=120)["log_likelihood"]) == len(rows)
        c.close()
        assert s.proc.wait(timeout=60) == 0


def _wait_until(done, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


@pytest.mark.parametrize("doc", ["API.md", "GRPC.md"])
def test_the_python_client_examples_of_the_docs_run(doc: str, server) -> None:
    """Every ``<!-- example -->`` block of docs/API.md and docs/GRPC.md, run against the
    session's server (its address in place of the documented one)."""
    text = (ROOT / "docs" / doc).read_text()
    blocks = re.findall(r"<!-- example -->\n```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"docs/{doc} has no runnable example"
    for code in blocks:
        code = code.replace("http://127.0.0.1:3000", server.url).replace(
            "127.0.0.1:8001", server.grpc_address)
        exec(compile(code, f"docs/{doc}", "exec"), {"__name__": "example"})  # noqa: S102
