"""VP-SDE diffusion: forward-mode derivatives, an analytic Gaussian oracle, training, sampling.

Sample quality is the exact W2 between 1000 samples and 1000 held-out points
(``training.metrics.wasserstein2``) on a two-cluster mixture. Calibration: two independent
1000-point draws of the data are 0.13-0.18 apart, the moment-matched Gaussian 0.55-0.65 and
``N(0, I)`` about 0.9; a trained model must come within ``W2_BOUND`` = 0.3 (two clusters
found), with DPM-Solver++(2M) and with the probability-flow ODE.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian
from toys import CENTERS, fit, mixture  # noqa: F401

from numerics.schedules import make_schedule
from training.config import ModelConfig
from training.diffusion import DiffusionModel, build_ddpm
from training.metrics import wasserstein2
from training.registry import build_model

W2_BOUND = 0.3
CFG = ModelConfig(hidden_features=128, hidden_layers=2, time_embedding=8)
SOLVERS = ["ddpm", "ddim", "dpmpp2m", "euler", "heun", "midpoint", "rk4", "dopri5"]



class GaussianOracle(nn.Module):
    """The exact network for data ``N(0, scale^2 I)``: ``x_t ~ N(0, var_t I)`` with ``var_t =
    alpha^2 scale^2 + sigma^2``, so ``eps = sigma x / var_t`` and ``v = alpha eps - sigma
    E[x_0 | x_t] = alpha sigma (1 - scale^2) x / var_t``; both linear in ``x``."""

    def __init__(self, schedule: object, scale: float, prediction: str) -> None:
        super().__init__()
        self.schedule, self.scale, self.prediction = schedule, scale, prediction
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def gain(self, t: Tensor) -> Tensor:
        alpha, sigma = self.schedule.alpha(t), self.schedule.sigma(t)
        var = alpha**2 * self.scale**2 + sigma**2
        if self.prediction == "epsilon":
            return sigma / var
        return alpha * sigma * (1 - self.scale**2) / var

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.gain(t)[:, None] * x

    def jvp(self, x: Tensor, t: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        return self(x, t), self.gain(t)[:, None] * e

    def divergence(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self(x, t), self.gain(t) * x.shape[1]


def oracle_model(prediction: str, scale: float = 0.5, dim: int = 3) -> DiffusionModel:
    schedule = make_schedule("linear")
    net = GaussianOracle(schedule, scale, prediction)
    return DiffusionModel(dim, net, schedule, prediction, t_min=1e-3)  # type: ignore[arg-type]


def marginal_var(model: DiffusionModel, scale: float) -> float:
    t = torch.tensor([model.t_min], dtype=torch.float64)
    return float(model.schedule.alpha(t) ** 2 * scale**2 + model.schedule.sigma(t) ** 2)


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny MLPs run several times faster on one thread than on two busy ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> dict[str, DiffusionModel]:
    torch.manual_seed(0)
    return {
        p: fit(build_ddpm(2, CFG.model_copy(update={"prediction": p})), 1200)
        for p in ("epsilon", "v")
    }


def test_registry_wires_the_config() -> None:
    cfg = CFG.model_copy(update={"schedule": "cosine", "prediction": "v", "t_min": 0.01})
    model = build_model("ddpm", 3, cfg)
    assert isinstance(model, DiffusionModel)
    assert (model.family, model.dim, model.t_min, model.prediction) == ("diffusion", 3, 0.01, "v")
    assert type(model.schedule).__name__ == "CosineSchedule"
    linear = build_model("ddpm", 3, CFG.model_copy(update={"schedule": "linear",
                                                           "beta_max": 12.0}))
    assert linear.schedule.beta_max == 12.0
    with pytest.raises(ValueError, match="unknown diffusion solver"):
        linear.sample(2, solver="ancestral")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_velocity_div_and_jvp_match_autograd(prediction: str, schedule: str) -> None:
    torch.manual_seed(0)
    cfg = CFG.model_copy(update={"prediction": prediction, "schedule": schedule})
    model = build_ddpm(3, cfg).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    e = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.2, 0.7, 1.0], dtype=torch.float64)
    jac = torch.stack(
        [
            jacobian(lambda xi, ti=ti: model.velocity(xi[None], ti[None])[0], xi)
            for xi, ti in zip(x, t, strict=True)
        ]
    )
    v, div = model.velocity_div(x, t)
    torch.testing.assert_close(v, model.velocity(x, t), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div, jac.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-10, atol=1e-8)
    v2, jv = model.velocity_jvp(x, t, e)
    torch.testing.assert_close(v2, v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jv, torch.einsum("bij,bj->bi", jac, e), rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_training_target_is_minimised_by_the_oracle(prediction: str) -> None:
    """The oracle is the regression function, so it beats a slightly perturbed oracle."""
    model = oracle_model(prediction, dim=2)
    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(20_000, 2, generator=g, dtype=torch.float64)
    exact = model.training_loss(x, torch.Generator().manual_seed(1))
    model.net.scale = 0.6  # a wrong oracle: the network of N(0, 0.6^2 I)
    wrong = model.training_loss(x, torch.Generator().manual_seed(1))
    assert exact < wrong


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_oracle_likelihood_is_the_gaussian_density(prediction: str) -> None:
    model = oracle_model(prediction)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    var = marginal_var(model, 0.5)
    truth = -0.5 * x.square().sum(1) / var - 1.5 * math.log(2 * math.pi * var)
    exact = model.log_prob(x, method="exact", solver="dopri5", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(exact, truth, rtol=0, atol=2e-3)
    hutch = model.log_prob_with_error(x, method="hutchinson", solver="rk4", steps=200, probes=4)
    # A linear field has J = c I, so every Rademacher probe gives the exact trace.
    torch.testing.assert_close(hutch.log_prob, truth, rtol=0, atol=2e-3)


@pytest.mark.parametrize("solver", ["ddpm", "ddim", "dpmpp2m", "rk4"])
def test_oracle_samples_have_the_right_spread(solver: str) -> None:
    model = oracle_model("v")
    steps = {"ddpm": 200, "ddim": 50, "dpmpp2m": 25, "rk4": 50}[solver]
    x = model.sample(4000, torch.Generator().manual_seed(0), steps=steps, solver=solver)
    assert x.std().item() == pytest.approx(math.sqrt(marginal_var(model, 0.5)), rel=0.05)


@pytest.mark.parametrize("solver", ["dpmpp2m", "rk4"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_trained_samples_meet_w2_bound(
    trained: dict[str, DiffusionModel], prediction: str, solver: str
) -> None:
    held_out = mixture(1000, seed=7)
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(8))
    base = wasserstein2(noise.numpy(), held_out.numpy())
    steps = {"dpmpp2m": 25, "rk4": 25}[solver]
    x = trained[prediction].sample(1000, torch.Generator().manual_seed(0), steps, solver)
    w2 = wasserstein2(x.numpy(), held_out.numpy())
    assert w2 < W2_BOUND < base / 2.5, (w2, base)


@pytest.mark.parametrize("solver", SOLVERS)
def test_seeded_sampling_is_reproducible(trained: dict[str, DiffusionModel], solver: str) -> None:
    model = trained["epsilon"]

    def draw(seed: int) -> Tensor:
        return model.sample(8, torch.Generator().manual_seed(seed), steps=6, solver=solver)

    torch.testing.assert_close(draw(3), draw(3), rtol=0, atol=0)
    assert not torch.equal(draw(3), draw(4))


def test_log_prob_exact_and_hutchinson_agree(trained: dict[str, DiffusionModel]) -> None:
    model = trained["epsilon"]
    x = mixture(64, seed=9)
    exact = model.log_prob_with_error(x, method="exact")
    hutch = model.log_prob_with_error(x, method="hutchinson", probes=8, seed=0)
    assert exact.log_prob.shape == (64,) and torch.isfinite(exact.log_prob).all()
    assert exact.std_error is None
    se = torch.as_tensor(hutch.std_error)
    gap = hutch.log_prob - exact.log_prob
    assert (se > 0).all() and (gap.abs() <= 3 * se).float().mean() >= 0.9
    assert gap.mean().abs() <= 3 * se.square().sum().sqrt() / len(x)
    # The trained density beats the standard normal on data and is low far from it.
    base = -0.5 * x.square().sum(1) - math.log(2 * math.pi)
    assert exact.log_prob.mean() > base.mean() + 0.3
    far = model.log_prob(torch.tensor([[0.0, 3.0]]))
    assert far.item() < exact.log_prob.min().item()
