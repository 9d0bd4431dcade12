"""TimeMLP: hand-written forward-mode derivatives agree with autograd."""

from __future__ import annotations

import pytest
import torch
from torch.autograd.functional import jacobian, jvp

from training.nets import TimeMLP, silu_derivative

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def _net(dtype: torch.dtype, dim: int = 3, layers: int = 3, embedding: int = 7) -> TimeMLP:
    torch.manual_seed(0)
    return TimeMLP(dim, hidden_features=32, hidden_layers=layers, time_embedding=embedding).to(
        dtype
    )


def _inputs(dtype: torch.dtype, batch: int = 6, dim: int = 3) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, dim, generator=g, dtype=dtype)
    t = torch.rand(batch, generator=g, dtype=dtype)
    e = torch.randn(batch, dim, generator=g, dtype=dtype)
    return x, t, e


def _autograd_jacobians(net: TimeMLP, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``(batch, D, D)`` with ``[b, i, j] = d f_i / d x_j``, one sample at a time."""
    return torch.stack(
        [
            jacobian(lambda xi, ti=ti: net(xi[None], ti[None])[0], xi)
            for xi, ti in zip(x, t, strict=True)
        ]
    )


def test_silu_derivative_matches_autograd() -> None:
    h = torch.linspace(-8, 8, 101, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.nn.functional.silu(h).sum(), h)
    torch.testing.assert_close(silu_derivative(h.detach()), grad, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layers", [1, 3])
def test_jvp_matches_autograd(dtype: torch.dtype, layers: int) -> None:
    net = _net(dtype, layers=layers)
    x, t, e = _inputs(dtype)
    out, tangent = net.jvp(x, t, e)
    ref_out, ref_tangent = jvp(lambda xx: net(xx, t), x, e)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, ref_out, rtol=0, atol=tol)
    torch.testing.assert_close(tangent, ref_tangent, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layers", [1, 3])
def test_divergence_is_trace_of_autograd_jacobian(dtype: torch.dtype, layers: int) -> None:
    net = _net(dtype, layers=layers)
    x, t, _ = _inputs(dtype)
    out, div = net.divergence(x, t)
    trace = torch.diagonal(_autograd_jacobians(net, x, t), dim1=-2, dim2=-1).sum(-1)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, net(x, t), rtol=0, atol=tol)
    torch.testing.assert_close(div, trace, rtol=tol, atol=tol)
    assert div.abs().max() > 1e-3  # a zero field would pass trivially


def test_time_features_are_fixed_and_bounded() -> None:
    net = _net(torch.float64)
    assert "frequencies" not in dict(net.named_parameters())
    phi = net.embed_time(torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64))
    assert phi.shape == (3, 7) and phi.abs().max() <= 1.0
    # Features 0 and 1 are cos and sin of the same frequency.
    torch.testing.assert_close(phi[:, 0] ** 2 + phi[:, 1] ** 2, torch.ones(3, dtype=torch.float64))


def test_divergence_batch_of_one_and_dim_one() -> None:
    net = _net(torch.float64, dim=1)
    x, t, _ = _inputs(torch.float64, batch=1, dim=1)
    _, div = net.divergence(x, t)
    ref = _autograd_jacobians(net, x, t)[:, 0, 0]
    torch.testing.assert_close(div, ref, rtol=1e-10, atol=1e-10)
