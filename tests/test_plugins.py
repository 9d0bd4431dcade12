"""A model family is a plug-in: a family defined in the test suite (``toy_family``, a diagonal
Gaussian) is trained by the one training loop, exported by the one exporter and served by
the one service, with no edit outside the test suite; its answers equal the analytic ones.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import toy_family
import tritonclient.grpc as triton

from service.devserver import running_server
from service.runtime import RUNTIMES, open_runtime
from training.config import TrainConfig
from training.export import export_checkpoint
from training.fit import fit

ROOT = Path(__file__).resolve().parents[1]
ROWS = [[0.5, -1.0], [2.0, 0.3], [40.0, -40.0]]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """The plug-in model fitted on gmm2, exported, and its parameters in data units."""
    root = tmp_path_factory.mktemp("toy")
    ckpt = fit(toy_family.MODEL_TYPE, "gmm2", out=root / "ckpt", rows=2000,
               train_cfg=TrainConfig(steps=300, lr=0.05, eval_every=100, progress=False))
    export_checkpoint(ckpt, root / "models" / "toy-gauss")
    standardize = ckpt.preprocessor.transforms[-1]
    m, s = (t.detach().double().numpy() for t in (standardize.mean, standardize.std))
    mu = ckpt.model.mean.detach().double().numpy()
    sigma = np.exp(ckpt.model.log_std.detach().double().numpy())
    # x = m + s u and u = mu + sigma z: in data units N(m + s mu, (s sigma)^2) per column
    return root / "models", {"mean": m + s * mu, "std": s * sigma}


def _log_density(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    z = (x - p["mean"]) / p["std"]
    return (-0.5 * z**2 - np.log(p["std"]) - 0.5 * math.log(2 * math.pi)).sum(1)


def test_the_plug_in_is_served_by_its_own_runtime(toy) -> None:
    models, params = toy
    rt = open_runtime(models / "toy-gauss")
    assert type(rt) is RUNTIMES[toy_family.FAMILY] is toy_family.DiagonalGaussianRuntime
    assert rt.manifest.family == toy_family.FAMILY and sorted(rt.manifest.graphs) == [
        "log_prob", "postprocess", "preprocess", "sample"]
    np.testing.assert_allclose(rt.log_likelihood(np.array(ROWS)).log_prob,
                               _log_density(np.array(ROWS), params), rtol=1e-5)


def test_all_three_verbs_over_http_and_grpc_equal_the_analytic_answers(toy,
                                                                     tmp_path: Path) -> None:
    models, params = toy
    env = {"GENSERVE_PLUGINS": "toy_family", "PYTHONPATH": str(ROOT / "tests")}
    with running_server(models, tmp_path / "server.log", env=env) as server:
        status, out = server.post("/models", {})
        assert status == 200, out
        card = next(m for m in out["models"] if m["name"] == "toy-gauss")
        assert card["family"] == toy_family.FAMILY and card["solvers"] == ["exact"]

        status, out = server.post("/sample", {"model": "toy-gauss", "n": 5, "seed": 11})
        assert status == 200, out
        z = np.random.default_rng(11).standard_normal((5, 2))  # the runtime's seeded noise
        np.testing.assert_allclose(out["samples"], params["mean"] + params["std"] * z,
                                   rtol=1e-5, atol=1e-5)

        status, out = server.post("/log_likelihood", {"model": "toy-gauss", "x": ROWS})
        assert status == 200, out
        analytic = _log_density(np.array(ROWS), params)
        np.testing.assert_allclose(out["log_likelihood"], analytic, rtol=1e-5)
        assert out["method"] == "exact"

        status, out = server.post("/anomaly_score", {"model": "toy-gauss", "x": ROWS})
        assert status == 200, out
        np.testing.assert_allclose(out["scores"], -analytic, rtol=1e-5)
        assert out["is_anomaly"] == [False, False, True]

        status, out = server.post("/log_likelihood", {"model": "toy-gauss", "x": ROWS,
                                                      "method": "hutchinson"})
        assert status == 400 and "its likelihood is exact" in out["error"]

        client = triton.InferenceServerClient(server.grpc_address)
        x = triton.InferInput("x", [len(ROWS), 2], "FP32")
        x.set_data_from_numpy(np.array(ROWS, dtype=np.float32))
        got = client.infer("toy-gauss.log_likelihood", [x]).as_numpy("log_likelihood")
        np.testing.assert_allclose(got, analytic, rtol=1e-5)
        got = client.infer("toy-gauss.anomaly_score", [x]).as_numpy("scores")
        np.testing.assert_allclose(got, -analytic, rtol=1e-5)
        n = triton.InferInput("n", [1], "INT64")
        n.set_data_from_numpy(np.array([5], dtype=np.int64))
        got = client.infer("toy-gauss.sample", [n], parameters={"seed": 11}).as_numpy("samples")
        np.testing.assert_allclose(got, params["mean"] + params["std"] * z, rtol=1e-5,
                                   atol=1e-5)
        meta = client.get_model_metadata("toy-gauss.log_likelihood")
        assert meta.platform == f"genserve_{toy_family.FAMILY}"
        client.close()
