"""Checkpoints: ``weights.safetensors`` + ``config.json`` in one directory, written atomically.

Loading never unpickles: weights come from safetensors, everything else from JSON validated
by Pydantic, and the weights file is checked against the sha256 recorded in the config.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from artifact.conditions import ConditionSpec
from artifact.manifest import sha256_file
from training.config import ModelConfig, PreprocessConfig, TrainConfig
from training.data import DATASETS, true_log_density
from training.preprocess import Preprocessor
from training.registry import build_model

__all__ = [
    "Checkpoint",
    "CheckpointConfig",
    "CALIBRATION_ROWS",
    "CheckpointError",
    "DataSummary",
    "atomic_directory",
    "load_checkpoint",
    "save_checkpoint",
    "sha256_file",
]

FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
CALIBRATION_ROWS = 10_000
"""Held-out rows a checkpoint keeps for calibration (a seeded subsample above this)."""
_CALIBRATION_KEY = "calibration.rows"
_CONDITION_KEY = "calibration.condition"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, tampered with or of another version."""


class DataSummary(BaseModel):
    """What the model was trained on (enough to rebuild the same splits)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    source: str
    rows: int
    dim: int
    levels: int | None = None
    data_seed: int = 0
    split_seed: int = 0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    mean: list[float] = Field(default_factory=list)
    std: list[float] = Field(default_factory=list)
    columns: list[str] = Field(default_factory=list)  # the file's column names, if it had any

    def true_log_density(self) -> Any:
        """The exact ``log p(x)`` of the data trained on (``training.data.LogDensity``), or
        ``None``: only a named set that has one. A file's name is not a set's name, however
        it is spelled (``8gaussians.csv`` may hold anything)."""
        if self.source != "named" or self.name not in DATASETS:
            return None
        return true_log_density(self.name)


class CheckpointConfig(BaseModel):
    """``config.json`` of a checkpoint."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: int = FORMAT_VERSION
    model_type: str
    family: str
    dim: int
    model: ModelConfig
    preprocess: PreprocessConfig
    train: TrainConfig
    data: DataSummary
    summary: dict[str, Any] = Field(default_factory=dict)
    condition: ConditionSpec | None = None
    weights_sha256: str = ""


@dataclass
class Checkpoint:
    """A trained model, its fitted preprocessing and its configuration.

    ``calibration_rows``: ``(rows, dim)`` normal held-out rows in data units (the validation
    split, at most :data:`CALIBRATION_ROWS`), which export scores through the served graphs
    to calibrate the anomaly threshold; None in checkpoints that carry none.
    ``calibration_condition``: a conditional model's condition of those rows (class indices
    ``(rows,)``, or raw context rows ``(rows, width)``).
    """

    model: nn.Module
    preprocessor: nn.Module
    config: CheckpointConfig
    calibration_rows: np.ndarray | None = None
    calibration_condition: np.ndarray | None = None


class atomic_directory:  # noqa: N801 - used like a function: ``with atomic_directory(p) as tmp``
    """Write a directory's content into a temporary sibling, then move it into place.

    Readers never see a half-written directory; on error the target is left untouched.
    """

    def __init__(self, target: str | Path) -> None:
        self.target = Path(target)

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.with_name(f".{self.target.name}.old-{os.getpid()}")
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return {f"{prefix}.{k}": v.detach().contiguous().clone() for k, v in state.items()}


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write ``ckpt`` to the directory ``path`` atomically; returns the path."""
    tensors = _tensors("model", ckpt.model) | _tensors("preprocess", ckpt.preprocessor)
    if ckpt.calibration_rows is not None:
        tensors[_CALIBRATION_KEY] = torch.from_numpy(
            np.ascontiguousarray(ckpt.calibration_rows, dtype=np.float64))
    if ckpt.calibration_condition is not None:
        tensors[_CONDITION_KEY] = torch.from_numpy(
            np.ascontiguousarray(ckpt.calibration_condition, dtype=np.float64))
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format_version": str(FORMAT_VERSION)})
        ckpt.config.weights_sha256 = sha256_file(tmp / WEIGHTS)
        (tmp / CONFIG).write_text(ckpt.config.model_dump_json(indent=2) + "\n")
    return Path(path)


def read_config(path: str | Path) -> CheckpointConfig:
    path = Path(path)
    if not (path / CONFIG).is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {CONFIG} is missing")
    try:
        config = CheckpointConfig.model_validate_json((path / CONFIG).read_text())
    except ValueError as err:
        raise CheckpointError(f"{path / CONFIG} is not a valid checkpoint config: {err}") from None
    if config.format_version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {config.format_version}; this genserve reads "
            f"format {FORMAT_VERSION}"
        )
    return config


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Rebuild the model and preprocessor from ``path`` (safetensors + JSON, no pickle)."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {WEIGHTS} is missing")
    if sha256_file(weights) != config.weights_sha256:
        raise CheckpointError(f"{weights} does not match the sha256 in {CONFIG} (tampered?)")
    tensors = load_file(str(weights))
    model = build_model(config.model_type, config.dim, config.model)
    pre = Preprocessor.from_config(config.preprocess, config.dim, config.data.levels)
    for prefix, module in (("model", model), ("preprocess", pre)):
        state = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        module.load_state_dict(state, strict=True)
    model.eval()
    pre.eval()
    rows, condition = tensors.get(_CALIBRATION_KEY), tensors.get(_CONDITION_KEY)
    return Checkpoint(model=model, preprocessor=pre, config=config,
                      calibration_rows=None if rows is None else rows.numpy(),
                      calibration_condition=None if condition is None else condition.numpy())
