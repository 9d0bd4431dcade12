"""The normalizing-flow zoo: NICE, RealNVP, Glow (vectors), MAF, IAF and NSF.

Layers live with their concept (``linear``, ``coupling``, ``autoregressive``, ``spline``);
``build_flow`` turns a model type and a ``ModelConfig`` into a ``Flow``.

Example:
    >>> import torch
    >>> from training.config import ModelConfig
    >>> flow = build_flow("nsf", 2, ModelConfig(hidden_features=32, transforms=3))
    >>> flow.log_prob(torch.randn(8, 2)).shape
    torch.Size([8])
"""

from __future__ import annotations

from collections.abc import Callable

from training.config import ModelConfig
from training.flows.autoregressive import MaskedAutoregressive, build_iaf, build_maf
from training.flows.base import Flow, InverseTransform, Transform
from training.flows.coupling import (
    AdditiveCoupling,
    AffineCoupling,
    Coupling,
    build_glow,
    build_nice,
    build_realnvp,
)
from training.flows.linear import ActNorm, DiagonalScale, FrozenLinear, LULinear, Permutation
from training.flows.nets import MADE, MLP
from training.flows.spline import RationalQuadraticSpline, build_nsf, build_nsf_ar
from training.flows.univariate import Affine, Shift, Univariate

__all__ = [
    "FLOW_BUILDERS",
    "MADE",
    "MLP",
    "ActNorm",
    "AdditiveCoupling",
    "Affine",
    "AffineCoupling",
    "Coupling",
    "DiagonalScale",
    "Flow",
    "FrozenLinear",
    "InverseTransform",
    "LULinear",
    "MaskedAutoregressive",
    "Permutation",
    "RationalQuadraticSpline",
    "Shift",
    "Transform",
    "Univariate",
    "build_flow",
]

FLOW_BUILDERS: dict[str, Callable[[int, ModelConfig], Flow]] = {
    "nice": build_nice,
    "realnvp": build_realnvp,
    "glow": build_glow,
    "maf": build_maf,
    "iaf": build_iaf,
    "nsf": build_nsf,
    "nsf_ar": build_nsf_ar,
}


def build_flow(kind: str, dim: int, cfg: ModelConfig) -> Flow:
    """Build an untrained flow of type ``kind`` for ``dim`` features.

    Args:
        kind: one of ``FLOW_BUILDERS`` ("nice", "realnvp", "glow", "maf", "iaf", "nsf",
            "nsf_ar").
        dim: number of features (coupling flows need ``dim >= 2``).
        cfg: ``transforms`` steps; ``hidden_features`` x ``hidden_layers`` conditioners;
            ``bins`` and ``tail_bound`` for the spline flows.

    Raises:
        ValueError: unknown ``kind``, ``dim < 1``, or ``dim < 2`` for a coupling flow.
    """
    try:
        builder = FLOW_BUILDERS[kind]
    except KeyError:
        choices = ", ".join(FLOW_BUILDERS)
        raise ValueError(f"unknown flow type {kind!r}; choose one of: {choices}") from None
    if dim < 1:
        raise ValueError(f"a flow needs dim >= 1 features, got dim={dim}")
    return builder(dim, cfg)
