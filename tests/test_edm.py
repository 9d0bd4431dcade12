"""EDM (Karras et al. 2022): an analytic Gaussian oracle, forward-mode derivatives, the sigma
steps and both samplers, training, export parity and serving over HTTP and gRPC.

For data ``N(0, s^2 I)`` the ideal denoiser is ``D(x; sigma) = s^2 / (s^2 + sigma^2) x`` and
``x_sigma ~ N(0, (s^2 + sigma^2) I)``: the oracle below is the network ``F`` whose
preconditioned denoiser is exactly that one, for any ``sigma_data``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from torch import Tensor, nn
from torch.autograd.functional import jacobian
from toys import fit, mixture

from numerics.schedules import EDMPreconditioning, rho_grid
from service.runtime import SeededRows, open_runtime
from training.config import ModelConfig
from training.edm import EDMModel, build_edm
from training.metrics import wasserstein2
from training.registry import build_model

SCALE = 0.8  # the data's std; the oracle's preconditioning assumes sigma_data = 0.5
CFG = ModelConfig(hidden_features=128, hidden_layers=2, time_embedding=8)
ROWS = [[0.5, 0.25], [1.0, -0.3], [-0.8, 0.6]]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class GaussianF(nn.Module):
    """The exact ``F`` for data ``N(0, scale^2 I)``: ``D = c_skip x + c_out F(c_in x)`` must
    equal ``g x`` with ``g = s^2 / (s^2 + sigma^2)``, so ``F(u) = (g - c_skip) / (c_out c_in)
    u``; sigma is recovered from ``c_noise``."""

    def __init__(self, precond: EDMPreconditioning, scale: float) -> None:
        super().__init__()
        self.precond, self.scale = precond, scale
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def gain(self, c_noise: Tensor) -> Tensor:
        p = self.precond
        lo, hi = math.log(p.sigma_min), math.log(p.sigma_max)
        sigma = torch.exp(lo + c_noise * (hi - lo))
        g = self.scale**2 / (self.scale**2 + sigma**2)
        return (g - p.c_skip(sigma)) / (p.c_out(sigma) * p.c_in(sigma))

    def forward(self, u: Tensor, c_noise: Tensor) -> Tensor:
        return self.gain(c_noise)[:, None] * u

    def jvp(self, u: Tensor, c_noise: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        return self(u, c_noise), self.gain(c_noise)[:, None] * e

    def divergence(self, u: Tensor, c_noise: Tensor) -> tuple[Tensor, Tensor]:
        return self(u, c_noise), self.gain(c_noise) * u.shape[1]


def oracle_model(sigma_data: float = 0.5, scale: float = SCALE, dim: int = 3,
                 churn: tuple = (0.0, 0.0, None, 1.0)) -> EDMModel:
    precond = EDMPreconditioning(sigma_data, 0.002, 80.0)
    return EDMModel(dim, GaussianF(precond, scale), precond, churn=churn)  # type: ignore[arg-type]


def gaussian_log_density(x: Tensor, var: float) -> Tensor:
    return -0.5 * x.square().sum(1) / var - 0.5 * x.shape[1] * math.log(2 * math.pi * var)


# --- the preconditioned denoiser of a Gaussian ------------------------------------------------


def test_preconditioned_denoiser_of_a_gaussian_is_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.002, 0.05, 0.5, 3.0, 80.0], dtype=torch.float64)
    ideal = SCALE**2 / (SCALE**2 + sigma[:, None] ** 2) * x
    # sigma_data = the data's std: the skip connection alone is the ideal denoiser (F = 0)
    precond = EDMPreconditioning(SCALE, 0.002, 80.0)
    zero = build_edm(3, CFG.model_copy(update={"sigma_data": SCALE})).double()
    torch.nn.init.zeros_(zero.net.output.weight)
    torch.nn.init.zeros_(zero.net.output.bias)
    torch.testing.assert_close(zero.denoise(x, sigma), ideal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(precond.c_skip(sigma)[:, None] * x, ideal)
    # any other sigma_data: the oracle F through the preconditioning gives the same denoiser
    model = oracle_model(0.5)
    torch.testing.assert_close(model.denoise(x, sigma), ideal, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model.velocity(x, sigma), (x - ideal) / sigma[:, None])


def test_training_loss_is_minimised_by_the_ideal_denoiser() -> None:
    model = oracle_model(0.5, dim=2)
    x = SCALE * torch.randn(20_000, 2, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)
    exact = model.training_loss(x, torch.Generator().manual_seed(1))
    model.net.scale = 0.9  # the denoiser of N(0, 0.9^2 I)
    assert exact < model.training_loss(x, torch.Generator().manual_seed(1))
    # lambda(sigma) c_out^2 = 1: the loss is the unit-weight regression of F
    p = model.precond
    s = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    torch.testing.assert_close(p.loss_weight(s) * p.c_out(s) ** 2, torch.ones(3,
                               dtype=torch.float64))


def test_heun_on_the_rho_grid_is_edm_algorithm_1() -> None:
    """The shared solver's ``heun`` on the sigma steps equals the paper's loop, step for step
    (algorithm 1, but its last step ends at sigma_min with a Heun step, not at 0)."""
    model = oracle_model(0.5)
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = z * model.noise_std
    ours = model.transport(x, steps=10, solver="heun")
    t = torch.as_tensor(rho_grid(80.0, 0.002, 10, 7.0), dtype=torch.float64)
    assert t[0] == 80.0 and t[-1] == 0.002 and (t[1:] < t[:-1]).all()
    for i in range(10):  # Karras et al. 2022, algorithm 1, lines 4-8
        d = (x - model.denoise(x, t[i].expand(6))) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        d2 = (x_next - model.denoise(x_next, t[i + 1].expand(6))) / t[i + 1]
        x = x + (t[i + 1] - t[i]) * 0.5 * (d + d2)
    torch.testing.assert_close(ours, x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", ["heun", "edm_stochastic", "rk4"])
def test_samplers_reproduce_the_gaussian_moments(solver: str) -> None:
    """Second order: Heun's std is 5 % high at 16 sigma steps, 1.3 % at 32, 0.3 % at 64 on
    this Gaussian (RK4: 0.1 % at 16); churn adds its own first-order error (2 % at 64)."""
    model = oracle_model(0.5, churn=(10.0, 0.05, 10.0, 1.0))
    steps = {"heun": 32, "edm_stochastic": 64, "rk4": 16}[solver]
    x = model.sample(4000, torch.Generator().manual_seed(0), steps=steps, solver=solver)
    target = math.sqrt(SCALE**2 + 0.002**2)
    assert x.std(0).numpy() == pytest.approx([target] * 3, rel=0.04)
    assert x.mean(0).abs().max().item() < 0.05
    assert torch.cov(x.T).fill_diagonal_(0).abs().max().item() < 0.04


def test_default_sigma_range_makes_heun_accurate_at_8_nfe() -> None:
    """With the exact denoiser of ``N(0, 0.8^2 I)``, 4 Heun steps (8 NFE) on the default sigma
    range and rho grid give a std 7 % high (20 000 draws), 8 steps 2 %; from the paper's image
    defaults (sigma_max 80, rho 7) the std is 105 % high at 8 NFE and 25 % at 16: the rho grid
    then spends half of the steps above sigma = 2.5, where every trajectory is a straight
    line."""
    cfg = ModelConfig()
    assert cfg.edm_sigma_top == 3.0 * cfg.edm_data_std and cfg.rho == 2.0
    assert (cfg.edm_data_std, cfg.sigma_data) == (1.0, 0.5)
    assert ModelConfig(edm_data_std=0.5).edm_sigma_top == 1.5
    assert ModelConfig(edm_sigma_max=80.0).edm_sigma_top == 80.0
    target = math.sqrt(SCALE**2 + 0.002**2)

    def std_error(cfg: ModelConfig, steps: int) -> float:
        model = build_edm(2, cfg).double()
        model.net = GaussianF(model.precond, SCALE)
        x = model.sample(20_000, torch.Generator().manual_seed(0), steps=steps, solver="heun")
        return x.std(0).mean().item() / target - 1

    rows = cfg.model_copy(update={"edm_data_std": SCALE})  # the rows' std sets the base
    assert abs(std_error(rows, 4)) < 0.1 and abs(std_error(rows, 8)) < 0.04
    paper = rows.model_copy(update={"edm_sigma_max": 80.0, "rho": 7.0})
    assert std_error(paper, 4) > 0.8 and std_error(paper, 8) > 0.2


def test_sigma_data_below_the_rows_std_gives_the_target_a_linear_part() -> None:
    """At ``sigma_data`` = the rows' std, the skip connection is the best linear denoiser: the
    training target ``(x - c_skip x_sigma) / c_out`` has no linear part in the network's input
    ``c_in x_sigma``, so a network near 0 sees almost no gradient on symmetric data. The
    default ``sigma_data`` (0.5, below standardized rows' std of 1) leaves a linear part."""
    x = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def linear_part(sigma_data: float, sigma: float) -> float:
        p = EDMPreconditioning(sigma_data, 0.002, 80.0)
        s = torch.full((len(x),), sigma, dtype=torch.float64)
        x_sigma = x + sigma * n
        target = (x - p.c_skip(s)[:, None] * x_sigma) / p.c_out(s)[:, None]
        u = p.c_in(s)[:, None] * x_sigma
        return torch.linalg.lstsq(u, target).solution.abs().max().item()

    for sigma in (0.1, 0.3, 1.0, 3.0):  # sigmas at which the modes of toy sets are told apart
        assert linear_part(1.0, sigma) < 0.01
        assert linear_part(ModelConfig().sigma_data, sigma) > 0.1


def test_stochastic_sampler_is_seeded_and_churns() -> None:
    churned = oracle_model(0.5, churn=(30.0, 0.01, 10.0, 1.0))
    plain = oracle_model(0.5)

    def draw(model: EDMModel, seed: int) -> Tensor:
        return model.sample(8, torch.Generator().manual_seed(seed), steps=8,
                            solver="edm_stochastic")

    torch.testing.assert_close(draw(churned, 3), draw(churned, 3), rtol=0, atol=0)
    assert not torch.equal(draw(churned, 3), draw(churned, 4))
    # no churn: the stochastic sampler is the deterministic Heun sampler
    heun = plain.sample(8, torch.Generator().manual_seed(3), steps=8, solver="heun")
    torch.testing.assert_close(draw(plain, 3), heun, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(draw(churned, 3), heun)


def test_pf_ode_likelihood_is_the_gaussian_density() -> None:
    model = oracle_model(SCALE)  # base N(0, (80^2 + s^2) I) is then exact
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = gaussian_log_density(x, SCALE**2 + 0.002**2)
    exact = model.log_prob(x, method="exact", solver="dopri5", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(exact, truth, rtol=0, atol=1e-4)
    fixed = model.log_prob(x, method="exact", solver="rk4", steps=32)  # on the rho grid
    torch.testing.assert_close(fixed, truth, rtol=0, atol=1e-3)
    hutch = model.log_prob(x, method="hutchinson", solver="rk4", steps=32, probes=2)
    torch.testing.assert_close(hutch, truth, rtol=0, atol=1e-3)
    # another sigma_data: same field, only the base's std differs from the true marginal
    other = oracle_model(0.5).log_prob(x, method="exact", solver="dopri5", rtol=1e-7,
                                       atol=1e-7)
    torch.testing.assert_close(other, truth, rtol=0, atol=1e-3)


def test_velocity_div_and_jvp_match_autograd() -> None:
    torch.manual_seed(0)
    model = build_edm(3, CFG).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    e = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0.002, 0.3, 4.0, 80.0], dtype=torch.float64)
    jac = torch.stack([jacobian(lambda xi, ti=ti: model.velocity(xi[None], ti[None])[0], xi)
                       for xi, ti in zip(x, t, strict=True)])
    v, div = model.velocity_div(x, t)
    torch.testing.assert_close(v, model.velocity(x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div, jac.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-9,
                               atol=1e-8)
    v2, jv = model.velocity_jvp(x, t, e)
    torch.testing.assert_close(v2, v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jv, torch.einsum("bij,bj->bi", jac, e), rtol=1e-9, atol=1e-8)


# --- configuration and training ------------------------------------------------------------


def test_registry_and_config() -> None:
    cfg = CFG.model_copy(update={"edm_sigma_max": 40.0, "sigma_data": 0.7, "rho": 5.0,
                                 "s_churn": 2.0})
    model = build_model("edm", 3, cfg)
    assert isinstance(model, EDMModel) and model.family == "edm"
    assert (model.t_min, model.t_max, model.rho, model.s_churn) == (0.002, 40.0, 5.0, 2.0)
    # the base's std is the rows' (edm_data_std, 1), not the preconditioning's sigma_data
    assert model.noise_std == pytest.approx(math.sqrt(40.0**2 + 1.0))
    wide = build_model("edm", 3, cfg.model_copy(update={"edm_data_std": 2.0}))
    assert wide.noise_std == pytest.approx(math.sqrt(40.0**2 + 4.0))
    spec = model.time_spec()
    assert (spec.t_min, spec.t_max, spec.rho, spec.sigma_data) == (0.002, 40.0, 5.0, 0.7)
    with pytest.raises(ValueError, match="unknown EDM solver"):
        model.sample(2, solver="ddim")
    with pytest.raises(ValueError, match="edm_sigma_min < edm_sigma_max"):
        ModelConfig(edm_sigma_min=0.5, edm_sigma_max=0.4)
    with pytest.raises(ValueError, match="s_tmin <= s_tmax"):
        ModelConfig(s_tmin=2.0, s_tmax=1.0)


def test_cli_refuses_a_bad_sigma_range_in_one_line(tmp_path: Path, capsys) -> None:
    from cli import main

    code = main(["train", "--model", "edm", "--data", "moons", "--out", str(tmp_path / "c"),
                 "--edm-sigma-min", "0.9", "--edm-sigma-max", "0.5", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "edm_sigma_min < edm_sigma_max" in err and "Traceback" not in err


def test_trained_edm_samples_the_mixture() -> None:
    torch.manual_seed(0)
    model = fit(build_edm(2, CFG), 1000)
    held_out = mixture(1000, seed=7)
    base = wasserstein2(torch.randn(1000, 2, generator=torch.Generator().manual_seed(8)).numpy(),
                        held_out.numpy())
    for solver in ("heun", "edm_stochastic"):
        x = model.sample(1000, torch.Generator().manual_seed(0), steps=12, solver=solver)
        w2 = wasserstein2(x.numpy(), held_out.numpy())
        assert w2 < 0.3 < base / 2.5, (solver, w2, base)


# --- export, served runtime, HTTP and gRPC -----------------------------------------------------


def test_export_parity_and_batch_independence(artifact_factory, checkpoint_factory) -> None:
    from training.checkpoint import load_checkpoint

    folder = artifact_factory("edm")
    onnx, ts = open_runtime(folder, runtime="onnx"), open_runtime(folder, runtime="torchscript")
    assert onnx.family == "edm" and onnx.manifest.time.rho == ModelConfig().rho
    assert onnx.manifest.time.t_max == 3.0 and onnx.manifest.defaults.solver == "heun"
    model = load_checkpoint(checkpoint_factory("edm")).model.double()
    g = np.random.default_rng(0)
    x, e = g.standard_normal((5, 2)), g.standard_normal((5, 2))
    t = np.array([0.002, 0.1, 1.0, 10.0, 80.0])
    with torch.no_grad():
        want = [o.numpy() for o in (model.velocity(*map(torch.as_tensor, (x, t))),
                                    *model.velocity_div(*map(torch.as_tensor, (x, t))),
                                    *model.velocity_jvp(*map(torch.as_tensor, (x, t, e))))]
    for rt in (onnx, ts):
        got = [*rt.call("velocity", x, t), *rt.call("velocity_div", x, t),
               *rt.call("velocity_jvp", x, t, e)]
        for a, b in zip(got, want[:1] + want[1:3] + want[3:], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    rows = np.array(ROWS)
    for opts in ({}, {"method": "hutchinson", "steps": 8, "solver": "rk4", "probes": 4}):
        a, b = onnx.log_likelihood(rows, **opts), ts.log_likelihood(rows, **opts)
        np.testing.assert_allclose(a.log_prob, b.log_prob, rtol=1e-4, atol=1e-3)
    for solver in ("heun", "edm_stochastic"):
        alone = [onnx.sample(3, seed=1, solver=solver, steps=6),
                 onnx.sample(2, seed=5, solver=solver, steps=6)]
        together = onnx.sample_many([SeededRows(3, 1), SeededRows(2, 5)], solver=solver,
                                    steps=6)
        for a, b in zip(alone, together.blocks, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(onnx.sample(3, seed=1, solver=solver, steps=6),
                                   ts.sample(3, seed=1, solver=solver, steps=6), atol=1e-3)


def test_http_and_grpc_equal_the_in_process_runtime(families_models: Path,
                                                   families_server) -> None:
    server, rt = families_server, open_runtime(families_models / "moons-edm")
    status, out = server.post("/models", {})
    assert status == 200, out
    card = next(m for m in out["models"] if m["name"] == "moons-edm")
    assert card["family"] == "edm" and "edm_stochastic" in card["solvers"]
    assert card["time"]["t_min"] == 0.002 and card["time"]["t_max"] == 3.0
    assert card["time"]["rho"] == ModelConfig().rho and card["defaults"]["solver"] == "heun"
    for solver in ("heun", "edm_stochastic"):
        status, out = server.post("/sample", {"model": "moons-edm", "n": 4, "seed": 9,
                                              "solver": solver, "steps": 6})
        assert status == 200, out
        np.testing.assert_array_equal(out["samples"],
                                      rt.sample(4, seed=9, solver=solver, steps=6))
    x = np.array(ROWS)
    status, out = server.post("/log_likelihood", {"model": "moons-edm", "x": ROWS})
    assert status == 200, out
    want = rt.log_likelihood(x)
    np.testing.assert_array_equal(out["log_likelihood"], want.log_prob)
    status, out = server.post("/anomaly_score", {"model": "moons-edm", "x": ROWS})
    assert status == 200, out
    np.testing.assert_array_equal(out["scores"], rt.anomaly_score(x).scores)
    status, out = server.post("/sample", {"model": "moons-edm", "n": 2, "solver": "ddim"})
    assert status == 400 and "edm_stochastic" in out["error"]

    client = triton.InferenceServerClient(server.grpc_address)
    try:
        inp = triton.InferInput("x", [len(ROWS), 2], "FP64")
        inp.set_data_from_numpy(x)
        got = client.infer("moons-edm.log_likelihood", [inp]).as_numpy("log_likelihood")
        np.testing.assert_array_equal(got, want.log_prob)
        n = triton.InferInput("n", [1], "INT64")
        n.set_data_from_numpy(np.array([4], dtype=np.int64))
        got = client.infer("moons-edm.sample", [n], parameters={
            "seed": 9, "solver": "edm_stochastic", "steps": 6}).as_numpy("samples")
        np.testing.assert_array_equal(got, rt.sample(4, seed=9, solver="edm_stochastic",
                                                     steps=6))
    finally:
        client.close()
