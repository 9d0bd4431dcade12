"""The rows ``fit-anomaly`` trains on: the defaults policy, the splits and the noise.

``choose_plan`` sizes the model from the table (the tiers of ``training.anomaly``'s module
docstring); ``prepare`` loads a table of normal rows, splits it (train / validation /
calibration), classifies its columns (discrete ones dequantized, continuous ones given
Gaussian noise) and draws the noisy training copies; ``resmooth`` redraws those copies at
another smoothing scale from the same generator, keeping the validation rows, so validation
NLLs stay comparable across scales. Every choice here is made from normal rows alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from artifact.conditions import ConditionSpec
from training.auto import AUTO, AUTO_CANDIDATES
from training.checkpoint import DataSummary
from training.conditioning import ConditionData, condition_data
from training.data import DataError, load_data
from training.registry import MODEL_TYPES

__all__ = [
    "DEFAULT_CANDIDATES",
    "ColumnNoise",
    "Plan",
    "Prepared",
    "check_smoothing_scales",
    "choose_plan",
    "column_noise",
    "prepare",
    "resmooth",
    "split_rows",
]

DEFAULT_CANDIDATES = ("maf", "nsf")
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


def split_rows(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    order = np.random.default_rng(seed).permutation(rows)
    if rows >= 2000:
        n_val = n_cal = round(0.15 * rows)
        n_train = rows - n_val - n_cal
        return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    n_val = max(2, round(0.2 * rows))
    return order[n_val:], order[:n_val], None



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
    train_idx, val_idx, cal_idx = split_rows(rows, seed)
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
    the rows :func:`split_rows` trains on."""
    if not isinstance(data, (str, os.PathLike)):
        raise DataError("--label-col and --context-cols name columns of a CSV or Parquet file")
    dataset = load_data(data)
    if len(dataset.x) < MIN_ROWS:
        raise DataError(f"fit-anomaly needs at least {MIN_ROWS} normal rows, got "
                        f"{len(dataset.x)}")
    train_idx = split_rows(len(dataset.x), seed)[0]
    kind = "label" if label_col else "context"
    cond = condition_data(dataset, kind, train_idx, label_col=label_col,
                          context_cols=list(context_cols or []))
    return cond, cond.x, dataset.name, dataset.source, list(cond.columns)


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
