"""``genserve train --model auto``: the default flows trained in turn, the best one kept.

Each candidate (:data:`AUTO_CANDIDATES`) trains with its own defaults on the same split, the
same seed and an equal share of the wall-clock budget (time a candidate leaves unused passes
to the next); the one with the highest validation log-likelihood (nats per row, data units)
is returned, its checkpoint's summary recording every candidate's score under ``"auto"``.
``fit-anomaly`` chooses among its candidates with the same rule (:func:`best_by_validation`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from training.checkpoint import Checkpoint, save_checkpoint
from training.config import TrainConfig, default_train_config
from training.evaluate import checkpoint_splits, data_log_prob
from training.fit import fit

__all__ = ["AUTO", "AUTO_CANDIDATES", "best_by_validation", "fit_auto"]

AUTO = "auto"
# The residual flow joined when its own rate made it the closest default on 4 of the 6
# confirmation sets with a density (docs/BENCHMARKS.md, "Defaults on data nobody tuned for").
AUTO_CANDIDATES = ("nsf", "nsf_ar", "maf", "resflow")


def best_by_validation(scores: Mapping[str, float]) -> str:
    """The name with the highest finite validation log-likelihood in ``scores``."""
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    if not finite:
        raise FloatingPointError("every candidate's validation log-likelihood is non-finite; "
                                 "check the data for extreme values or choose --model")
    return max(finite, key=finite.__getitem__)


def validation_log_likelihood(ckpt: Checkpoint) -> float:
    """Mean log-likelihood (nats per row, data units) of the checkpoint's validation rows."""
    return float(np.mean(data_log_prob(ckpt, checkpoint_splits(ckpt).val)["log_prob"]))


def fit_auto(
    data: str,
    *,
    out: str | Path | None = None,
    budget_s: float | None = None,
    train_fields: Mapping[str, Any] | None = None,
    model_fields: Mapping[str, Any] | None = None,
    candidates: tuple[str, ...] = AUTO_CANDIDATES,
    **fit_args: Any,
) -> Checkpoint:
    """Train every candidate on ``data`` and keep the best; save it to ``out`` when given.

    ``budget_s``: wall-clock seconds for all candidates together (each stops at its share;
    every one still runs at least one step and one validation). ``train_fields`` and
    ``model_fields``: the fields a user gave, on top of each candidate's defaults.
    ``fit_args``: ``training.fit.fit``'s data arguments (rows, seeds).
    """
    started = time.perf_counter()
    trained: dict[str, Checkpoint] = {}
    scores: dict[str, dict[str, Any]] = {}
    for i, kind in enumerate(candidates):
        limit = None
        if budget_s is not None:
            left = budget_s - (time.perf_counter() - started)
            limit = max(left / (len(candidates) - i), 1e-3)
        train_cfg: TrainConfig = default_train_config(
            kind, **(dict(train_fields or {}) | ({"max_seconds": limit} if limit else {})))
        t0 = time.perf_counter()
        ckpt = fit(kind, data, train_cfg=train_cfg, model_fields=dict(model_fields or {}),
                   **fit_args)
        s = ckpt.config.summary
        scores[kind] = {"val_log_likelihood": validation_log_likelihood(ckpt),
                        "steps": int(s["steps"]), "best_step": int(s["best_step"]),
                        "seconds": round(time.perf_counter() - t0, 3)}
        trained[kind] = ckpt
        print(f"auto: {kind} validation log-likelihood "
              f"{scores[kind]['val_log_likelihood']:.4f} nats/row ({s['steps']} steps, "
              f"{scores[kind]['seconds']:.1f} s)", file=sys.stderr)
    chosen = best_by_validation({k: v["val_log_likelihood"] for k, v in scores.items()})
    ckpt = trained[chosen]
    ckpt.config.summary["auto"] = {
        "chosen": chosen, "candidates": scores, "budget_s": budget_s,
        "seconds": round(time.perf_counter() - started, 3)}
    print(f"auto: chose {chosen} (best validation log-likelihood of "
          f"{', '.join(candidates)})", file=sys.stderr)
    if out is not None:
        save_checkpoint(ckpt, out)
    return ckpt
