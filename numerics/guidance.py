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

import numpy as np

from numerics.arrays import Array, array_namespace

__all__ = ["guided", "guided_log_probs"]


def guided(v_cond: Array, v_uncond: Array, weight: float) -> Array:
    """``v_u + (1 + w)(v_c - v_u)`` for fields ``(batch, dim)`` of one shape."""
    return v_uncond + (1.0 + weight) * (v_cond - v_uncond)


def guided_log_probs(lp_cond: Array, lp_uncond: Array, weight: float) -> Array:
    """The discrete form: ``p_w ∝ p_u^(-w) p_c^(1 + w)`` per token, renormalised over the
    last axis (Nisonoff et al., "Unlocking guidance for discrete state-space diffusion and
    flow models", 2024): log-probabilities ``(..., V)`` in, log-probabilities out. A value
    either denoiser rules out (``-inf``) stays ruled out."""
    xp = array_namespace(lp_cond)
    possible = xp.isfinite(lp_cond) & xp.isfinite(lp_uncond)
    zeros = xp.zeros_like(lp_cond)
    raw = guided(xp.where(possible, lp_cond, zeros), xp.where(possible, lp_uncond, zeros),
                 weight)
    raw = xp.where(possible, raw, xp.full_like(raw, -xp.inf))
    top = raw.max(-1, keepdims=True) if isinstance(raw, np.ndarray) \
        else raw.amax(-1, keepdim=True)
    return raw - top - xp.log(xp.exp(raw - top).sum(-1, keepdims=True)
                              if isinstance(raw, np.ndarray)
                              else xp.exp(raw - top).sum(-1, keepdim=True))
