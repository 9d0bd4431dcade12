"""Anomaly score kinds: what ``/anomaly_score`` computes from a model's graphs.

The manifest's ``anomaly`` section names the kind and holds its fixed parameters (chosen at
export on normal rows only; ``training.anomaly``), so a served score is reproducible from the
artifact alone:

* ``nll`` (every family): the negative log-likelihood, nats per row, in data units.
* ``denoise`` (diffusion, flow matching): the denoising error at a few fixed noise levels.
  At level ``t`` the row (in model space) is noised along the model's Gaussian path,
  ``x_t = a(t) u + s(t) eps`` with seeded ``eps``; one velocity call gives the model's noise
  estimate ``eps_hat``; the level's feature is ``log mean_j (eps_hat - eps)_j^2``. The
  features are standardized by their normal-row mean and std and combined with fixed weights.
* ``dte`` (diffusion, flow matching): the diffusion-time estimate, read from the denoiser
  (not a parametric fit): the noise scale ``s/a`` at which the distance between ``u`` and its
  denoised estimate matches the noise that scale would add (``numerics.denoise``).
  Deterministic: no noise is drawn.
* ``latent`` (flows with an ``encode`` graph): the mean distance from ``z = f(u)`` to its
  ``k`` nearest stored training latents (``latents.safetensors``, sha256-checked like every
  file): a locality score in the space where the flow made the data Gaussian.

Path coefficients are stored per level (``a, s`` and their time derivatives), so the service
needs no knowledge of the family's schedule or interpolant: they are numbers the training
model wrote at export.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from numerics.denoise import Levels

__all__ = ["LATENTS_FILE", "SCORE_KINDS", "AnomalyScoreSpec", "NoiseLevel", "ScoreKind"]

ScoreKind = Literal["nll", "denoise", "dte", "latent"]
SCORE_KINDS: tuple[str, ...] = ("nll", "denoise", "dte", "latent")
"""Every score kind; a family lists the ones it serves (``FamilySpec.score_kinds``)."""
LATENTS_FILE = "latents.safetensors"
"""The stored training latents of a ``latent`` score (tensor ``z``: ``(rows, dim)``)."""


class NoiseLevel(BaseModel):
    """One noise level of a Gaussian path ``x_t = a u + s eps`` and the path's slope there."""

    model_config = ConfigDict(extra="forbid")

    t: float = Field(gt=0, le=1)
    a: float = Field(ge=0)
    s: float = Field(gt=0)
    da: float
    ds: float

    @model_validator(mode="after")
    def _invertible(self) -> NoiseLevel:
        if abs(self.a * self.ds - self.s * self.da) < 1e-12:
            raise ValueError(f"noise level t={self.t}: a*ds - s*da is 0, the velocity does "
                             "not determine the noise")
        return self


class AnomalyScoreSpec(BaseModel):
    """The score kind a model serves and its fixed parameters."""

    model_config = ConfigDict(extra="forbid")

    kind: ScoreKind = "nll"
    levels: list[NoiseLevel] = Field(default_factory=list,
                                     description="denoise/dte: the noise levels, by t")
    draws: int = Field(1, ge=1, le=64, description="denoise: noise draws per level")
    center: list[float] = Field(default_factory=list, description="denoise: feature means")
    scale: list[float] = Field(default_factory=list, description="denoise: feature stds")
    weights: list[float] = Field(default_factory=list, description="denoise: combination")
    neighbours: int = Field(5, ge=1, le=100, description="latent: k nearest latents")
    latent_rows: int = Field(0, ge=0, description="latent: stored training latents")

    @model_validator(mode="after")
    def _consistent(self) -> AnomalyScoreSpec:
        k = len(self.levels)
        if self.kind in ("denoise", "dte") and k < 2:
            raise ValueError(f"a {self.kind} score needs at least 2 noise levels")
        if any(b.t <= a.t for a, b in zip(self.levels, self.levels[1:], strict=False)):
            raise ValueError("noise levels must be in increasing t")
        if self.kind == "denoise":
            if not len(self.center) == len(self.scale) == len(self.weights) == k:
                raise ValueError("a denoise score needs center, scale and weights per level")
            if any(v <= 0 for v in self.scale) or sum(abs(w) for w in self.weights) == 0:
                raise ValueError("denoise scales must be > 0 and some weight non-zero")
        if self.kind == "latent" and self.latent_rows <= self.neighbours:
            raise ValueError("a latent score needs more stored latents than neighbours")
        return self

    def noise_levels(self) -> Levels:
        """The levels as arrays (``numerics.denoise``)."""
        return Levels(*(np.array([getattr(v, f) for v in self.levels])
                        for f in ("t", "a", "s", "da", "ds")))

    def combine(self, features: np.ndarray) -> np.ndarray:
        """``(rows, levels)`` denoise features -> ``(rows,)``: standardized, weighted sum."""
        z = (features - np.asarray(self.center)) / np.asarray(self.scale)
        return z @ np.asarray(self.weights)
