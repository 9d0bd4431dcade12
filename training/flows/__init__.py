"""The normalizing-flow zoo: NICE, RealNVP, Glow (vectors), MAF, IAF and NSF.

Layers live with their concept (``linear``, ``coupling``, ``autoregressive``, ``spline``);
each model type's builder (``build_nsf(dim, cfg)``, ...) is registered in
``training.registry``.

Example:
    >>> import torch
    >>>     >>> flow = build_nsf(2, ModelConfig(hidden_features=32, transforms=3))
    >>> flow.log_prob(torch.randn(8, 2)).shape
    torch.Size([8])
"""

from __future__ import annotations

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
    "build_glow",
    "build_iaf",
    "build_maf",
    "build_nice",
    "build_nsf",
    "build_nsf_ar",
    "build_realnvp",
]
