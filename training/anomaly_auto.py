"""``fit-anomaly --score auto``: every score kind that applies, chosen on normal rows.

The third protocol of docs/anomaly-selection-protocol.md: each kind's AUROC of validation
rows against synthetic outliers made from them (``training.score_kinds``); ``nll`` unless a
kind later in ``AUTO_ORDER`` beats the best so far by more than ``AUTO_MARGIN``. The fitted
kinds are kept (``AutoChoice.options``), so a benchmark can score every kind it compared.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from artifact.scores import AnomalyScoreSpec
from training.anomaly_models import (
    DEFAULT_SMOOTHING_SEARCH,
    ODE_CANDIDATES,
    Candidate,
    score_spec,
    search_smoothing,
    select,
    train_candidate,
)
from training.anomaly_rows import Plan, Prepared, prepare
from training.score_kinds import synthetic_outliers

__all__ = ["AUTO_MARGIN", "AUTO_ORDER", "AutoChoice", "ScoreOption", "choose_score_kind",
           "over_budget"]

AUTO_ORDER = ("nll", "latent", "denoise", "dte")
"""``--score auto``'s candidates, cheapest first: a later kind must beat an earlier one's
statistic by more than ``AUTO_MARGIN`` (docs/anomaly-selection-protocol.md, third protocol)."""
AUTO_MARGIN = 0.01


def over_budget(started: float, budget_s: float | None, share: float) -> bool:
    return budget_s is not None and time.perf_counter() - started > share * budget_s


@dataclass
class ScoreOption:
    """One score kind fitted on normal rows: its data, model, spec and stored latents."""

    prep: Prepared
    candidate: Candidate
    spec: AnomalyScoreSpec | None
    latents: np.ndarray | None
    selection: dict[str, Any]

    def scores(self, x: np.ndarray, seed: int = 0) -> np.ndarray:
        """In-process scores of raw rows ``x`` (the served ones up to float32 rounding)."""
        from training.score_kinds import in_process_scores

        return in_process_scores(self.candidate.ckpt, self.spec or AnomalyScoreSpec(), x,
                                 seed=seed, latents=self.latents)


@dataclass
class AutoChoice:
    """``--score auto``'s fitted kinds, their statistic on normal rows, and the choice."""

    options: dict[str, ScoreOption]
    stats: dict[str, float]
    best: str
    tried: list[dict[str, Any]]
    dropped: list[str]

    @property
    def chosen(self) -> ScoreOption:
        return self.options[self.best]


def choose_score_kind(data: Any, *, seed: int = 0, model: Any = None, plan: Plan | None = None,
                      steps: int | None = None, smoothing_search: Any = None,
                      progress: bool = False, budget_s: float | None = None) -> AutoChoice:
    """Fit every score kind that applies and choose one on normal rows alone (the third
    protocol of docs/anomaly-selection-protocol.md): each kind's AUROC of validation rows
    against synthetic outliers made from them; ``nll`` unless a kind later in
    ``AUTO_ORDER`` beats the best so far by more than ``AUTO_MARGIN``."""
    from training.score_kinds import auroc

    started = time.perf_counter()
    if smoothing_search is None:
        smoothing_search = DEFAULT_SMOOTHING_SEARCH
    prep = prepare(data, seed=seed, model=model, plan=plan, steps=steps)
    trained = [train_candidate(prep, kind, seed, progress=progress)
               for kind in prep.plan.candidates]
    tried = [c.entry for c in trained]
    flow = select(trained)
    dropped = []
    if over_budget(started, budget_s, 1 / 3):
        dropped.append("smoothing search")
    elif smoothing_search:
        prep, flow, extra = search_smoothing(prep, flow, smoothing_search, seed,
                                             progress=progress)
        tried += [c.entry for c in extra]
    outliers = synthetic_outliers(prep.x_val, prep.x_train, seed)
    options: dict[str, ScoreOption] = {}
    for kind in ("nll", "latent"):
        if kind == "latent" and not hasattr(flow.ckpt.model, "encode_graphs"):
            continue
        options[kind] = ScoreOption(prep, flow, *score_spec(prep, flow, kind, seed))
    if over_budget(started, budget_s, 1 / 2):
        dropped.append("flow-matching candidates (denoise, dte)")
    else:
        ode_prep = prepare(data, seed=seed, model=ODE_CANDIDATES[0], plan=None, steps=steps)
        ode = train_candidate(ode_prep, ODE_CANDIDATES[0], seed, progress=progress)
        tried.append(ode.entry)
        for kind in ("denoise", "dte"):
            options[kind] = ScoreOption(ode_prep, ode, *score_spec(ode_prep, ode, kind, seed))
    stats = {kind: auroc(o.scores(o.prep.x_val), o.scores(outliers, seed=seed + 1))
             for kind, o in options.items()}
    best = "nll"
    for kind in AUTO_ORDER[1:]:
        if kind in stats and stats[kind] > stats[best] + AUTO_MARGIN:
            best = kind
    return AutoChoice(options, stats, best, tried, dropped)
