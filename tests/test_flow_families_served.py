"""FFJORD, residual flows and TarFlow behind a real `genserve serve` (HTTP and gRPC): every
verb's answer equals the in-process runtime's on the same artifact, and `/models` lists each
with its model type and family.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton

from service.devserver import running_server
from service.runtime import open_runtime

MODEL_TYPES = ("ffjord", "resflow", "tarflow")
# ODE models: fixed-step options keep the file fast; one-pass flows take none.
OPTS = {"ffjord": {"steps": 8, "solver": "rk4"}}
X = np.array([[0.125, 0.25], [1.0, -0.375], [-0.75, 0.5], [30.0, -30.0]])


@pytest.fixture(scope="module")
def models(artifact_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("new-flows")
    for kind in MODEL_TYPES:
        shutil.copytree(artifact_factory(kind), root / f"moons-{kind}")
    return root


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("new-flows-log") / "server.log"
    with running_server(models, log, env={"GENSERVE_MAX_LATENCY_MS": "30000"}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.grpc_address)
    yield c
    c.close()


def _x() -> triton.InferInput:
    x = triton.InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X.astype(np.float32))
    return x


def test_models_lists_each_new_family(server, models: Path) -> None:
    status, out = server.post("/models", {})
    assert status == 200, out
    cards = {m["name"]: m for m in out["models"]}
    for kind in MODEL_TYPES:
        card = cards[f"moons-{kind}"]
        assert card["model_type"] == kind, card
        noise = open_runtime(models / f"moons-{kind}").manifest.noise  # TarFlow's training noise
        assert card["noise"] == (None if noise is None else noise.model_dump()), card


@pytest.mark.parametrize("kind", MODEL_TYPES)
def test_log_likelihood_and_anomaly_score_equal_the_runtime(kind: str, server, client,
                                                            models: Path) -> None:
    name, opts = f"moons-{kind}", OPTS.get(kind, {})
    rt = open_runtime(models / name)
    direct = rt.log_likelihood(X.astype(np.float32), **opts)
    status, out = server.post("/log_likelihood", {"model": name, "x": X.tolist(), **opts})
    assert status == 200, out
    np.testing.assert_allclose(out["log_likelihood"], direct.log_prob, rtol=1e-6, atol=1e-6)
    assert out["method"] == direct.method
    got = client.infer(f"{name}.log_likelihood", [_x()], parameters=opts)
    np.testing.assert_array_equal(got.as_numpy("log_likelihood"), out["log_likelihood"])

    anomaly = rt.anomaly_score(X.astype(np.float32))  # the model's default solver
    status, out = server.post("/anomaly_score", {"model": name, "x": X.tolist()})
    assert status == 200, out
    np.testing.assert_allclose(out["scores"], anomaly.scores, rtol=1e-6, atol=1e-6)
    assert out["is_anomaly"] == anomaly.is_anomaly.tolist() and out["is_anomaly"][-1]
    got = client.infer(f"{name}.anomaly_score", [_x()])
    np.testing.assert_array_equal(got.as_numpy("scores"), out["scores"])


@pytest.mark.parametrize("kind", MODEL_TYPES)
def test_sample_equals_the_runtime(kind: str, server, client, models: Path) -> None:
    name, opts = f"moons-{kind}", OPTS.get(kind, {})
    expected = open_runtime(models / name).sample(5, seed=42, **opts)
    status, out = server.post("/sample", {"model": name, "n": 5, "seed": 42, **opts})
    assert status == 200, out
    np.testing.assert_allclose(out["samples"], expected, atol=1e-6)
    n = triton.InferInput("n", [1], "INT64")
    n.set_data_from_numpy(np.array([5], dtype=np.int64))
    got = client.infer(f"{name}.sample", [n], parameters={"seed": 42, **opts})
    np.testing.assert_array_equal(got.as_numpy("samples"), out["samples"])
