"""Coupling layers and the coupling flows built from them: NICE, RealNVP and Glow (vectors).

A coupling layer keeps the masked features ``x_a`` and moves the others element-wise,
``y_b = tau(x_b; theta(x_a))``: one pass in both directions, triangular Jacobian.
"""

from __future__ import annotations

import torch
from torch import Tensor

from training.config import ModelConfig
from training.flows.base import Flow, Transform
from training.flows.linear import ActNorm, DiagonalScale, LULinear
from training.flows.nets import MLP
from training.flows.univariate import Affine, Shift, Univariate

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "Coupling",
    "alternating_mask",
    "build_glow",
    "build_nice",
    "build_realnvp",
    "check_coupling_dim",
]


def alternating_mask(dim: int, parity: int) -> Tensor:
    """``(dim,)`` bool mask of the kept features: even indices if ``parity`` is even, else odd."""
    return torch.arange(dim) % 2 == parity % 2


def check_coupling_dim(kind: str, dim: int) -> None:
    """Coupling needs at least one kept and one moved feature."""
    if dim < 2:
        raise ValueError(
            f"{kind!r} is a coupling flow and needs dim >= 2 (got dim={dim}); "
            "use 'maf', 'iaf' or 'nsf_ar' for one-dimensional data"
        )


class Coupling(Transform):
    """Coupling layer: ``y_a = x_a``, ``y_b = tau(x_b; theta(x_a))`` with an MLP conditioner.

    Dinh et al. 2014/2017 (NICE, RealNVP); Durkan et al. 2019 (NSF) with a spline ``tau``.

    Args:
        mask: ``(dim,)`` bool, True for the kept (conditioning) features; needs at least one
            True and one False.
        univariate: the element-wise map ``tau`` (``Shift``, ``Affine``, a spline...).
        hidden_features: width of the conditioner's hidden layers.
        hidden_layers: number of hidden layers.
        context_features: ``C`` context columns the conditioner sees besides ``x_a``
            (``theta(x_a, c)``; 0: unconditional).

    Shapes: ``x: (batch, dim)`` (and ``context: (batch, C)``) -> ``(y: (batch, dim), ladj:
    (batch,))``.

    Example:
        >>> layer = Coupling(alternating_mask(4, 0), Affine(), hidden_features=16)
        >>> y, ladj = layer(torch.randn(8, 4))
    """

    def __init__(
        self,
        mask: Tensor,
        univariate: Univariate,
        hidden_features: int = 64,
        hidden_layers: int = 2,
        context_features: int = 0,
    ) -> None:
        super().__init__()
        self.conditional = context_features > 0
        mask = torch.as_tensor(mask, dtype=torch.bool)
        kept, moved = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        if len(kept) == 0 or len(moved) == 0:
            raise ValueError(f"a coupling mask needs kept and moved features, got {mask}")
        self.register_buffer("kept", kept)
        self.register_buffer("moved", moved)
        self.register_buffer("merge_order", torch.argsort(torch.cat([kept, moved])))
        self.num_moved = len(moved)
        self.univariate = univariate
        out_features = len(moved) * univariate.params_per_dim
        self.conditioner = MLP(len(kept) + context_features, out_features, hidden_features,
                               hidden_layers)

    def _split(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        x_a, x_b = x.index_select(-1, self.kept), x.index_select(-1, self.moved)
        seen = x_a if context is None else torch.cat([x_a, context], dim=-1)
        params = self.conditioner(seen).unflatten(-1, (self.num_moved, -1))
        return x_a, x_b, params

    def _merge(self, x_a: Tensor, y_b: Tensor) -> Tensor:
        return torch.cat([x_a, y_b], dim=-1).index_select(-1, self.merge_order)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x_a, x_b, params = self._split(x, context)
        y_b, ladj = self.univariate(x_b, params)
        return self._merge(x_a, y_b), ladj.sum(-1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_ladj(y, context)[0]

    def inverse_and_ladj(self, y: Tensor,
                         context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y_a, y_b, params = self._split(y, context)
        x_b, ladj = self.univariate.inverse(y_b, params)
        return self._merge(y_a, x_b), ladj.sum(-1)


class AdditiveCoupling(Coupling):
    """NICE's additive coupling ``y_b = x_b + m(x_a)`` (Dinh et al. 2014, eq. 5).

    Args: as ``Coupling``, without ``univariate``.

    Example:
        >>> y, ladj = AdditiveCoupling(alternating_mask(4, 1))(torch.randn(8, 4))  # ladj == 0
    """

    def __init__(self, mask: Tensor, hidden_features: int = 64, hidden_layers: int = 2,
                 context_features: int = 0) -> None:
        super().__init__(mask, Shift(), hidden_features, hidden_layers, context_features)


class AffineCoupling(Coupling):
    """RealNVP's affine coupling ``y_b = x_b * exp(s(x_a)) + t(x_a)`` (Dinh et al. 2017, eq. 6).

    Args: as ``Coupling``, without ``univariate``; the log-scale is soft-clamped (``Affine``).

    Example:
        >>> y, ladj = AffineCoupling(alternating_mask(4, 0))(torch.randn(8, 4))
    """

    def __init__(self, mask: Tensor, hidden_features: int = 64, hidden_layers: int = 2,
                 context_features: int = 0) -> None:
        super().__init__(mask, Affine(), hidden_features, hidden_layers, context_features)


def build_nice(dim: int, cfg: ModelConfig) -> Flow:
    """NICE: ``cfg.transforms`` additive couplings with alternating masks, then a diagonal
    scale (the only volume change)."""
    check_coupling_dim("nice", dim)
    steps: list[Transform] = [
        AdditiveCoupling(alternating_mask(dim, i), cfg.hidden_features, cfg.hidden_layers,
                          cfg.context_features)
        for i in range(cfg.transforms)
    ]
    return Flow(dim, [*steps, DiagonalScale(dim)], cfg.context_features)


def build_realnvp(dim: int, cfg: ModelConfig) -> Flow:
    """RealNVP: ``cfg.transforms`` affine couplings with alternating masks."""
    check_coupling_dim("realnvp", dim)
    return Flow(
        dim,
        [
            AffineCoupling(alternating_mask(dim, i), cfg.hidden_features, cfg.hidden_layers,
                           cfg.context_features)
            for i in range(cfg.transforms)
        ],
        cfg.context_features,
    )


def build_glow(dim: int, cfg: ModelConfig) -> Flow:
    """Glow for vectors: each step is ActNorm -> LU linear -> affine coupling."""
    check_coupling_dim("glow", dim)
    steps: list[Transform] = []
    for i in range(cfg.transforms):
        steps += [
            ActNorm(dim),
            LULinear(dim),
            AffineCoupling(alternating_mask(dim, i), cfg.hidden_features, cfg.hidden_layers,
                           cfg.context_features),
        ]
    return Flow(dim, steps, cfg.context_features)
