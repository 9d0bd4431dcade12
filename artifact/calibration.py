"""Anomaly calibration: the normal rows' score distribution, stored in the manifest.

A model's anomaly score is of the kind its manifest names (``artifact.scores``: the negative
log-likelihood in nats per row by default). Calibration keeps the score's quantiles on normal
validation rows, so a served score has a percentile among normal rows and a threshold at any
false-positive rate; the one at the export's target is stored.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifact.scores import ScoreKind

__all__ = ["CALIBRATION_LEVELS", "Calibration", "calibrate", "percentile", "threshold_at"]

CALIBRATION_LEVELS = 201
"""Quantiles stored per calibration (every half percent)."""


class Calibration(BaseModel):
    """Anomaly calibration from normal validation rows: quantiles of the score of kind
    ``score`` (NLL in nats/sample by default)."""

    model_config = ConfigDict(extra="forbid")

    score: ScoreKind = "nll"
    levels: list[float] = Field(description="probabilities of the quantiles, increasing in [0,1]")
    quantiles: list[float] = Field(description="validation scores at those probabilities")
    target_fpr: float = Field(0.01, gt=0, lt=1)
    threshold: float = Field(description="score above which a row is flagged")
    rows: int = Field(ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> Calibration:
        if len(self.levels) != len(self.quantiles) or len(self.levels) < 2:
            raise ValueError("calibration levels and quantiles must be equal lists of >= 2")
        if any(b < a for a, b in zip(self.quantiles, self.quantiles[1:], strict=False)):
            raise ValueError("calibration quantiles must be non-decreasing")
        return self


def calibrate(nll: np.ndarray, target_fpr: float = 0.01, score: str = "nll") -> Calibration:
    """Quantiles of the normal rows' scores ``(rows,)`` (of kind ``score``) and the threshold
    at ``target_fpr``."""
    nll = np.sort(np.asarray(nll, dtype=np.float64))
    levels = np.linspace(0.0, 1.0, CALIBRATION_LEVELS)
    return Calibration(
        score=score,
        levels=[float(v) for v in levels],
        quantiles=[float(v) for v in np.quantile(nll, levels)],
        target_fpr=target_fpr,
        threshold=float(np.quantile(nll, 1.0 - target_fpr)),
        rows=len(nll),
    )


def threshold_at(cal: Calibration, target_fpr: float) -> float:
    """The score above which ``target_fpr`` of normal rows lie (interpolated quantile)."""
    return float(np.interp(1.0 - target_fpr, cal.levels, cal.quantiles))


def percentile(cal: Calibration, scores: np.ndarray) -> np.ndarray:
    """Each score's percentile ``[0, 100]`` among the normal calibration rows."""
    return 100.0 * np.interp(scores, cal.quantiles, cal.levels)
