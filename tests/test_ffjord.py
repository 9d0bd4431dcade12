"""FFJORD: maximum likelihood through the ODE (training/ffjord.py).

Hutchinson's training objective equals the exact-divergence objective in expectation, the
exact objective is the served log-likelihood, gradients reach every parameter through the
adaptive solver, the RNODE terms are what they say, and bad tolerances stop `train`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cli import main
from training.config import ModelConfig
from training.ffjord import FFJORD, rademacher
from training.registry import build_model, family_of

CFG = ModelConfig(hidden_features=16, hidden_layers=2, time_embedding=4)


@pytest.fixture
def model() -> FFJORD:
    torch.manual_seed(0)
    m = build_model("ffjord", 3, CFG).double()
    with torch.no_grad():  # a field far from zero, so the trace is far from zero too
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    return m.eval()


def test_hutchinson_objective_equals_the_exact_one_in_expectation(model: FFJORD) -> None:
    """Fixed-step RK4: the path of x does not depend on the trace, so each probe's estimate
    is the exact integrand's quadrature plus zero-mean noise."""
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    draws = 2000
    with torch.no_grad():
        exact = model.nll_terms(x, None, solver="rk4", steps=6)[0]
        rows = x.repeat(draws, 1)
        probe = rademacher(rows.shape, torch.Generator().manual_seed(2), rows)
        estimates = model.nll_terms(rows, probe, solver="rk4", steps=6)[0].reshape(draws, 4)
    mean, se = estimates.mean(0), estimates.std(0) / draws**0.5
    assert (se > 1e-3).all(), "the probes never disagree: the check is void"
    assert ((mean - exact).abs() < 3 * se).all(), (mean - exact) / se


def test_exact_objective_is_the_likelihood_the_model_serves(model: FFJORD) -> None:
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        nll = model.nll_terms(x, None, solver="rk4", steps=16)[0]
        served = model.log_prob(x, method="exact", solver="rk4", steps=16)
    torch.testing.assert_close(-nll, served, rtol=1e-10, atol=1e-10)


def test_training_loss_reaches_every_parameter_through_dopri5(model: FFJORD) -> None:
    model.train()
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model.training_loss(x, torch.Generator().manual_seed(5)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    # the gradient is the loss's own (direct backprop): a finite difference agrees
    weight = model.net.output.bias
    step = 1e-6
    with torch.no_grad():
        base = model.nll_terms(x, None, solver="rk4", steps=8)[0].mean()
        weight[0] += step
        moved = model.nll_terms(x, None, solver="rk4", steps=8)[0].mean()
        weight[0] -= step
    weight.grad = None
    model.nll_terms(x, None, solver="rk4", steps=8)[0].mean().backward()
    assert float(weight.grad[0]) == pytest.approx(float(moved - base) / step, rel=1e-4)


def test_rnode_terms_are_the_integrated_kinetic_energy_and_jacobian_norm(model: FFJORD) -> None:
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    probe = rademacher(x.shape, torch.Generator().manual_seed(7), x)
    with torch.no_grad():
        _, kinetic, jacobian = model.nll_terms(x, probe, solver="rk4", steps=32)
        # the same integrals by the trapezoid rule along the RK4 path of x
        times = np.linspace(0.0, 1.0, 257)
        from numerics.solvers import trajectory

        path = trajectory(model.velocity, x, times, method="rk4").states
        t = torch.as_tensor(times)
        v = torch.stack([model.velocity(p, t[i].expand(6)) for i, p in enumerate(path)])
        jv = torch.stack([model.net.jvp(p, t[i].expand(6), probe)[1]
                          for i, p in enumerate(path)])
        by_hand_k = torch.trapezoid(v.square().sum(-1), t, dim=0)
        by_hand_j = torch.trapezoid(jv.square().sum(-1), t, dim=0)
    torch.testing.assert_close(kinetic, by_hand_k, rtol=1e-3, atol=0)
    torch.testing.assert_close(jacobian, by_hand_j, rtol=1e-3, atol=0)
    assert (kinetic > 0).all() and (jacobian > 0).all()
    weighted = FFJORD(3, model.net, kinetic_energy=0.5, jacobian_norm=0.25)
    plain = FFJORD(3, model.net)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        nll, k, j = weighted.nll_terms(x, rademacher(x.shape, gen, x))
        loss = weighted.training_loss(x, torch.Generator().manual_seed(8))
        base = plain.training_loss(x, torch.Generator().manual_seed(8))
    torch.testing.assert_close(loss, nll.mean() + 0.5 * k.mean() + 0.25 * j.mean())
    assert float(loss) > float(base)


def test_ffjord_is_served_as_a_flow_matching_velocity_field() -> None:
    m = build_model("ffjord", 2, CFG)
    assert family_of("ffjord") == "flow_matching" == m.family
    assert sorted(m.export_graphs()) == ["velocity", "velocity_div", "velocity_jvp"]
    assert m.serving_defaults().solver == "dopri5"


@pytest.mark.parametrize(("flag", "value"), [("--ode-rtol", "0"), ("--ode-atol", "-1e-3"),
                                             ("--kinetic-energy", "-1")])
def test_bad_ffjord_settings_stop_train_with_one_line(flag: str, value: str, tmp_path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "o"
    assert main(["train", "--model", "ffjord", "--data", "moons", "--out", str(out),
                 f"{flag}={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert flag.lstrip("-").replace("-", "_") in err and "greater" in err
    assert not out.exists()


def test_conditional_ffjord_trains_on_log_p_x_given_its_context() -> None:
    """The context reaches the field: ``-log p(x | c)`` changes with ``c``; the exact and the
    Hutchinson objectives agree given it; the null context (all zeros) is the marginal the
    label dropout trains."""
    torch.manual_seed(0)
    m = build_model("ffjord", 2, ModelConfig(hidden_features=16, hidden_layers=2,
                                             time_embedding=4, context_features=3,
                                             cfg_dropout=0.2)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype))
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    c = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    with torch.no_grad():
        nll = m.nll_terms(x, None, solver="rk4", steps=6, context=c)[0]
        other = m.nll_terms(x, None, solver="rk4", steps=6, context=c.roll(1, dims=1))[0]
        assert (nll - other).abs().min() > 1e-6
        draws = 1000
        probe = rademacher((draws * 4, 2), torch.Generator().manual_seed(2), x)
        est = m.nll_terms(x.repeat(draws, 1), probe, solver="rk4", steps=6,
                          context=c.repeat(draws, 1))[0].reshape(draws, 4)
        se = est.std(0) / draws ** 0.5
        assert ((est.mean(0) - nll).abs() <= 4 * se + 1e-9).all()
    loss = m.training_loss(x.float().double(), torch.Generator().manual_seed(3), context=c)
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
