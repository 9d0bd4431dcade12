"""Flow matching: matchers, OT pairing, forward-mode derivatives, training and reflow.

Sample quality is the exact W2 between 1000 model samples and 1000 held-out points
(``training.metrics.wasserstein2``) on a two-cluster mixture. Calibration on this mixture:
two independent 1000-point draws of the data are 0.13-0.18 apart (the floor, set mostly by
how many points fall in each cluster), the moment-matched Gaussian is 0.55-0.65 away, and
``N(0, I)`` about 0.9. A briefly trained model must come within ``W2_BOUND`` = 0.3: it has to
have split the mass into two clusters, which no unimodal fit does.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.autograd.functional import jacobian
from toys import CENTERS, fit, mixture  # noqa: F401

from training.config import ModelConfig, TrainConfig
from training.flow_matching import (
    ConditionalFlowMatcher,
    ExactOptimalTransportMatcher,
    FlowMatchingModel,
    ReflowMatcher,
    StochasticInterpolantMatcher,
    exact_ot_permutation,
)
from training.metrics import wasserstein2
from training.reflow import make_reflow_pairs, reflow
from training.registry import build_model

W2_BOUND = 0.3
CFG = ModelConfig(hidden_features=128, hidden_layers=2, time_embedding=8, gamma=0.5)
# (steps, batch): OT-CFM's exact assignment is O(batch^3), so it trains on smaller batches.
BUDGET = {"cfm": (800, 256), "otcfm": (500, 128), "si": (800, 256)}



class GaussianVelocity(nn.Module):
    """The exact field for data ``N(0, scale^2 I)`` on the linear path (``sigma_min = 0``):
    ``x_t ~ N(0, var_t I)``, ``var_t = (1 - t)^2 scale^2 + t^2``, so ``u(x, t) = x var_t' /
    (2 var_t) = x (t - (1 - t) scale^2) / var_t``, linear in ``x``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def gain(self, t: Tensor) -> Tensor:
        return (t - (1 - t) * self.scale**2) / ((1 - t) ** 2 * self.scale**2 + t**2)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.gain(t)[:, None] * x

    def jvp(self, x: Tensor, t: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:
        return self(x, t), self.gain(t)[:, None] * e

    def divergence(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self(x, t), self.gain(t) * x.shape[1]


def oracle_model(scale: float = 0.5) -> FlowMatchingModel:
    net = GaussianVelocity(scale)
    return FlowMatchingModel("cfm", 3, net, ConditionalFlowMatcher())  # type: ignore[arg-type]


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """Tiny MLPs run several times faster on one thread than on two busy ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained() -> dict[str, FlowMatchingModel]:
    torch.manual_seed(0)
    return {kind: fit(build_model(kind, 2, CFG), *BUDGET[kind]) for kind in BUDGET}


def test_exact_ot_equals_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    perm = exact_ot_permutation(x, z)
    cost = float((x - z[perm]).square().sum())
    brute = min(float((x - z[list(p)]).square().sum()) for p in itertools.permutations(range(6)))
    assert sorted(perm.tolist()) == list(range(6))
    assert cost == pytest.approx(brute, rel=1e-12)


def test_ot_pairs_cost_no_more_than_independent_pairs() -> None:
    g = torch.Generator().manual_seed(1)
    x, z = mixture(128, 1), torch.randn(128, 2, generator=g)
    xp, zp = ExactOptimalTransportMatcher().pair(x, z)
    torch.testing.assert_close(xp, x)
    assert float((xp - zp).square().sum()) < 0.8 * float((x - z).square().sum())
    assert sorted(map(tuple, zp.tolist())) == sorted(map(tuple, z.tolist()))


def test_conditional_ot_pairs_never_move_noise_across_classes() -> None:
    """Given each row's condition, the noise is re-paired within each class only (so a
    class's noise stays N(0, I)), optimally there; unique contexts leave pairs as drawn."""
    g = torch.Generator().manual_seed(3)
    x, z = mixture(60, 4), torch.randn(60, 2, generator=g)
    labels = torch.randint(3, (60,), generator=g)
    context = torch.eye(3)[labels]
    xp, zp = ExactOptimalTransportMatcher(block=16).pair(x, z, context=context)
    torch.testing.assert_close(xp, x)
    for k in range(3):
        rows = labels == k
        assert sorted(map(tuple, zp[rows].tolist())) == sorted(map(tuple, z[rows].tolist()))
        xk, zk = x[rows], z[rows]
        best = zk[ExactOptimalTransportMatcher(block=16)._permutation(xk, zk)]
        torch.testing.assert_close(zp[rows], best)
    global_ot = ExactOptimalTransportMatcher(block=16).pair(x, z)[1]
    assert not torch.equal(global_ot, zp)  # OT across classes would pair differently
    unique = torch.randn(60, 1, generator=g)
    torch.testing.assert_close(ExactOptimalTransportMatcher().pair(x, z, context=unique)[1], z)


def test_ot_pairs_large_batches_block_by_block() -> None:
    g = torch.Generator().manual_seed(2)
    x, z = torch.randn(10, 2, generator=g), torch.randn(10, 2, generator=g)
    _, zp = ExactOptimalTransportMatcher(block=4).pair(x, z)
    for start in (0, 4, 8):
        block = slice(start, start + 4)
        torch.testing.assert_close(zp[block], z[block][exact_ot_permutation(x[block], z[block])])


def test_ot_fails_loudly_on_bad_batches() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, generator=g)
    with pytest.raises(ValueError, match="non-finite"):
        exact_ot_permutation(x.index_fill(0, torch.tensor([1]), float("nan")),
                             torch.randn(4, 2, generator=g))
    with pytest.raises(ValueError, match="equal shapes"):
        exact_ot_permutation(x, torch.randn(5, 2, generator=g))


@pytest.mark.parametrize(
    "matcher",
    [ConditionalFlowMatcher(0.0), ConditionalFlowMatcher(0.1), StochasticInterpolantMatcher(0.7)],
    ids=["cfm", "cfm-sigma", "si"],
)
def test_target_is_the_path_velocity_and_ends_are_right(matcher: ConditionalFlowMatcher) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    z = torch.randn(5, 3, generator=g, dtype=torch.float64)

    def at(t: float) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(3)  # the same latent noise xi at every t
        return matcher.interpolate(x, z, torch.full((5,), t, dtype=torch.float64), g)

    h = 1e-6
    for t in (0.1, 0.5, 0.9):
        _, u = at(t)
        finite_difference = (at(t + h)[0] - at(t - h)[0]) / (2 * h)
        torch.testing.assert_close(u, finite_difference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(at(1.0)[0], z)  # base at t = 1 is exactly N(0, I)
    torch.testing.assert_close(at(0.0)[0], x + matcher.sigma_min * z)


def test_reflow_matcher_draws_only_bank_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    z, x = torch.randn(10, 2, generator=g), torch.randn(10, 2, generator=g)
    xp, zp = ReflowMatcher(z, x).pair(torch.zeros(32, 2), torch.zeros(32, 2))
    assert xp.shape == (32, 2)
    bank = {tuple(p) for p in torch.cat([x, z], 1).tolist()}
    assert {tuple(p) for p in torch.cat([xp, zp], 1).tolist()} <= bank


@pytest.mark.parametrize("a", [0.0, 2.0, 4.0])
def test_reflow_time_law_matches_its_cdf(a: float) -> None:
    """U-shaped reflow times: empirical CDF = (sinh(a(2t-1)) + sinh a) / (2 sinh a)."""
    matcher = ReflowMatcher(torch.zeros(4, 2), torch.zeros(4, 2), u_shape=a)
    t = matcher.sample_time(200_000, torch.Generator().manual_seed(0), torch.zeros(1))
    assert t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1
    grid = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    want = grid if a == 0 else (torch.sinh(a * (2 * grid - 1)) + math.sinh(a)) / (2 * math.sinh(a))
    got = (t.double()[:, None] <= grid).double().mean(0)
    torch.testing.assert_close(got, want, atol=4e-3, rtol=0)  # ~3.5 s.e. of a 200k-point CDF
    ends = ((t < 0.1) | (t > 0.9)).double().mean()
    assert (ends > 0.3) == (a > 0)  # uniform: 20 % near the ends; a = 2: 35 %, a = 4: 55 %
    with pytest.raises(ValueError, match="u_shape"):
        ReflowMatcher(torch.zeros(4, 2), torch.zeros(4, 2), u_shape=-1.0)


@pytest.mark.parametrize("kind", ["cfm", "otcfm", "si"])
def test_registry_builds_flow_matching(kind: str) -> None:
    model = build_model(kind, 3, CFG)
    assert isinstance(model, FlowMatchingModel)
    assert (model.family, model.dim, model.t_min, model.kind) == ("flow_matching", 3, 0.0, kind)
    g = torch.Generator().manual_seed(0)
    loss = model.training_loss(torch.randn(16, 3, generator=g), g)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_velocity_div_and_jvp_match_autograd() -> None:
    torch.manual_seed(0)
    model = build_model("cfm", 3, CFG).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    e = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.rand(4, generator=g, dtype=torch.float64)
    jac = torch.stack(
        [
            jacobian(lambda xi, ti=ti: model.velocity(xi[None], ti[None])[0], xi)
            for xi, ti in zip(x, t, strict=True)
        ]
    )
    v, div = model.velocity_div(x, t)
    torch.testing.assert_close(v, model.velocity(x, t))
    torch.testing.assert_close(div, jac.diagonal(dim1=-2, dim2=-1).sum(-1), rtol=1e-10, atol=1e-10)
    _, jv = model.velocity_jvp(x, t, e)
    torch.testing.assert_close(jv, torch.einsum("bij,bj->bi", jac, e), rtol=1e-10, atol=1e-10)


def test_training_target_is_minimised_by_the_oracle() -> None:
    model = oracle_model(0.5)
    g = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(20_000, 3, generator=g, dtype=torch.float64)
    exact = model.training_loss(x, torch.Generator().manual_seed(1))
    model.net.scale = 0.6  # the field of N(0, 0.6^2 I)
    assert exact < model.training_loss(x, torch.Generator().manual_seed(1))


def test_oracle_likelihood_and_samples_are_the_gaussian() -> None:
    model = oracle_model(0.5)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    truth = -0.5 * x.square().sum(1) / 0.25 - 1.5 * math.log(2 * math.pi * 0.25)
    exact = model.log_prob(x, method="exact", solver="dopri5", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(exact, truth, rtol=0, atol=1e-4)
    hutch = model.log_prob(x, method="hutchinson", solver="rk4", steps=64, probes=2)
    torch.testing.assert_close(hutch, truth, rtol=0, atol=1e-4)
    samples = model.sample(4000, torch.Generator().manual_seed(0), steps=16, solver="rk4")
    assert samples.std().item() == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize("kind", ["cfm", "otcfm", "si"])
def test_trained_samples_meet_w2_bound(trained: dict[str, FlowMatchingModel], kind: str) -> None:
    held_out = mixture(1000, seed=7)
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(8))
    base = wasserstein2(noise.numpy(), held_out.numpy())
    g = torch.Generator().manual_seed(0)
    samples = trained[kind].sample(1000, g, steps=16, solver="euler")
    w2 = wasserstein2(samples.numpy(), held_out.numpy())
    assert w2 < W2_BOUND < base / 2.5, (w2, base)


def test_seeded_sampling_is_reproducible(trained: dict[str, FlowMatchingModel]) -> None:
    model = trained["cfm"]
    a = model.sample(50, torch.Generator().manual_seed(5), steps=8, solver="heun")
    b = model.sample(50, torch.Generator().manual_seed(5), steps=8, solver="heun")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_reflow_straightens_paths(trained: dict[str, FlowMatchingModel]) -> None:
    teacher = trained["cfm"]  # independent pairs: curved paths, poor one-step samples
    g = torch.Generator().manual_seed(11)
    z, x = make_reflow_pairs(teacher, 16, g, steps=8, solver="rk4")
    assert z.shape == x.shape == (16, 2)
    torch.testing.assert_close(x, teacher.transport(z, steps=8, solver="rk4"))
    cfg = TrainConfig(steps=400, warmup_steps=0, eval_every=400, progress=False, seed=11)
    student = reflow(teacher, 4000, cfg, pair_steps=16)
    assert student is not teacher and isinstance(student.matcher, ReflowMatcher)
    assert not isinstance(teacher.matcher, ReflowMatcher)
    held_out = mixture(1000, seed=8)

    def one_step_w2(model: FlowMatchingModel) -> float:
        s = model.sample(1000, torch.Generator().manual_seed(1), steps=1, solver="euler")
        return wasserstein2(s.numpy(), held_out.numpy())

    before, after = one_step_w2(teacher), one_step_w2(student)
    assert after < 0.5 * before and after < 2 * W2_BOUND, (before, after)


def test_log_prob_exact_and_hutchinson_agree(trained: dict[str, FlowMatchingModel]) -> None:
    model = trained["cfm"]
    x = mixture(64, seed=9)
    exact = model.log_prob_with_error(x, method="exact", solver="rk4", steps=32)
    hutch = model.log_prob_with_error(x, method="hutchinson", solver="rk4", steps=32, probes=8)
    assert exact.log_prob.shape == (64,) and torch.isfinite(exact.log_prob).all()
    se = torch.as_tensor(hutch.std_error)
    gap = hutch.log_prob - exact.log_prob
    assert (se > 0).all() and (gap.abs() <= 3 * se).float().mean() >= 0.9
    assert gap.mean().abs() <= 3 * se.square().sum().sqrt() / len(x)
    # Trained density beats the standard normal on data and drops far from it.
    base = -0.5 * x.square().sum(1) - math.log(2 * math.pi)
    assert exact.log_prob.mean() > base.mean() + 0.5
    far = model.log_prob(torch.tensor([[6.0, 6.0]]), solver="rk4", steps=32)
    assert far.item() < exact.log_prob.min().item()
