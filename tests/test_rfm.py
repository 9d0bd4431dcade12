"""Riemannian flow matching on the sphere and the torus: tangency, the manifold kept through
every solver, the uniform base's likelihood, the vMF mixture's exact density approached, export
parity, and serving over HTTP and gRPC with rows off the manifold refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from torch.autograd.functional import jacobian
from tritonclient.utils import InferenceServerException

from numerics.manifolds import Sphere, Torus
from numerics.solvers import SOLVERS
from service.runtime import SeededRows, open_runtime
from training.config import ModelConfig, TrainConfig
from training.data import load_data, true_log_density
from training.evaluate import data_log_prob
from training.fit import fit
from training.registry import build_model
from training.rfm import RiemannianFlowMatching

CFG = ModelConfig(hidden_features=32, hidden_layers=2, time_embedding=8)
CASES = [("sphere", 3), ("torus", 2)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model_on(name: str, dim: int) -> RiemannianFlowMatching:
    torch.manual_seed(0)
    return build_model("rfm", dim, CFG.model_copy(update={"manifold": name})).double()


def off(name: str, x: np.ndarray) -> float:
    return float((Sphere() if name == "sphere" else Torus()).off_manifold(x).max())


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_velocities_are_tangent_and_derivatives_match_autograd(name: str, dim: int) -> None:
    model = model_on(name, dim)
    g = torch.Generator().manual_seed(1)
    x = model.noise(5, g).double()
    t = torch.rand(5, generator=g, dtype=torch.float64)
    e = torch.randn(5, dim, generator=g, dtype=torch.float64)
    v, div = model.velocity_div(x, t)
    if name == "sphere":
        assert (v * x).sum(1).abs().max() < 1e-12  # tangent: orthogonal to the point
        # the field is constant along rays, so it is tangent off the sphere too
        torch.testing.assert_close(model.velocity(3 * x, t), v)
    jac = torch.stack([jacobian(lambda xi, ti=ti: model.velocity(xi[None], ti[None])[0], xi)
                       for xi, ti in zip(x, t, strict=True)])
    torch.testing.assert_close(div, jac.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-9,
                               atol=1e-10)
    v2, jv = model.velocity_jvp(x, t, e)
    torch.testing.assert_close(v2, v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jv, torch.einsum("bij,bj->bi", jac, e), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_geodesic_target_is_the_path_velocity(name: str, dim: int) -> None:
    m = Sphere() if name == "sphere" else Torus()
    g = torch.Generator().manual_seed(2)
    x0 = m.uniform_from_normal(torch.randn(6, dim, generator=g, dtype=torch.float64))
    x1 = m.uniform_from_normal(torch.randn(6, dim, generator=g, dtype=torch.float64))
    h = 1e-6
    for t in (0.2, 0.5, 0.8):
        at = torch.full((6,), t, dtype=torch.float64)
        x_t, u_t = m.geodesic(x0, x1, at)
        fd = m.retract(m.geodesic(x0, x1, at + h)[0] - m.geodesic(x0, x1, at - h)[0]) \
            if name == "torus" else m.geodesic(x0, x1, at + h)[0] - m.geodesic(x0, x1, at - h)[0]
        torch.testing.assert_close(u_t, fd / (2 * h), rtol=1e-5, atol=1e-6)
        assert off(name, x_t.numpy()) < 1e-12
        if name == "sphere":
            assert (u_t * x_t).sum(1).abs().max() < 1e-12
    torch.testing.assert_close(m.geodesic(x0, x1, torch.zeros(6, dtype=torch.float64))[0], x0)
    torch.testing.assert_close(m.geodesic(x0, x1, torch.ones(6, dtype=torch.float64))[0], x1)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(("name", "dim"), CASES)
def test_samples_stay_on_the_manifold_through_every_solver(name: str, dim: int,
                                                           solver: str) -> None:
    model = model_on(name, dim)
    x = model.sample(200, torch.Generator().manual_seed(0), steps=6, solver=solver)
    assert off(name, x.numpy()) < 1e-5


@pytest.mark.parametrize(("name", "dim"), CASES)
def test_the_uniform_base_has_log_density_minus_log_volume(name: str, dim: int) -> None:
    model = model_on(name, dim)
    torch.nn.init.zeros_(model.net.output.weight)  # v = 0: the model is its base
    torch.nn.init.zeros_(model.net.output.bias)
    x = model.noise(7, torch.Generator().manual_seed(3)).double()
    log_vol = math.log(4 * math.pi) if name == "sphere" else 2 * math.log(2 * math.pi)
    assert model.manifold.log_volume(dim) == pytest.approx(log_vol, rel=1e-12)
    for method in ("exact", "hutchinson"):
        lp = model.log_prob(x, method=method, solver="rk4", steps=4)
        torch.testing.assert_close(lp, torch.full((7,), -log_vol, dtype=torch.float64))


def test_trained_on_the_vmf_mixture_the_likelihood_approaches_the_exact_one() -> None:
    ckpt = fit("rfm", "vmf_s2", rows=4000,
               model_cfg=ModelConfig(hidden_features=64, hidden_layers=2, time_embedding=8,
                                     manifold="sphere"),
               train_cfg=TrainConfig(steps=800, batch_size=256, lr=3e-3, eval_every=800,
                                     warmup_steps=20, progress=False))
    x = load_data("vmf_s2", n=300, seed=99).x
    truth = true_log_density("vmf_s2")(x)
    lp = data_log_prob(ckpt, x, method="exact", solver="rk4", steps=16)["log_prob"]
    uniform = -math.log(4 * math.pi)
    # the exact density is 1.45 nats above the uniform one; the model gets most of the way
    assert (truth - lp).mean() < 0.3 < truth.mean() - uniform


def test_config_needs_a_manifold(tmp_path: Path, capsys) -> None:
    from cli import main

    with pytest.raises(ValueError, match="--manifold sphere"):
        build_model("rfm", 3, CFG)
    code = main(["train", "--model", "rfm", "--data", "vmf_s2", "--out", str(tmp_path / "c"),
                 "--no-progress", "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--manifold" in err


# --- export and serving ------------------------------------------------------------------------


def test_export_parity_and_batch_independence(artifact_factory, checkpoint_factory) -> None:
    from training.checkpoint import load_checkpoint

    folder = artifact_factory("rfm")
    onnx, ts = open_runtime(folder, runtime="onnx"), open_runtime(folder, runtime="torchscript")
    assert onnx.family == "rfm" and onnx.manifest.manifold.name == "sphere"
    ckpt = load_checkpoint(checkpoint_factory("rfm"))
    x = load_data("vmf_s2", n=6, seed=5).x
    eager = data_log_prob(ckpt, x, method="exact", solver="rk4", steps=8)["log_prob"]
    for rt in (onnx, ts):
        served = rt.log_likelihood(x, solver="rk4", steps=8).log_prob
        np.testing.assert_allclose(served, eager, atol=1e-4)
        for solver in ("rk4", "dopri5"):
            samples = rt.sample(50, seed=3, solver=solver, steps=8)
            assert off("sphere", samples) < 1e-5
    alone = [onnx.sample(3, seed=1), onnx.sample(2, seed=5)]
    together = onnx.sample_many([SeededRows(3, 1), SeededRows(2, 5)])
    for a, b in zip(alone, together.blocks, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_http_and_grpc_equal_in_process_and_refuse_rows_off_the_sphere(
        families_models: Path, families_server) -> None:
    server, rt = families_server, open_runtime(families_models / "moons-rfm")
    status, out = server.post("/models", {})
    assert status == 200, out
    card = next(m for m in out["models"] if m["name"] == "moons-rfm")
    assert card["family"] == "rfm" and card["manifold"] == {"name": "sphere",
                                                             "tolerance": 1e-4}
    x = load_data("vmf_s2", n=4, seed=7).x
    status, out = server.post("/log_likelihood", {"model": "moons-rfm", "x": x.tolist()})
    assert status == 200, out
    np.testing.assert_array_equal(out["log_likelihood"], rt.log_likelihood(x).log_prob)
    status, out = server.post("/sample", {"model": "moons-rfm", "n": 5, "seed": 4})
    assert status == 200, out
    np.testing.assert_array_equal(out["samples"], rt.sample(5, seed=4))
    status, out = server.post("/anomaly_score", {"model": "moons-rfm", "x": x.tolist()})
    assert status == 200, out
    np.testing.assert_array_equal(out["scores"], rt.anomaly_score(x).scores)

    bad = x.copy()
    bad[2] *= 1.01
    want = ("'x' row 2 is 0.01 off the manifold; model 'moons-rfm' takes points on the "
            "sphere S^2: unit norm within 0.0001")
    for verb in ("log_likelihood", "anomaly_score"):
        status, out = server.post(f"/{verb}", {"model": "moons-rfm", "x": bad.tolist()})
        assert status == 400 and out["error"] == want, out

    client = triton.InferenceServerClient(server.grpc_address)
    try:
        inp = triton.InferInput("x", list(x.shape), "FP64")
        inp.set_data_from_numpy(x)
        got = client.infer("moons-rfm.log_likelihood", [inp]).as_numpy("log_likelihood")
        np.testing.assert_array_equal(got, rt.log_likelihood(x).log_prob)
        inp.set_data_from_numpy(bad)
        with pytest.raises(InferenceServerException) as info:
            client.infer("moons-rfm.log_likelihood", [inp])
        assert "INVALID_ARGUMENT" in str(info.value.status()) and want in info.value.message()
    finally:
        client.close()


def test_torus_rows_outside_the_wrapped_square_are_refused_in_one_line() -> None:
    from service.schemas import ModelInfo
    from service.validation import RequestError, check_rows

    card = ModelInfo(name="angles", family="rfm", model_type="rfm", dim=2, shape=[2],
                     graphs=[], runtime="onnx", solvers=list(SOLVERS), defaults={},
                     calibration=None, manifold={"name": "torus", "tolerance": 1e-4})
    ok = [[-math.pi, math.pi], [0.5, -3.0]]
    np.testing.assert_array_equal(check_rows(ok, card, 10), ok)
    with pytest.raises(RequestError) as info:
        check_rows([[math.pi + 0.5, 0.0], [0.1, 0.2]], card, 10)
    assert info.value.status == 400 and info.value.message == (
        "'x' row 0 is 0.5 off the manifold; model 'angles' takes points on the torus T^2: "
        "angles in [-pi, pi] within 0.0001")


def test_the_report_draws_samples_on_the_manifold(checkpoint_factory, tmp_path: Path) -> None:
    from report.manifolds import manifold_report

    summary = manifold_report(checkpoint_factory("rfm"), tmp_path, points=60, steps=8)
    assert (tmp_path / "manifold_samples.png").stat().st_size > 10_000
    assert summary["manifold"] == "sphere" and summary["rows"] == 60
    assert math.isfinite(summary["log_likelihood"]) and summary["exact_log_likelihood"] > -3
    with pytest.raises(ValueError, match="rfm models on S"):
        manifold_report(checkpoint_factory("edm"), tmp_path / "no")
