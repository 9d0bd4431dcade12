"""``genserve fit-anomaly`` and ``genserve score``: one-command anomaly models for pipelines.

``fit_anomaly(data, out_dir)`` takes a table of *normal* rows, picks sensible defaults for its
size and shape, trains, calibrates the anomaly threshold on held-out normal rows and exports
one served artifact (``manifest.json`` + graphs, the same as ``genserve export``).
``score_file(model_dir, in_path, out_path)`` streams a large file through that artifact in
chunks and writes one CSV row per input row: the numbers ``/anomaly_score`` returns.

The score
---------
* ``score``: the negative log-likelihood of the row in nats, in the units of the user's data
  (every preprocessing log-det counted). Higher is more anomalous. ``per_dim=True`` divides it
  (and the threshold) by the number of columns: nats per dimension, comparable across tables
  of different widths; the ranking and the flags do not change.
* ``percentile``: where the score falls among the normal *calibration* rows, in [0, 100]
  (interpolated between 201 stored quantiles; 99 means "higher than 99 % of normal rows").
* ``is_anomaly``: ``score > threshold``, the threshold being the ``1 - target_fpr`` quantile
  of the calibration rows' NLL, so about ``target_fpr`` of fresh normal rows are flagged.

The defaults policy (``choose_plan``; every choice is made from the training rows or the
validation rows, never from anomalies)
-------------------------------------------------------------------------------------------
* **Splits.** The normal rows are shuffled (``seed``) into train / validation / calibration
  70 / 15 / 15 when there are at least 2000 rows; below that, 80 / 20 with the validation
  rows doubling as calibration rows (a small data set cannot spare a third split; early
  stopping on the same rows biases the threshold slightly low, i.e. a little above
  ``target_fpr`` of normal rows flagged).
* **Columns.** A column whose distinct values number at most half its rows is *discrete*
  (counts, ratings, one-hot flags, rounded readings, constants). A continuous density fitted
  to such a column piles onto the grid points and its likelihood becomes meaningless, so it
  is *dequantized*: uniform noise of one grid step (the smallest gap between its distinct
  values, centred on each value) is added to the training and validation rows; a column
  constant in the training rows gets a step of 1 data unit (the unit scale scikit-learn's
  ``StandardScaler`` gives a zero-variance column: a tiny step would make any other value
  cost millions of nats and let one such validation row drive early stopping). Continuous
  columns get Gaussian noise of ``noise * std`` (noise regularization, which also keeps
  exactly duplicated or collinear columns from collapsing the density to zero volume). Noise
  is drawn afresh for several copies of each training row (about 20 000 rows in all) and
  fixed for the validation rows; scoring always uses the raw rows. All columns are then
  standardized (the log-det counted). ``Plan.smoothing`` (default 0) adds Gaussian noise of
  that many standard deviations to every column, discrete ones included: a kernel-smoothing
  scale, chosen by held-out likelihood: the winning model type (below) is trained again at
  smoothing 0.2 and 0.5 (``DEFAULT_SMOOTHING_SEARCH``; ``smoothing_search``,
  ``--smoothing-search S ...``, ``--no-smoothing-search``), same seed and same validation
  rows, and the lowest validation NLL of the three is exported (the protocol behind this
  default: ``docs/anomaly-selection-protocol.md``).
* **Validation rows for early stopping and the choice of model.** A validation row whose
  value in some discrete column lies outside that column's training range (a category never
  seen in training, e.g. the rare value of a flag) is left out of early stopping and of the
  comparison of candidates: its NLL measures the flow's extrapolation, which training does
  not improve, and a single such row can dominate the mean. (Unless that would leave fewer
  than half the validation rows.) Calibration always uses every calibration row.
* **Size.** By the number of training rows ``n`` and columns ``d``:

  =============  ===========  =======  ==========  ============  =====  ======================
  tier           rows n       hidden   flow steps  weight decay  steps  validation every
  =============  ===========  =======  ==========  ============  =====  ======================
  small          < 1 000      32       3           1e-2          2000   25 steps, patience 10
  medium         < 10 000     64       4           1e-3          2000   50 steps, patience 8
  large          < 100 000    128      5           1e-4          4000   100 steps, patience 8
  very large     >= 100 000   256      6           1e-5          8000   200 steps, patience 8
  =============  ===========  =======  ==========  ============  =====  ======================

  ``hidden`` is raised to at least ``d`` (so MADE sees every input) and capped at 512; two
  hidden layers; learning rate 1e-3 with warmup and cosine decay, gradient clipping, early
  stopping on the validation NLL with the best weights kept.
* **Model type.** Candidates are ``maf`` (masked autoregressive affine) and ``nsf`` (spline
  coupling; ``maf`` alone for one column), each trained with the tier's settings; the one with
  the lowest validation NLL is exported.
* **Ensembles.** ``ensemble=k`` (k >= 2; at least 2 columns) trains ``k`` seeds of each
  candidate and serves an equal-weight mixture of flows, ``p = (1/K) sum_k p_k``, its members'
  log-likelihoods averaged in log space (``logsumexp - log K``,
  ``training.flows.mixture``). Unlike an average of scores, it is a normalised density: the
  service's log-likelihoods, anomaly scores, thresholds and samples stay exact and mean the
  same as a single flow's. The mixtures tried are each type's ``k`` seeds and, with several
  types, all members together; the lowest validation NLL is exported. One artifact, one
  graph per verb: a mixture of ``K`` members costs about ``K`` single models per row.

Example:
    >>> summary = fit_anomaly("normal.csv", "exported_models/my-detector", target_fpr=0.01)
    >>> score_file("exported_models/my-detector", "new.csv", "scores.csv")
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from training.anomaly_auto import choose_score_kind, over_budget
from training.anomaly_models import (
    DEFAULT_SMOOTHING_SEARCH,
    ensemble_candidates,
    export_candidate,
    models_for,
    score_spec,
    search_smoothing,
    select,
    train_candidate,
)
from training.anomaly_rows import Plan, check_smoothing_scales, prepare
from training.registry import MODEL_TYPES, family_of

__all__ = ["fit_anomaly", "format_summary"]


def fit_anomaly(
    data: str | os.PathLike[str] | np.ndarray,
    out_dir: str | os.PathLike[str],
    *,
    target_fpr: float = 0.01,
    seed: int = 0,
    ensemble: int = 1,
    model: str | Sequence[str] | None = None,
    plan: Plan | None = None,
    steps: int | None = None,
    smoothing_search: Sequence[float] | None = None,
    name: str | None = None,
    formats: tuple[str, ...] = ("onnx",),
    progress: bool = True,
    score: str = "nll",
    budget_s: float | None = None,
    label_col: str | None = None,
    context_cols: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Fit, calibrate and export an anomaly model on normal rows; returns a summary dict.

    Args:
        data: ``.csv/.npy/.npz`` path (an ``.npz`` with labels ``y`` uses its ``y == 0`` rows)
            or a ``(rows, columns)`` array of normal rows.
        out_dir: artifact directory to write (atomically); the served name is its folder name
            unless ``name`` is given.
        target_fpr: share of normal rows the calibrated threshold should flag, in (0, 1).
        seed: split, noise, initialisation and minibatch seed.
        ensemble: seeds trained per candidate model type. Above 1, the served model is an
            equal-weight mixture (see the module docstring): each type's seeds mixed, or all
            members mixed, whichever has the lowest validation NLL.
        model: a model type (or several candidates) instead of the default candidates.
        plan: a full ``Plan`` instead of ``choose_plan``'s (``model`` and ``steps`` still apply).
        steps: cap on optimizer steps per candidate (default: the plan's).
        smoothing_search: smoothing scales (standard deviations, each in (0, 2]) at which the
            winning model type is trained again; the lowest validation NLL among it and
            these is exported (kernel scale by held-out likelihood; see the module docstring).
            ``None``: ``DEFAULT_SMOOTHING_SEARCH`` for a single model, none for an ensemble;
            ``()``: no search.
        formats: export formats (``"onnx"``, ``"torchscript"``).
        progress: progress bars for training.
        score: the served anomaly score kind (``artifact.scores``): ``nll``; ``denoise`` or
            ``dte`` (a diffusion / flow-matching model, ``ODE_CANDIDATES`` unless ``model``
            says otherwise; no smoothing search); ``latent`` (the flow chosen as for ``nll``,
            scored by its latent neighbours); ``auto``: every kind that applies, chosen on
            normal rows by docs/anomaly-selection-protocol.md (third protocol).
        budget_s: wall-clock seconds the fit should take: past a third of it the smoothing
            search is skipped, past half of it (``auto``) the flow-matching candidates are;
            the summary's ``budget`` says what was dropped.
        label_col: a conditional model on each row's class in this column of a CSV or
            Parquet file (not a feature): its score is ``-log p(x | y)`` and its threshold is
            calibrated per class. Flows, score ``nll``, no ensemble or smoothing search.
        context_cols: likewise, on each row's context in these columns.
    Returns:
        JSON-able summary (``format_summary`` prints it): chosen model type, validation NLL
        (nats/row on the raw validation rows), threshold, expected false-positive rate, the
        candidates tried with their validation NLL, the plan, column handling and timings.
    """
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1); got {target_fpr}")
    if ensemble < 1:
        raise ValueError(f"ensemble must be >= 1; got {ensemble}")
    if label_col or context_cols:
        _check_conditional(score, ensemble, smoothing_search, model)
        smoothing_search = ()
    if score == "auto":
        return _fit_auto(data, out_dir, target_fpr=target_fpr, seed=seed, model=model,
                         plan=plan, steps=steps, smoothing_search=smoothing_search, name=name,
                         formats=formats, progress=progress, budget_s=budget_s)
    model = models_for(score, model, ensemble)
    if smoothing_search is None:
        smoothing_search = (DEFAULT_SMOOTHING_SEARCH
                            if ensemble == 1 and score in ("nll", "latent") else ())
    started = time.perf_counter()
    scales = check_smoothing_scales(smoothing_search)
    if scales and ensemble > 1:
        raise ValueError("a smoothing search and ensemble > 1 cannot be combined; pass "
                         "--no-smoothing-search (smoothing_search=()) or ensemble 1")
    prep = prepare(data, seed=seed, model=model, plan=plan, steps=steps, label_col=label_col,
                   context_cols=context_cols)
    if ensemble > 1 and prep.x_train.shape[1] < 2:
        raise ValueError("ensemble > 1 needs at least 2 columns (a mixture samples its member "
                         "from two noise columns); use ensemble=1")
    trained = [train_candidate(prep, kind, seed + 1000 * k, progress=progress)
               for kind in prep.plan.candidates for k in range(ensemble)]
    candidates = ensemble_candidates(prep, trained) if ensemble > 1 else trained
    tried = [c.entry for c in trained] + ([c.entry for c in candidates] if ensemble > 1 else [])
    chosen = select(candidates, "val_nll" if score in ("nll", "latent") else "val_loss")
    dropped = []
    if scales and over_budget(started, budget_s, 1 / 3):
        scales, dropped = (), ["smoothing search"]
    if scales:
        prep, chosen, extra = search_smoothing(prep, chosen, scales, seed, progress=progress)
        tried += [c.entry for c in extra]
    spec, latents, selection = score_spec(prep, chosen, score, seed)
    out = export_candidate(prep, chosen, out_dir, target_fpr=target_fpr,
                           formats=formats, name=name, tried=tried, score=spec,
                           latents=latents, score_selection=selection)
    return out | {"budget": {"budget_s": budget_s, "dropped": dropped},
                  "total_seconds": round(time.perf_counter() - started, 3)}


def _check_conditional(score: str, ensemble: int, smoothing_search: Sequence[float] | None,
                       model: str | Sequence[str] | None) -> None:
    """A conditional anomaly model is one flow scored by ``nll``."""
    if score != "nll" or ensemble != 1 or smoothing_search:
        raise ValueError("--label-col/--context-cols fit one conditional flow scored by nll: "
                         "leave out --score, --ensemble and --smoothing-search")
    kinds = (model,) if isinstance(model, str) else tuple(model or ())
    bad = [k for k in kinds if family_of(k) != "flow" or not MODEL_TYPES[k].conditional]
    if bad:
        raise ValueError(f"{', '.join(bad)} cannot be a conditional anomaly model; choose "
                         "conditional flows: nice, realnvp, glow, maf, iaf, nsf, nsf_ar")


def _fit_auto(data: Any, out_dir: Any, *, target_fpr: float, seed: int, model: Any,
              plan: Plan | None, steps: int | None, smoothing_search: Any, name: str | None,
              formats: tuple[str, ...], progress: bool, budget_s: float | None,
              ) -> dict[str, Any]:
    """``--score auto``: the third protocol of docs/anomaly-selection-protocol.md."""
    started = time.perf_counter()
    auto = choose_score_kind(data, seed=seed, model=model, plan=plan, steps=steps,
                             smoothing_search=smoothing_search, progress=progress,
                             budget_s=budget_s)
    c = auto.chosen
    out = export_candidate(c.prep, c.candidate, out_dir, target_fpr=target_fpr,
                           formats=formats, name=name, tried=auto.tried, score=c.spec,
                           latents=c.latents,
                           score_selection=c.selection | {"auto": auto.stats,
                                                          "chosen": auto.best})
    return out | {"budget": {"budget_s": budget_s, "dropped": auto.dropped},
                  "total_seconds": round(time.perf_counter() - started, 3)}


def format_summary(s: dict[str, Any]) -> str:
    """A few lines for the end of ``genserve fit-anomaly``."""
    cands = ", ".join(f"{c['model_type']}/{c['seed']}"
                      + (f" smoothing {c['smoothing']:g}" if c.get("smoothing") else "")
                      + f" {c['val_nll']:.3f}" for c in s["candidates"])
    r = s["rows"]
    cal = "validation" if r["calibration_is_val"] else "calibration"
    lines = [
        f"exported {s['name']} ({s['model_type']}, {s['dim']} columns, score "
        f"{s.get('score', 'nll')}) to {s['out']}",
        f"  rows: {r['train']} train / {r['val']} validation"
        + ("" if r["calibration_is_val"] else f" / {r['calibration']} calibration")
        + (f" ({s['note']})" if s["note"] else ""),
        f"  validation NLL: {s['val_nll']:.4f} nats/row ({s['val_nll_per_dim']:.4f} per "
        f"column); candidates by validation NLL: {cands}",
        f"  threshold: {s.get('score', 'nll')} > {s['threshold']:.4f} is flagged (quantile "
        f"of {r['calibration']} {cal} rows)",
        f"  expected false-positive rate: {100 * s['expected_fpr']:.2f} % "
        f"(± {100 * s['expected_fpr_se']:.2f} % from the calibration sample size)",
        f"  time: training {s['fit_seconds']:.1f} s, calibration and export "
        f"{s['export_seconds']:.1f} s",
    ]
    if r["calibration"] * s["target_fpr"] < 5:
        lines.insert(-1, f"  note: only {r['calibration']} calibration rows for a "
                     f"{100 * s['target_fpr']:.2g} % rate: the threshold is rough; give more "
                     "normal rows or a larger --target-fpr")
    return "\n".join(lines)
