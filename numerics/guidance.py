"""Classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2022).

One network trained with its label dropped to a null token some of the time gives both the
conditional field ``v_c = v(x, t | y)`` and the unconditional one ``v_u = v(x, t | null)``;
guidance of weight ``w >= 0`` follows ``v_u + (1 + w)(v_c - v_u)`` (their eq. 6, written for
the velocity; every diffusion parameterization is affine in the network's output at a given
``(x, t)``, so guiding the velocity guides the noise prediction the same way). ``w = 0`` is
the plain conditional field. Array-agnostic: numpy arrays or torch tensors.

Example:
    >>> import numpy as np
    >>> guided(np.array([2.0]), np.array([1.0]), 1.0).tolist()
    [3.0]
"""

from __future__ import annotations

from numerics.arrays import Array

__all__ = ["guided"]


def guided(v_cond: Array, v_uncond: Array, weight: float) -> Array:
    """``v_u + (1 + w)(v_c - v_u)`` for fields ``(batch, dim)`` of one shape."""
    return v_uncond + (1.0 + weight) * (v_cond - v_uncond)
