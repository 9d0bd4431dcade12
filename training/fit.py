"""From data to checkpoint: load, split, fit preprocessing, build, train, save.

This is what ``genserve train`` runs; ``fit-anomaly`` and the benchmarks call it too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from artifact.conditions import ConditionSpec, condition_rows
from artifact.families import family
from training.checkpoint import (
    CALIBRATION_ROWS,
    Checkpoint,
    CheckpointConfig,
    DataSummary,
    save_checkpoint,
)
from training.conditioning import ConditionData, condition_data
from training.config import (
    ModelConfig,
    PreprocessConfig,
    TrainConfig,
    default_model_config,
    default_train_config,
)
from training.data import DataError, load_data, split, split_indices
from training.distributed import barrier, is_main_process
from training.preprocess import Preprocessor
from training.registry import build_model, family_of, is_image_model, trains_raw
from training.train import train_model

__all__ = ["default_preprocess", "fit", "fit_arrays"]


LOGIT_ALPHA = 0.05


def default_preprocess(levels: int | None) -> PreprocessConfig:
    """Real-valued data is standardized; integer data of known levels is dequantized and then
    logit-transformed (RealNVP, Sec. 4.1), as vectors and as images alike.

    Not standardized per column: columns that are (nearly) always 0, as digits' border pixels,
    get a tiny standard deviation, and a held-out row with a value there costs up to 1e10
    nats (maf on digits, 150 steps: test mean -126.0 nats, worst row -191.5, with
    dequantization + logit; ``test_integer_data_defaults_to_dequantize_and_logit``).
    """
    if levels is None:
        return PreprocessConfig()
    return PreprocessConfig(dequantize=True, levels=levels, standardize=False,
                            logit_alpha=LOGIT_ALPHA)


def fit_arrays(
    model_type: str,
    x_train: np.ndarray,
    x_val: np.ndarray,
    *,
    data: DataSummary,
    model_cfg: ModelConfig | None = None,
    pre_cfg: PreprocessConfig | None = None,
    train_cfg: TrainConfig | None = None,
    condition: ConditionSpec | None = None,
    c_train: np.ndarray | None = None,
    c_val: np.ndarray | None = None,
) -> Checkpoint:
    """Train ``model_type`` on ``x_train`` (rows, dim), validating on ``x_val``.

    The best-validation weights are kept; training stops early only when
    ``train_cfg.patience`` or ``train_cfg.max_seconds`` is set (by default it runs
    ``train_cfg.steps``). Configs not given are the model type's defaults
    (``training.config.default_model_config``, ``default_train_config``). A conditional
    model takes its ``condition`` and each row's (``c_train``, ``c_val``: class indices
    ``(rows,)`` or raw context rows ``(rows, width)``).
    """
    dim = x_train.shape[1]
    model_cfg = model_cfg or default_model_config(model_type, dim)
    train_cfg = train_cfg or default_train_config(model_type)
    if pre_cfg is None:
        pre_cfg = PreprocessConfig(standardize=False) if trains_raw(model_type) \
            else default_preprocess(data.levels)
    condition = _with_dropout(model_type, condition, model_cfg.cfg_dropout)
    if condition is not None:
        model_cfg = model_cfg.model_copy(update={"context_features": condition.width})
    torch.manual_seed(train_cfg.seed)  # parameter initialisation
    model = build_model(model_type, dim, model_cfg)
    pre = Preprocessor.fit(pre_cfg, x_train, data.levels)
    contexts = {} if condition is None else {
        "c_train": condition_rows(condition, c_train), "c_val": condition_rows(condition, c_val)}
    result = train_model(model, pre, x_train, x_val, train_cfg, **contexts)
    config = CheckpointConfig(
        model_type=model_type,
        family=family_of(model_type),
        dim=dim,
        model=model_cfg,
        preprocess=pre_cfg,
        train=train_cfg,
        data=data,
        summary=result.summary() | {"history": result.history},
        condition=condition,
    )
    keep = _calibration_keep(len(x_val), train_cfg.seed)
    return Checkpoint(model=model, preprocessor=pre, config=config,
                      calibration_rows=np.asarray(x_val[keep], dtype=np.float64),
                      calibration_condition=None if condition is None else c_val[keep])


def _with_dropout(kind: str, condition: ConditionSpec | None,
                  cfg_dropout: float) -> ConditionSpec | None:
    """The condition with its label dropout, or a ValueError where dropout does not apply."""
    if not cfg_dropout:
        return condition
    if condition is None or condition.kind != "label":
        raise ValueError("--cfg-dropout drops labels: it needs --condition label")
    if not family(family_of(kind)).guidance:
        raise ValueError(f"--cfg-dropout (classifier-free guidance) applies to diffusion and "
                         f"flow matching models; {kind!r} is a {family_of(kind)} model")
    return condition.model_copy(update={"cfg_dropout": cfg_dropout})


def _calibration_keep(rows: int, seed: int) -> np.ndarray:
    """The validation rows export calibrates on (a seeded subsample above the cap)."""
    if rows <= CALIBRATION_ROWS:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, CALIBRATION_ROWS, replace=False))


def fit(
    model_type: str,
    data: str,
    *,
    out: str | Path | None = None,
    rows: int | None = None,
    data_seed: int = 0,
    split_seed: int = 0,
    model_cfg: ModelConfig | None = None,
    pre_cfg: PreprocessConfig | None = None,
    train_cfg: TrainConfig | None = None,
    model_fields: dict[str, Any] | None = None,
    condition: str | None = None,
    label_col: str | None = None,
    context_cols: list[str] | None = None,
) -> Checkpoint:
    """Train ``model_type`` on a named set or a file; save to ``out`` when given.

    Without ``model_cfg`` the architecture is the model type's default for the data's
    dimension with ``model_fields`` (the fields a user gave) on top. ``condition``:
    ``"label"`` or ``"context"`` trains a conditional model on each row's label (a named
    set's or an ``.npz``'s own, or the column ``label_col``) or context (the columns
    ``context_cols``), which are not features."""
    dataset = load_data(data, n=rows, seed=data_seed, images=is_image_model(model_type))
    if condition is None and (label_col or context_cols):
        raise DataError("--label-col and --context-cols need --condition label or context")
    cond = None
    if condition is not None:
        train_rows = split_indices(len(dataset.x), split_seed)[0]
        cond = condition_data(dataset, condition, train_rows, label_col=label_col,
                              context_cols=context_cols)
        dataset = replace(dataset, x=cond.x, columns=cond.columns)
    if model_cfg is None:
        model_cfg = default_model_config(model_type, int(dataset.x.shape[1]),
                                         **(model_fields or {}))
    model_cfg = _with_image_shape(model_type, model_cfg, dataset.shape, data)
    model_cfg = _with_vocab(model_type, model_cfg, dataset.x, dataset.levels, data)
    splits = split(dataset.x, seed=split_seed)
    summary = DataSummary(
        name=dataset.name,
        source=dataset.source,
        rows=int(len(dataset.x)),
        dim=int(dataset.x.shape[1]),
        levels=dataset.levels,
        data_seed=data_seed,
        split_seed=split_seed,
        mean=[float(v) for v in splits.train.mean(0)],
        std=[float(v) for v in splits.train.std(0)],
        columns=list(dataset.columns),
    )
    ckpt = fit_arrays(
        model_type,
        splits.train,
        splits.val,
        data=summary,
        model_cfg=model_cfg,
        pre_cfg=pre_cfg,
        train_cfg=train_cfg,
        **({} if cond is None else _condition_splits(cond, split_seed)),
    )
    if out is not None:
        if is_main_process():  # one writer; the other ranks wait until it is on disk
            save_checkpoint(ckpt, out)
        barrier()
    return ckpt


def _condition_splits(cond: ConditionData, split_seed: int) -> dict[str, object]:
    """Each training and validation row's condition, split as :func:`split` splits rows."""
    train, val, _ = split_indices(len(cond.values), split_seed)
    return {"condition": cond.spec, "c_train": cond.values[train], "c_val": cond.values[val]}


def _with_image_shape(kind: str, cfg: ModelConfig, shape: tuple[int, int, int] | None,
                      data: str) -> ModelConfig:
    """Image models take ``image_shape`` from the data set unless the config sets it."""
    if not is_image_model(kind) or cfg.image_shape is not None:
        return cfg
    if shape is None:
        raise ValueError(f"{kind!r} is an image model but {data!r} holds no images; use "
                         "'digits_image' or a .npy of shape (rows, H, W) or (rows, C, H, W)")
    return cfg.model_copy(update={"image_shape": shape})


def _with_vocab(kind: str, cfg: ModelConfig, x: np.ndarray, levels: int | None,
                data: str) -> ModelConfig:
    """Token models take ``vocab`` from the data's levels (or its largest value + 1) unless
    the config sets it; the rows must be whole numbers in ``[0, vocab)``."""
    if family_of(kind) != "dfm":
        return cfg
    if not (np.isfinite(x).all() and (x == np.round(x)).all() and x.min() >= 0):
        raise ValueError(f"{kind!r} trains on integer tokens >= 0, but {data!r} holds other "
                         "values")
    vocab = cfg.vocab or levels or int(x.max()) + 1
    if x.max() >= vocab:
        raise ValueError(f"{data!r} holds the token {int(x.max())}, outside [0, {vocab})")
    return cfg.model_copy(update={"vocab": max(vocab, 2)})
