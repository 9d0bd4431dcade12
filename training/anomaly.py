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

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from artifact.conditions import ConditionSpec
from artifact.families import family
from artifact.scores import AnomalyScoreSpec
from training.auto import AUTO, AUTO_CANDIDATES, best_by_validation
from training.checkpoint import Checkpoint, DataSummary
from training.conditioning import ConditionData, condition_data
from training.config import ModelConfig, PreprocessConfig, TrainConfig
from training.data import DataError, load_data
from training.evaluate import data_log_prob
from training.export import export_checkpoint
from training.fit import fit_arrays
from training.flows.mixture import FlowMixture
from training.registry import MODEL_TYPES, family_of
from training.score_kinds import (
    denoise_spec,
    dte_spec,
    latent_spec,
    synthetic_outliers,
)

__all__ = [
    "DEFAULT_CANDIDATES",
    "DEFAULT_SMOOTHING_SEARCH",
    "ODE_CANDIDATES",
    "SCORES",
    "Candidate",
    "ColumnNoise",
    "Plan",
    "Prepared",
    "check_smoothing_scales",
    "choose_plan",
    "column_noise",
    "ensemble_candidates",
    "export_candidate",
    "fit_anomaly",
    "format_summary",
    "mix_candidates",
    "prepare",
    "resmooth",
    "score_spec",
    "search_smoothing",
    "select",
    "train_candidate",
]

DEFAULT_CANDIDATES = ("maf", "nsf")
ODE_CANDIDATES = ("cfm",)
"""What ``--score denoise|dte`` trains without ``--model``: a flow-matching model (no noise
schedule to choose; one velocity call per noise level when served)."""
SCORES = ("nll", "denoise", "dte", "latent")
AUTO_ORDER = ("nll", "latent", "denoise", "dte")
"""``--score auto``'s candidates, cheapest first: a later kind must beat an earlier one's
statistic by more than ``AUTO_MARGIN`` (docs/anomaly-selection-protocol.md, third protocol)."""
AUTO_MARGIN = 0.01
# smoothing scales (std) the winning type is trained again at: docs/anomaly-selection-protocol.md
DEFAULT_SMOOTHING_SEARCH = (0.2, 0.5)
MIN_ROWS = 10
TRAIN_COPIES_ROWS = 20_000  # training rows x noise copies aimed at
VAL_COPIES_ROWS = 4_000
MAX_COPIES = 32
MAX_SMOOTHING = 2.0  # standard deviations: wider than this is no longer a model of the rows


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Plan:
    """What ``fit_anomaly`` trains: the outcome of the defaults policy for one table."""
    tier: str
    candidates: tuple[str, ...]
    hidden_features: int
    hidden_layers: int
    transforms: int
    weight_decay: float
    steps: int
    eval_every: int
    patience: int
    lr: float = 1e-3
    batch_size: int = 256
    noise: float = 0.05  # Gaussian noise of continuous columns, in units of their std
    # Gaussian noise on every column, discrete ones included (on top of their dequantization),
    # in units of the column's std; 0 = none. A kernel-smoothing scale: bench.anomaly_val
    # measures what held-out NLL would choose for it.
    smoothing: float = 0.0
    bins: int = 8
    tail_bound: float = 5.0


_TIERS = (  # (max rows, tier, hidden, transforms, weight decay, steps, eval every, patience)
    (1_000, "small", 32, 3, 1e-2, 2000, 25, 10),
    (10_000, "medium", 64, 4, 1e-3, 2000, 50, 8),
    (100_000, "large", 128, 5, 1e-4, 4000, 100, 8),
    (math.inf, "very large", 256, 6, 1e-5, 8000, 200, 8),
)


def choose_plan(rows: int, dim: int, candidates: Sequence[str] | None = None) -> Plan:
    """The defaults for ``rows`` training rows of ``dim`` columns (see the module docstring)."""
    row = next(t for t in _TIERS if rows < t[0])
    _, tier, hidden, transforms, wd, steps, every, patience = row
    if candidates is None:
        candidates = DEFAULT_CANDIDATES if dim >= 2 else ("maf",)
    return Plan(
        tier=tier,
        candidates=tuple(candidates),
        hidden_features=int(min(max(hidden, dim), 512)),
        hidden_layers=2,
        transforms=transforms,
        weight_decay=wd,
        steps=steps,
        eval_every=every,
        patience=patience,
        batch_size=256 if rows < 100_000 else 512,
    )


@dataclass(frozen=True)
class ColumnNoise:
    """Training-time noise per column: uniform dequantization or Gaussian regularization.

    Attributes:
        step: ``(dim,)`` grid step of discrete columns (uniform noise on ``[-step/2, step/2)``),
            0 for continuous columns.
        sigma: ``(dim,)`` Gaussian noise std: continuous columns, and every column when the
            plan smooths (``Plan.smoothing``); 0 otherwise.
    """
    step: np.ndarray
    sigma: np.ndarray

    @property
    def discrete(self) -> np.ndarray:
        return self.step > 0

    def apply(self, x: np.ndarray, copies: int, rng: np.random.Generator) -> np.ndarray:
        """``copies`` noisy copies of ``x: (rows, dim)`` stacked: ``(copies * rows, dim)``."""
        tiled = np.tile(x, (copies, 1))
        uniform = rng.uniform(-0.5, 0.5, tiled.shape) * self.step
        gauss = rng.standard_normal(tiled.shape) * self.sigma
        return tiled + uniform + gauss

    def apply_discrete(self, x: np.ndarray, copies: int, rng: np.random.Generator) -> np.ndarray:
        """Dequantize the discrete columns only (validation rows: a proper lower bound on the
        log-mass there, the served density on the continuous columns)."""
        tiled = np.tile(x, (copies, 1))
        return tiled + rng.uniform(-0.5, 0.5, tiled.shape) * self.step

    def describe(self) -> dict[str, Any]:
        return {"discrete_columns": [int(i) for i in np.flatnonzero(self.discrete)],
                "step": [float(v) for v in self.step],
                "sigma": [float(v) for v in self.sigma]}


def column_noise(x: np.ndarray, noise: float = 0.05, smoothing: float = 0.0) -> ColumnNoise:
    """Classify the columns of ``x: (rows, dim)`` and choose their training-time noise:
    ``noise`` (Gaussian, in units of the column's std) on continuous columns, and at least
    ``smoothing`` (likewise) on every column."""
    rows, dim = x.shape
    step = np.zeros(dim)
    sigma = np.zeros(dim)
    for j in range(dim):
        col = x[:, j]
        values = np.unique(col)
        if len(values) == 1:
            step[j] = 1.0  # StandardScaler's convention for a zero-variance column
        elif len(values) <= rows / 2:
            gaps = np.diff(values)
            scale = float(values[-1] - values[0])
            step[j] = float(gaps[gaps > 1e-9 * scale].min())
        else:
            sigma[j] = noise * float(col.std())
    if smoothing > 0:
        sigma = np.maximum(sigma, smoothing * x.std(0))
    return ColumnNoise(step=step, sigma=sigma)


def _noise_rng(seed: int) -> np.random.Generator:
    """The generator of the training noise (drawn first) and then the validation noise:
    ``prepare`` and ``resmooth`` share it, so a new smoothing scale rescales the same draws."""
    return np.random.default_rng([seed, 1])


def _copies(rows: int, aim: int) -> int:
    return int(min(max(math.ceil(aim / max(rows, 1)), 1), MAX_COPIES))


# --------------------------------------------------------------------------- data


def _as_rows(data: Any) -> tuple[np.ndarray, str, str, str, list[str]]:
    """``(x, name, source, note, column names)`` from a path (``.csv/.npy/.npz/.parquet``) or
    an array."""
    note = ""
    columns: list[str] = []
    if isinstance(data, (str, os.PathLike)):
        dataset = load_data(data)
        x, name, source = dataset.x, dataset.name, dataset.source
        columns = list(dataset.columns)
        if dataset.y is not None:  # a labelled .npz: train on the rows labelled normal (0)
            normal = np.asarray(dataset.y) == 0
            if not normal.any():
                raise DataError(f"{data}: its 'y' labels no row as normal (y == 0); "
                                "fit-anomaly needs normal rows")
            x = x[normal]
            note = f"used the {int(normal.sum())} rows with y == 0 of {len(normal)}"
    else:
        try:
            x = np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError("data must be a numeric (rows, columns) array or a "
                            ".csv/.npy/.npz path") from None
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] == 0:
            raise DataError(f"data must be a 2-D (rows, columns) array, got shape {x.shape}")
        bad = np.argwhere(~np.isfinite(x))
        if len(bad):
            r, c = bad[0]
            raise DataError(f"data row {r + 1}, column {c + 1} is {x[r, c]}; NaN/Inf values "
                            "are not allowed, remove or impute them")
        name, source = "array", "array"
    if len(x) < MIN_ROWS:
        raise DataError(f"fit-anomaly needs at least {MIN_ROWS} normal rows, got {len(x)}")
    return x, name, source, note, columns


def _split(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    order = np.random.default_rng(seed).permutation(rows)
    if rows >= 2000:
        n_val = n_cal = round(0.15 * rows)
        n_train = rows - n_val - n_cal
        return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    n_val = max(2, round(0.2 * rows))
    return order[n_val:], order[:n_val], None


# --------------------------------------------------------------------------- fitting


@dataclass
class Prepared:
    """A table split, its columns classified and its noisy training/validation copies."""
    plan: Plan
    x_train: np.ndarray  # raw rows
    x_val: np.ndarray
    x_cal: np.ndarray  # the validation rows themselves when the table is small
    xt: np.ndarray  # noisy training copies
    xv: np.ndarray  # validation rows, discrete columns dequantized
    noise: ColumnNoise
    summary: Any  # training.checkpoint.DataSummary
    rows: dict[str, Any]
    note: str = ""
    # a conditional model's condition (artifact.conditions) and each row's, split alike
    condition: ConditionSpec | None = None
    c_train: np.ndarray | None = None  # of xt (the noisy copies)
    c_val: np.ndarray | None = None  # of xv
    c_cal: np.ndarray | None = None  # of x_cal


@dataclass
class Candidate:
    """One trained candidate and its line in the summary."""
    ckpt: Any  # training.checkpoint.Checkpoint
    entry: dict[str, Any]


def prepare(
    data: str | os.PathLike[str] | np.ndarray,
    *,
    seed: int = 0,
    model: str | Sequence[str] | None = None,
    plan: Plan | None = None,
    steps: int | None = None,
    label_col: str | None = None,
    context_cols: Sequence[str] | None = None,
) -> Prepared:
    """Load, split, classify columns, choose the plan and draw the training noise.

    ``label_col`` / ``context_cols``: a conditional model's label or context columns of the
    table (not features); every row of the table is normal."""
    cond = None
    if label_col or context_cols:
        cond, x, data_name, source, columns = _conditioned_rows(data, seed, label_col,
                                                                context_cols)
        note = f"conditioned on {cond.spec.kind} column(s) {', '.join(cond.spec.columns)}"
    else:
        x, data_name, source, note, columns = _as_rows(data)
    rows, dim = x.shape
    train_idx, val_idx, cal_idx = _split(rows, seed)
    x_train, x_val = x[train_idx], x[val_idx]
    x_cal = x_val if cal_idx is None else x[cal_idx]
    candidates = None if model is None else ((model,) if isinstance(model, str) else tuple(model))
    if candidates == (AUTO,):
        candidates = AUTO_CANDIDATES
    for kind in candidates or ():  # diffusion / flow matching work too (ODE likelihood)
        if kind not in MODEL_TYPES:
            raise ValueError(f"unknown model type {kind!r}; choose from {', '.join(MODEL_TYPES)}")
    if plan is None:
        plan = choose_plan(len(x_train), dim, candidates)
    elif candidates is not None:
        plan = replace(plan, candidates=candidates)
    if steps is not None:
        plan = replace(plan, steps=steps, eval_every=min(plan.eval_every, steps))
    if dim == 1:
        coupling = [k for k in plan.candidates if k in ("nice", "realnvp", "glow", "nsf")]
        if coupling:
            raise ValueError(f"{', '.join(coupling)} need at least 2 columns; use maf")
    rng = _noise_rng(seed)
    noise = column_noise(x_train, plan.noise, plan.smoothing)
    train_copies = _copies(len(x_train), TRAIN_COPIES_ROWS)
    xt = noise.apply(x_train, train_copies, rng)
    val_copies = _copies(len(x_val), VAL_COPIES_ROWS) if noise.discrete.any() else 1
    disc = noise.discrete
    lo = x_train[:, disc].min(0) - noise.step[disc] / 2
    hi = x_train[:, disc].max(0) + noise.step[disc] / 2
    seen = ((x_val[:, disc] >= lo) & (x_val[:, disc] <= hi)).all(1)
    x_sel = x_val[seen] if 2 * seen.sum() >= len(x_val) else x_val
    xv = noise.apply_discrete(x_sel, val_copies, rng)
    summary = DataSummary(name=data_name, source=source, rows=rows, dim=dim,
                          split_seed=seed, mean=x_train.mean(0).tolist(),
                          std=x_train.std(0).tolist(), columns=columns)
    info = {"total": rows, "train": len(x_train), "val": len(x_val), "calibration": len(x_cal),
            "calibration_is_val": cal_idx is None, "train_noisy_copies": len(xt) // len(x_train),
            "val_copies": val_copies, "val_for_selection": len(x_sel)}
    if cond is None:
        return Prepared(plan, x_train, x_val, x_cal, xt, xv, noise, summary, info, note)
    values = cond.values  # the copies are stacked copy-major, as np.tile stacks them
    c_val = values[val_idx][seen] if 2 * seen.sum() >= len(x_val) else values[val_idx]
    return Prepared(plan, x_train, x_val, x_cal, xt, xv, noise, summary, info, note,
                    cond.spec, _tile(values[train_idx], train_copies),
                    _tile(c_val, val_copies),
                    values[val_idx] if cal_idx is None else values[cal_idx])


def _tile(values: np.ndarray, copies: int) -> np.ndarray:
    return np.tile(values, (copies,) + (1,) * (values.ndim - 1))


def _conditioned_rows(data: Any, seed: int, label_col: str | None,
                      context_cols: Sequence[str] | None,
                      ) -> tuple[ConditionData, np.ndarray, str, str, list[str]]:
    """A table's features and condition (``training.conditioning``), the condition fitted on
    the rows :func:`_split` trains on."""
    if not isinstance(data, (str, os.PathLike)):
        raise DataError("--label-col and --context-cols name columns of a CSV or Parquet file")
    dataset = load_data(data)
    if len(dataset.x) < MIN_ROWS:
        raise DataError(f"fit-anomaly needs at least {MIN_ROWS} normal rows, got "
                        f"{len(dataset.x)}")
    train_idx = _split(len(dataset.x), seed)[0]
    kind = "label" if label_col else "context"
    cond = condition_data(dataset, kind, train_idx, label_col=label_col,
                          context_cols=list(context_cols or []))
    return cond, cond.x, dataset.name, dataset.source, list(cond.columns)


def train_candidate(prep: Prepared, kind: str, seed: int = 0, *,
                    progress: bool = False) -> Candidate:
    """Train one model type under ``prep.plan``; its entry holds the validation NLL (nats/row,
    data units, discrete columns dequantized: the figure candidates are compared on)."""
    plan = prep.plan
    model_cfg = ModelConfig(hidden_features=plan.hidden_features,
                            hidden_layers=plan.hidden_layers, transforms=plan.transforms,
                            bins=plan.bins, tail_bound=plan.tail_bound)
    train_cfg = TrainConfig(steps=plan.steps, batch_size=plan.batch_size, lr=plan.lr,
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
    entry = {"model_type": kind, "seed": seed, "smoothing": plan.smoothing, "val_nll": val_nll,
             "val_loss": float(s["best_val_loss"]),
             "steps": int(s["steps"]), "best_step": int(s["best_step"]),
             "seconds": round(time.perf_counter() - t0, 3)}
    return Candidate(ckpt, entry)


def check_smoothing_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """``scales`` as floats, each in (0, MAX_SMOOTHING]; a clear error otherwise."""
    out = []
    for s in scales:
        v = float(s)
        if not (math.isfinite(v) and 0.0 < v <= MAX_SMOOTHING):
            raise ValueError(f"smoothing scales must be in (0, {MAX_SMOOTHING:g}] standard "
                             f"deviations; got {s!r}")
        out.append(v)
    return tuple(dict.fromkeys(out))


def resmooth(prep: Prepared, smoothing: float, seed: int = 0) -> Prepared:
    """``prep`` with Gaussian smoothing of ``smoothing`` standard deviations on every column:
    the training copies are drawn again from the same generator, and the validation rows
    (``xv``), calibration rows and split are kept, so validation NLLs stay comparable."""
    plan = replace(prep.plan, smoothing=smoothing)
    noise = column_noise(prep.x_train, plan.noise, plan.smoothing)
    copies = len(prep.xt) // len(prep.x_train)
    xt = noise.apply(prep.x_train, copies, _noise_rng(seed))  # prepare's first draws
    return replace(prep, plan=plan, noise=noise, xt=xt)


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
    model = _models_for(score, model, ensemble)
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
    if scales and _past(started, budget_s, 1 / 3):
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


def _past(started: float, budget_s: float | None, share: float) -> bool:
    return budget_s is not None and time.perf_counter() - started > share * budget_s


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
    if _past(started, budget_s, 1 / 3):
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
    if _past(started, budget_s, 1 / 2):
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


def _models_for(score: str, model: str | Sequence[str] | None,
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
