"""Rational-quadratic spline maps and the neural spline flows built from them.

Durkan et al. 2019, "Neural Spline Flows": a monotone rational-quadratic spline on
``[-B, B]`` with ``K`` bins, identity (linear) tails outside. The bin of a value is found
by a comparison count ``(x[..., None] >= knots).sum(-1)``, never ``torch.searchsorted``,
which has no ONNX form.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from training.config import ModelConfig
from training.flows.autoregressive import MaskedAutoregressive, autoregressive_flow
from training.flows.base import Flow
from training.flows.coupling import Coupling, alternating_mask, check_coupling_dim
from training.flows.univariate import Univariate

__all__ = ["RationalQuadraticSpline", "build_nsf", "build_nsf_ar"]


class _Bin(NamedTuple):
    """The knot bin holding each value: left corner, size, slope and end derivatives."""

    x0: Tensor
    y0: Tensor
    width: Tensor
    height: Tensor
    d0: Tensor
    d1: Tensor

    @property
    def slope(self) -> Tensor:
        return self.height / self.width


# Layout: the spline works on values flattened to ``(N,)`` (N = batch x features) and on
# parameters, knots and derivatives laid out bins-first, ``(K, N)``. Every per-value
# broadcast is then a ``(K, N)`` against ``(N,)`` one, and no tensor has a size-1 axis:
# ONNX Runtime's CPU kernels run a broadcast over a size-1 axis (``(N, 1, K)`` against
# ``(N, 1, 1)``, or even ``(N, 1)`` plus a scalar) element by element, about ten times
# slower than the same op on ``(K, N)`` (docs/BENCHMARKS.md, graph runtimes). The values are
# the same as in any other layout.
def _knots(raw: Tensor, bound: float, min_size: float) -> Tensor:
    """Unnormalised bin sizes ``(K, N)`` -> knots ``(K + 1, N)`` from ``-B`` to ``B``."""
    bins = raw.shape[0]
    sizes = min_size + (1 - min_size * bins) * raw.softmax(0)
    interior = 2 * bound * sizes.cumsum(0)[:-1] - bound
    # Pinning the end knots exactly keeps the spline continuous with the identity tails.
    return _with_ends(interior, -bound, bound)


# The forms below are chosen for the exported graphs, with the same values as the obvious
# ones: ONNX Runtime's CPU kernels run Pad, Pow and Softplus as slow loops.
def _with_ends(t: Tensor, first: float, last: float) -> Tensor:
    """``t: (n, N)`` -> ``(n + 2, N)`` with constant first and last rows (``F.pad`` by
    concatenation)."""
    zero = t[:1] * 0
    return torch.cat([zero + first, t, zero + last], 0)


def _gather(t: Tensor, index: Tensor) -> Tensor:
    """``t[index[n], n]`` for ``t: (K, N)``, ``index: (1, N)`` -> ``(N,)``."""
    return t.gather(0, index).squeeze(0)


def _sq(t: Tensor) -> Tensor:
    return t * t  # exactly torch.square; exports as Mul instead of Pow


def _softplus(t: Tensor) -> Tensor:
    """``log(1 + exp(t))`` in its overflow-free form (``F.softplus`` to float rounding)."""
    return t.clamp_min(0) + (-t.abs()).exp().log1p()


def _derivative(bin_: _Bin, theta: Tensor) -> Tensor:
    """``dy/dx`` inside the bin at relative position ``theta`` (Durkan et al. 2019, eq. 5)."""
    s, one_minus = bin_.slope, 1 - theta
    numerator = _sq(s) * (
        bin_.d1 * _sq(theta) + 2 * s * theta * one_minus + bin_.d0 * _sq(one_minus)
    )
    return numerator / _sq(_denominator(bin_, theta))


def _denominator(bin_: _Bin, theta: Tensor) -> Tensor:
    s = bin_.slope
    return s + (bin_.d0 + bin_.d1 - 2 * s) * theta * (1 - theta)


class RationalQuadraticSpline(Univariate):
    """Monotone rational-quadratic spline with linear (identity) tails.

    Durkan et al. 2019, "Neural Spline Flows", section 3.1 and appendix A. Per feature the
    ``3K - 1`` parameters are ``K`` widths, ``K`` heights (softmax, with a floor) and
    ``K - 1`` interior derivatives (softplus, with a floor); the end derivatives are 1 so the
    map is C1 with the identity tails. Zero parameters give the identity.

    Args:
        bins: ``K``, number of bins.
        bound: ``B``; the spline acts on ``[-B, B]``, the identity outside.
        min_bin_size: floor of each bin's width and height (fraction of ``2B``).
        min_derivative: floor of the knot derivatives.

    Shapes: ``x: (batch, n)``, ``params: (batch, n, 3K - 1)``.

    Example:
        >>> spline = RationalQuadraticSpline(bins=8, bound=3.0)
        >>> params = torch.randn(16, 2, spline.params_per_dim)
        >>> y, ladj = spline(torch.randn(16, 2), params)
        >>> x, inverse_ladj = spline.inverse(y, params)
    """

    def __init__(
        self,
        bins: int = 8,
        bound: float = 5.0,
        min_bin_size: float = 1e-3,
        min_derivative: float = 1e-3,
    ) -> None:
        super().__init__()
        if min_bin_size * bins >= 1:
            raise ValueError(f"min_bin_size={min_bin_size} leaves no room for {bins} bins")
        self.bins = bins
        self.bound = float(bound)
        self.min_bin_size = min_bin_size
        self.min_derivative = min_derivative
        self.params_per_dim = 3 * bins - 1
        # softplus(0 + offset) = 1 - floor, so zero parameters give unit derivatives.
        self._derivative_offset = math.log(math.expm1(1 - min_derivative))

    def _spline(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``params: (3K - 1, N)`` -> x knots, y knots, derivatives, each ``(K + 1, N)``."""
        k = self.bins
        xs = _knots(params[:k], self.bound, self.min_bin_size)
        ys = _knots(params[k : 2 * k], self.bound, self.min_bin_size)
        interior = self.min_derivative + _softplus(params[2 * k :] + self._derivative_offset)
        return xs, ys, _with_ends(interior, 1.0, 1.0)

    def _locate(self, value: Tensor, params: Tensor, by_output: bool) -> _Bin:
        """The bin of each ``value: (N,)`` under ``params: (3K - 1, N)``."""
        xs, ys, ds = self._spline(params)
        knots = ys if by_output else xs
        index = (value >= knots[1:-1]).sum(0, keepdim=True)  # (1, N)
        x0, y0 = _gather(xs, index), _gather(ys, index)
        return _Bin(
            x0=x0,
            y0=y0,
            width=_gather(xs[1:], index) - x0,
            height=_gather(ys[1:], index) - y0,
            d0=_gather(ds, index),
            d1=_gather(ds[1:], index),
        )

    def _flat(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x: (batch, n)``, ``params: (batch, n, 3K - 1)`` -> clamped values ``(N,)``, the
        inside mask, the raw values and bins-first parameters ``(3K - 1, N)``."""
        v = x.reshape(-1)
        p = params.reshape(-1, self.params_per_dim).transpose(0, 1)
        # Clamping first keeps the unused spline branch finite, so torch.where has clean grads.
        inside = (v >= -self.bound) & (v <= self.bound)
        return v.clamp(-self.bound, self.bound), inside, v, p

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        x_in, inside, v, p = self._flat(x, params)
        bin_ = self._locate(x_in, p, by_output=False)
        theta = (x_in - bin_.x0) / bin_.width
        s = bin_.slope
        y = bin_.y0 + bin_.height * (
            s * _sq(theta) + bin_.d0 * theta * (1 - theta)
        ) / _denominator(bin_, theta)
        ladj = _derivative(bin_, theta).log()
        return (torch.where(inside, y, v).reshape(x.shape),
                torch.where(inside, ladj, torch.zeros_like(ladj)).reshape(x.shape))

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        y_in, inside, v, p = self._flat(y, params)
        bin_ = self._locate(y_in, p, by_output=True)
        # Solve the quadratic a theta^2 + b theta + c = 0 in its cancellation-free form
        # (Durkan et al. 2019, eqs. 6-8).
        s, dy = bin_.slope, y_in - bin_.y0
        curvature = bin_.d0 + bin_.d1 - 2 * s
        a = bin_.height * (s - bin_.d0) + dy * curvature
        b = bin_.height * bin_.d0 - dy * curvature
        c = -s * dy
        discriminant = (_sq(b) - 4 * a * c).clamp_min(0)
        theta = 2 * c / (-b - discriminant.sqrt())
        x = bin_.x0 + theta * bin_.width
        ladj = -_derivative(bin_, theta).log()
        return (torch.where(inside, x, v).reshape(y.shape),
                torch.where(inside, ladj, torch.zeros_like(ladj)).reshape(y.shape))

    def extra_repr(self) -> str:
        return f"bins={self.bins}, bound={self.bound}"


def build_nsf(dim: int, cfg: ModelConfig) -> Flow:
    """NSF (coupling): ``cfg.transforms`` spline couplings with alternating masks."""
    check_coupling_dim("nsf", dim)
    return Flow(
        dim,
        [
            Coupling(
                alternating_mask(dim, i),
                RationalQuadraticSpline(cfg.bins, cfg.tail_bound),
                cfg.hidden_features,
                cfg.hidden_layers,
                cfg.context_features,
            )
            for i in range(cfg.transforms)
        ],
        cfg.context_features,
    )


def build_nsf_ar(dim: int, cfg: ModelConfig) -> Flow:
    """NSF (autoregressive): ``cfg.transforms`` spline MADE steps with reversals between."""
    return autoregressive_flow(
        dim,
        cfg.transforms,
        lambda: MaskedAutoregressive(
            dim,
            RationalQuadraticSpline(cfg.bins, cfg.tail_bound),
            cfg.hidden_features,
            cfg.hidden_layers,
            cfg.context_features,
        ),
        cfg.context_features,
    )
