"""Masked autoregressive layers and the flows built from them: MAF and IAF.

``y_i = tau(x_i; theta_i(x_{<i}))`` with all ``theta`` from one MADE pass. The data -> noise
direction is one pass; its inverse needs ``D`` passes (one feature settles per pass). MAF
puts the one-pass direction on density evaluation, IAF (its inverse) on sampling.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from training.config import ModelConfig
from training.flows.base import Flow, InverseTransform, Transform
from training.flows.linear import Permutation
from training.flows.nets import MADE
from training.flows.univariate import Affine, Univariate

__all__ = ["MaskedAutoregressive", "autoregressive_flow", "build_iaf", "build_maf"]


class MaskedAutoregressive(Transform):
    """Masked autoregressive transform (Papamakarios et al. 2017, "Masked Autoregressive Flow
    for Density Estimation", section 3).

    ``forward`` (data -> noise) evaluates MADE once; ``inverse`` runs ``dim`` MADE passes, a
    fixed count, so the exported graph is a static unrolled loop.

    Args:
        dim: number of features ``D``.
        univariate: the element-wise map ``tau`` (default ``Affine``: MAF; a spline: NSF-AR).
        hidden_features: width of MADE's hidden layers.
        hidden_layers: number of MADE hidden layers.
        context_features: ``C`` context columns MADE sees besides ``x`` (0: unconditional).

    Shapes: ``x: (batch, dim)`` -> ``(y: (batch, dim), ladj: (batch,))``.

    Example:
        >>> import torch
        >>> layer = MaskedAutoregressive(3, hidden_features=16)
        >>> y, ladj = layer(torch.randn(8, 3))
        >>> x = layer.inverse(y)  # 3 sequential passes
    """

    def __init__(
        self,
        dim: int,
        univariate: Univariate | None = None,
        hidden_features: int = 64,
        hidden_layers: int = 2,
        context_features: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.conditional = context_features > 0
        self.univariate = Affine() if univariate is None else univariate
        self.conditioner = MADE(
            dim, self.univariate.params_per_dim, hidden_features, hidden_layers,
            context_features=context_features,
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        y, ladj = self.univariate(x, self.conditioner(x, context))
        return y, ladj.sum(-1)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        return self.inverse_and_ladj(y, context)[0]

    def inverse_and_ladj(self, y: Tensor,
                         context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # Pass k fixes feature k; the last pass's parameters already see every settled
        # feature they depend on, so its log-det is that of the final x.
        x = y.new_zeros(y.shape)
        ladj = y.new_zeros(y.shape)
        for _ in range(self.dim):
            x, ladj = self.univariate.inverse(y, self.conditioner(x, context))
        return x, ladj.sum(-1)


def autoregressive_flow(dim: int, steps: int, make_step: Callable[[], Transform],
                        context_features: int = 0) -> Flow:
    """``steps`` autoregressive steps with a reversal between consecutive ones."""
    transforms: list[Transform] = []
    for i in range(steps):
        if i > 0:
            transforms.append(Permutation.reverse(dim))
        transforms.append(make_step())
    return Flow(dim, transforms, context_features)


def build_maf(dim: int, cfg: ModelConfig) -> Flow:
    """MAF: ``cfg.transforms`` affine MADE steps; density in one pass, sampling in ``D``."""
    return autoregressive_flow(
        dim,
        cfg.transforms,
        lambda: MaskedAutoregressive(dim, Affine(), cfg.hidden_features, cfg.hidden_layers,
                                     cfg.context_features),
        cfg.context_features,
    )


def build_iaf(dim: int, cfg: ModelConfig) -> Flow:
    """IAF (Kingma et al. 2016): inverted MAF steps; sampling in one pass, density in ``D``."""
    return autoregressive_flow(
        dim,
        cfg.transforms,
        lambda: InverseTransform(
            MaskedAutoregressive(dim, Affine(), cfg.hidden_features, cfg.hidden_layers,
                                 cfg.context_features)
        ),
        cfg.context_features,
    )
