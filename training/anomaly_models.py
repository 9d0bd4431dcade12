"""``fit-anomaly``'s candidates: training, choosing, mixing, smoothing and exporting them.

A ``Candidate`` is one trained checkpoint and its line in the summary. ``train_candidate``
trains one model type under a ``Prepared`` table's plan; ``select`` keeps the lowest
validation NLL (the rule of ``train --model auto``); ``search_smoothing`` trains the winner
again at other kernel scales; ``mix_candidates`` / ``ensemble_candidates`` make equal-weight
mixtures of flows; ``score_spec`` fits a served score kind; ``export_candidate`` calibrates
the threshold on the calibration rows and writes the served artifact.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from artifact.families import family
from artifact.scores import AnomalyScoreSpec
from training.anomaly_rows import Prepared, check_smoothing_scales, resmooth
from training.auto import best_by_validation
from training.checkpoint import Checkpoint
from training.config import ModelConfig, PreprocessConfig, TrainConfig, candidate_lr
from training.evaluate import data_log_prob
from training.export import export_checkpoint
from training.fit import fit_arrays
from training.flows.mixture import FlowMixture
from training.registry import MODEL_TYPES
from training.score_kinds import denoise_spec, dte_spec, latent_spec, synthetic_outliers

__all__ = [
    "DEFAULT_SMOOTHING_SEARCH",
    "ODE_CANDIDATES",
    "SCORES",
    "Candidate",
    "ensemble_candidates",
    "export_candidate",
    "mix_candidates",
    "models_for",
    "score_spec",
    "search_smoothing",
    "select",
    "train_candidate",
]

ODE_CANDIDATES = ("cfm",)
"""What ``--score denoise|dte`` trains without ``--model``: a flow-matching model (no noise
schedule to choose; one velocity call per noise level when served)."""
SCORES = ("nll", "denoise", "dte", "latent")
# smoothing scales (std) the winning type is trained again at: docs/anomaly-selection-protocol.md
DEFAULT_SMOOTHING_SEARCH = (0.2, 0.5)



@dataclass
class Candidate:
    """One trained candidate and its line in the summary."""
    ckpt: Any  # training.checkpoint.Checkpoint
    entry: dict[str, Any]


def train_candidate(prep: Prepared, kind: str, seed: int = 0, *,
                    progress: bool = False) -> Candidate:
    """Train one model type under ``prep.plan``; its entry holds the validation NLL (nats/row,
    data units, discrete columns dequantized: the figure candidates are compared on)."""
    plan = prep.plan
    model_cfg = ModelConfig(hidden_features=plan.hidden_features,
                            hidden_layers=plan.hidden_layers, transforms=plan.transforms,
                            bins=plan.bins, tail_bound=plan.tail_bound)
    train_cfg = TrainConfig(steps=plan.steps, batch_size=plan.batch_size,
                            lr=candidate_lr(kind, plan.lr),
                            weight_decay=plan.weight_decay, eval_every=plan.eval_every,
                            patience=plan.patience, seed=seed, progress=progress,
                            warmup_steps=min(100, plan.steps // 10))
    t0 = time.perf_counter()
    conditioned = {} if prep.condition is None else {
        "condition": prep.condition, "c_train": prep.c_train, "c_val": prep.c_val}
    ckpt = fit_arrays(kind, prep.xt, prep.xv, data=prep.summary, model_cfg=model_cfg,
                      pre_cfg=PreprocessConfig(standardize=True), train_cfg=train_cfg,
                      **conditioned)
    s = ckpt.config.summary
    # A flow's validation NLL is one pass; an ODE model's would integrate the PF-ODE over
    # thousands of rows, so ODE candidates are compared on their validation loss.
    val_nll = (float(-np.mean(data_log_prob(ckpt, prep.xv, condition=prep.c_val)["log_prob"]))
               if ckpt.config.family == "flow" else math.nan)
    entry = {"model_type": kind, "seed": seed, "lr": train_cfg.lr, "smoothing": plan.smoothing,
             "val_nll": val_nll,
             "val_loss": float(s["best_val_loss"]),
             "steps": int(s["steps"]), "best_step": int(s["best_step"]),
             "seconds": round(time.perf_counter() - t0, 3)}
    return Candidate(ckpt, entry)


def search_smoothing(prep: Prepared, chosen: Candidate, scales: Sequence[float],
                     seed: int = 0, *, progress: bool = False
                     ) -> tuple[Prepared, Candidate, list[Candidate]]:
    """``chosen``'s model type trained again at each smoothing scale (same seed, same
    validation rows): the kernel scale chosen by held-out likelihood. Returns the winner
    among ``chosen`` and these, with its ``Prepared`` (its plan records the scale), and the
    new candidates (for the summary's list of what was tried)."""
    kind = chosen.entry["model_type"]
    pairs = [(prep, chosen)]
    for s in check_smoothing_scales(scales):
        sp = resmooth(prep, s, seed)
        pairs.append((sp, train_candidate(sp, kind, chosen.entry["seed"], progress=progress)))
    best = select([c for _, c in pairs])
    best_prep = next(p for p, c in pairs if c is best)
    return best_prep, best, [c for _, c in pairs[1:]]


def select(candidates: Sequence[Candidate], key: str = "val_nll") -> Candidate:
    """The candidate with the lowest finite validation NLL (or other entry ``key``): the
    rule of ``train --model auto`` (``training.auto.best_by_validation``)."""
    return candidates[best_by_validation({i: -c.entry[key] for i, c in enumerate(candidates)})]


def mix_candidates(prep: Prepared, members: Sequence[Candidate]) -> Candidate:
    """An equal-weight mixture of trained candidates (``training.flows.mixture``), scored on
    the same validation rows. The members share their preprocessing: each was fitted on the
    same training copies, and a mismatch is an error rather than a silent approximation."""

    first = members[0].ckpt
    reference = first.preprocessor.state_dict()
    for c in members[1:]:
        other = c.ckpt.preprocessor.state_dict()
        if reference.keys() != other.keys() or not all(
                torch.equal(reference[k], other[k]) for k in reference):
            raise ValueError("mixture members must share their preprocessing")
    kinds = [c.entry["model_type"] for c in members]
    name = "mixture(" + "+".join(kinds) + ")"
    config = first.config.model_copy(deep=True)
    config.model_type = name
    config.summary = {"members": [c.entry for c in members]}
    ckpt = Checkpoint(model=FlowMixture([c.ckpt.model for c in members]).eval(),
                      preprocessor=first.preprocessor, config=config)
    val_nll = float(-np.mean(data_log_prob(ckpt, prep.xv)["log_prob"]))
    entry = {"model_type": name, "seed": "+".join(str(c.entry["seed"]) for c in members),
             "val_nll": val_nll, "steps": sum(c.entry["steps"] for c in members),
             "best_step": max(c.entry["best_step"] for c in members),
             "seconds": round(sum(c.entry["seconds"] for c in members), 3)}
    return Candidate(ckpt, entry)


def ensemble_candidates(prep: Prepared, trained: Sequence[Candidate]) -> list[Candidate]:
    """The mixtures an ensemble chooses among: each model type's seeds mixed, and, with more
    than one type, every trained member mixed."""
    by_kind: dict[str, list[Candidate]] = {}
    for c in trained:
        by_kind.setdefault(c.entry["model_type"], []).append(c)
    groups = [group for group in by_kind.values() if len(group) >= 2]
    if len(by_kind) > 1:
        groups.append(list(trained))
    return [mix_candidates(prep, group) for group in groups]


def export_candidate(
    prep: Prepared,
    chosen: Candidate,
    out_dir: str | os.PathLike[str],
    *,
    target_fpr: float = 0.01,
    formats: tuple[str, ...] = ("onnx",),
    name: str | None = None,
    tried: Sequence[dict[str, Any]] = (),
    score: AnomalyScoreSpec | None = None,
    latents: np.ndarray | None = None,
    score_selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Calibrate ``chosen``'s anomaly score (``score``; default ``nll``) on the calibration
    rows (raw, as served) and export it."""
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1); got {target_fpr}")
    ckpt = chosen.ckpt
    tried = list(tried) or [chosen.entry]
    ckpt.config.summary["anomaly"] = {"plan": asdict(prep.plan), "candidates": tried,
                                      "columns": prep.noise.describe(), "rows": prep.rows}
    t0 = time.perf_counter()
    nll_val = (-data_log_prob(ckpt, prep.xv, condition=prep.c_val)["log_prob"]
               if prep.condition is not None else -data_log_prob(ckpt, prep.x_val)["log_prob"]
               if ckpt.config.family == "flow" else np.full(1, math.nan))
    exported = export_checkpoint(ckpt, out_dir, formats=formats, name=name,
                                 target_fpr=target_fpr, calibration_rows=prep.x_cal,
                                 calibration_condition=prep.c_cal, score=score,
                                 latents=latents)
    manifest, nll_cal = exported.manifest, exported.calibration_scores
    threshold = float(manifest.calibration.threshold)
    n_cal, dim = len(nll_cal), prep.x_train.shape[1]
    return {
        "out": str(out_dir),
        "name": manifest.name,
        "model_type": chosen.entry["model_type"],
        "score": manifest.score_kind,
        "score_selection": score_selection or {},
        "seed": chosen.entry["seed"],
        "data": prep.summary.name,
        "note": prep.note,
        "rows": prep.rows,
        "dim": dim,
        "val_nll": float(np.mean(nll_val)),
        "val_nll_per_dim": float(np.mean(nll_val)) / dim,
        "threshold": threshold,
        "threshold_per_dim": threshold / dim,
        "target_fpr": target_fpr,
        "expected_fpr": target_fpr,
        "expected_fpr_se": math.sqrt(target_fpr * (1 - target_fpr) / n_cal),
        "calibration_flagged": float(np.mean(nll_cal > threshold)),
        "candidates": tried,
        "plan": asdict(prep.plan),
        "columns": prep.noise.describe(),
        "fit_seconds": round(sum(c["seconds"] for c in tried), 3),
        "export_seconds": round(time.perf_counter() - t0, 3),
    }


def models_for(score: str, model: str | Sequence[str] | None,
                ensemble: int) -> str | Sequence[str] | None:
    """The candidate model types of a score kind, checked against their families."""
    if score not in SCORES:
        raise ValueError(f"unknown score {score!r}; choose one of: {', '.join(SCORES)}")
    if score == "nll":
        return model
    if ensemble > 1:
        raise ValueError(f"--score {score} serves a single model; use ensemble 1")
    kinds = ([model] if isinstance(model, str) else list(model)) if model else (
        list(ODE_CANDIDATES) if score in ("denoise", "dte") else None)
    for kind in kinds or ():
        fam = MODEL_TYPES[kind].family if kind in MODEL_TYPES else None
        if fam is not None and score not in family(fam).score_kinds:
            raise ValueError(f"score {score!r} does not apply to {kind} (a {fam} model); "
                             f"a {fam} model serves: {', '.join(family(fam).score_kinds)}")
    return kinds


def score_spec(prep: Prepared, chosen: Candidate, score: str, seed: int = 0,
               ) -> tuple[AnomalyScoreSpec | None, np.ndarray | None, dict[str, Any]]:
    """The served score's spec for ``chosen`` (None: ``nll``), the latents it stores, and
    what was measured to fit it (normal rows and synthetic outliers only)."""
    if score == "denoise":
        outliers = synthetic_outliers(prep.x_val, prep.x_train, seed)
        spec, tried = denoise_spec(chosen.ckpt, prep.x_val, outliers, seed)
        return spec, None, {"auroc_vs_synthetic": tried, "weights": spec.weights}
    if score == "dte":
        return dte_spec(chosen.ckpt), None, {}
    if score == "latent":
        spec, latents = latent_spec(chosen.ckpt, prep.x_train, seed)
        return spec, latents, {"latent_rows": len(latents)}
    return None, None, {}
