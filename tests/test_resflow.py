"""Residual flows (training/flows/residual.py): the Russian-roulette log-det is unbiased, the
Neumann gradient series is the exact log-det's gradient in expectation, the spectral norm
holds Lip(g) below the coefficient, the served inverse's residual is reported, and bad
settings stop `train` with one line. Invertibility and the exact log-det against the
brute-force Jacobian are in the zoo's contract tests (tests/test_flows.py); the served series
above 64 dims is in tests/test_resflow_series.py."""

from __future__ import annotations

import pytest
import torch

from cli import main
from training.flows.residual import ResidualBlock

DIM, ROWS, REPLICAS, CALLS = 3, 4, 16, 200


@pytest.fixture(autouse=True)
def _one_thread():
    """These many tiny products lose to threading overhead on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def block() -> ResidualBlock:
    torch.manual_seed(0)
    b = ResidualBlock(DIM, 16, 2, 0.9, 50).double()
    with torch.no_grad():
        for p in b.parameters():
            p.add_(torch.randn(p.shape, dtype=p.dtype))
    for linear in b.linears:
        linear.power_iteration(2000)
    return b


def _estimates(block: ResidualBlock, x: torch.Tensor, parameter: torch.Tensor | None):
    """Per call: the roulette estimate and (optionally) the gradient of its surrogate
    w.r.t. ``parameter``, each averaged over the call's replicas: ``(CALLS, ROWS)``."""
    from training.flows.residual import ResidualFlow

    flow = ResidualFlow(DIM, [block], series_terms=24)
    gen = torch.Generator().manual_seed(1)
    values, grads = [], []
    rows = x.repeat(REPLICAS, 1)
    for _ in range(CALLS):
        probe = torch.randn(rows.shape, generator=gen, dtype=rows.dtype)
        terms, survival = flow._roulette(gen, rows)
        _, est = block.log_det_estimate(rows, probe, terms, survival)
        values.append(est.detach().reshape(REPLICAS, ROWS).mean(0))
        if parameter is not None:
            (g,) = torch.autograd.grad(est.sum() / REPLICAS, parameter)
            grads.append(g.clone())
    return torch.stack(values), (torch.stack(grads) if grads else None)


def test_russian_roulette_log_det_is_unbiased(block: ResidualBlock) -> None:
    x = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        _, exact = block(x)
    assert exact.abs().min() > 5e-3, "log-dets near zero: the check is void"
    values, _ = _estimates(block, x, None)
    mean, se = values.mean(0), values.std(0) / CALLS**0.5
    assert (se > 0).all()
    assert ((mean - exact).abs() < 3 * se).all(), ((mean - exact) / se, exact)


def test_neumann_gradient_series_is_the_exact_gradient_in_expectation(block) -> None:
    x = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    parameter = block.linears[0].bias
    exact = torch.autograd.grad(block(x)[1].sum(), parameter)[0]
    _, grads = _estimates(block, x, parameter)
    mean, se = grads.mean(0), grads.std(0) / CALLS**0.5
    assert exact.abs().max() > 1e-2
    assert ((mean - exact).abs() < 3 * se + 1e-9).all(), (mean - exact) / se


def test_spectral_norm_keeps_every_layer_within_the_coefficient(block) -> None:
    for linear in block.linears:
        sigma = torch.linalg.matrix_norm(linear.normalized_weight().detach(), 2)
        assert float(sigma) <= 0.9 * (1 + 1e-6)
    # Lip(g) < 1: the Jacobian's largest singular value at random points
    x = torch.randn(64, DIM, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        _, jac = block.jacobian(x)
    assert float(torch.linalg.matrix_norm(jac, 2).max()) < 0.9**3 + 1e-6


def test_a_flow_trained_at_a_high_rate_keeps_every_layer_within_its_coefficient() -> None:
    """The power-iteration estimate lags a weight that moves fast (the default lr 4e-2) and
    never exceeds the true norm; the trained flow's norms are exact all the same."""
    from training.config import ModelConfig, TrainConfig
    from training.fit import fit

    coeff = 0.97
    ckpt = fit("resflow", "8gaussians", rows=2000,
               model_cfg=ModelConfig(hidden_features=32, transforms=2, lipschitz=coeff),
               train_cfg=TrainConfig(steps=200, batch_size=128, lr=4e-2, warmup_steps=1,
                                     eval_every=50, progress=False))
    blocks = [t for t in ckpt.model.transforms if isinstance(t, ResidualBlock)]
    norms = [float(torch.linalg.matrix_norm(linear.normalized_weight().detach().double(), 2))
             for block in blocks for linear in block.linears]
    assert max(norms) <= coeff * (1 + 1e-5), norms
    assert max(b.lipschitz_bound() for b in blocks) <= coeff ** 3 * (1 + 1e-5)


def test_evaluate_reports_the_unrolled_inverse_residual(tmp_path) -> None:
    from conftest import tiny_checkpoint

    from training.evaluate import evaluate

    ckpt = tiny_checkpoint("resflow", tmp_path / "ck", steps=20)
    report = evaluate(ckpt, samples=64)
    assert 0 <= report["fixed_point_residual"] < 1e-4
    few = ckpt.model
    for t in few.transforms:
        if isinstance(t, ResidualBlock):
            t.iterations = 1
    assert few.inversion_residual(torch.randn(64, 2)) > report["fixed_point_residual"]


@pytest.mark.parametrize("value", ["1.0", "1.5", "0"])
def test_lipschitz_outside_zero_one_stops_train_with_one_line(value: str, tmp_path,
                                                              capsys) -> None:
    out = tmp_path / "o"
    assert main(["train", "--model", "resflow", "--data", "moons", "--out", str(out),
                 f"--lipschitz={value}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lipschitz" in err and "Traceback" not in err
    assert not out.exists()
