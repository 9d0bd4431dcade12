"""``make models``: rebuild the default artifacts in ``exported_models/`` from fixed seeds.

One flow, one diffusion and one flow-matching model on a 2D toy, and one anomaly model on a
scikit-learn set (fit on benign breast-cancer rows only), so that ``make serve`` starts in
seconds on a fresh machine and serves every family.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.checkpoint import DataSummary, load_checkpoint
from training.config import ModelConfig, TrainConfig
from training.data import load_data, split
from training.export import export_checkpoint
from training.fit import fit, fit_arrays

__all__ = ["DEFAULT_MODELS", "build_default_models"]


@dataclass(frozen=True)
class DefaultModel:
    name: str
    model_type: str
    data: str
    steps: int
    model: dict = field(default_factory=dict)
    rows: int | None = 20000
    train: dict = field(default_factory=dict)


DEFAULT_MODELS = (
    DefaultModel("moons-nsf", "nsf", "moons", 3000, {"hidden_features": 64, "transforms": 4}),
    DefaultModel("moons-ddpm", "ddpm", "moons", 4000, {"hidden_features": 128,
                                                        "hidden_layers": 3},
                 train={"lr": 3e-3, "ema_decay": 0.999}),
    DefaultModel("moons-otcfm", "otcfm", "moons", 4000, {"hidden_features": 128,
                                                          "hidden_layers": 3}),
)
ANOMALY_NAME = "breast-cancer-maf"


def _fit_named(spec: DefaultModel, out: Path) -> None:
    ckpt_dir = out / ".checkpoints" / spec.name
    fit(spec.model_type, spec.data, out=ckpt_dir, rows=spec.rows,
        model_cfg=ModelConfig(**spec.model), train_cfg=TrainConfig(steps=spec.steps, **spec.train))
    export_checkpoint(load_checkpoint(ckpt_dir), out / spec.name)


def _fit_anomaly(out: Path) -> None:
    """MAF on benign breast-cancer rows (scikit-learn's y == 1); calibrated on held-out benign."""
    data = load_data("breast_cancer")
    benign = data.x[data.y == 1]
    parts = split(benign, seed=0)
    summary = DataSummary(name="breast_cancer[benign]", source="named", rows=len(benign),
                          dim=benign.shape[1], mean=parts.train.mean(0).tolist(),
                          std=parts.train.std(0).tolist())
    ckpt = fit_arrays("maf", parts.train, parts.val, data=summary,
                      model_cfg=ModelConfig(hidden_features=64, transforms=3),
                      train_cfg=TrainConfig(steps=2000, weight_decay=1e-4, eval_every=100,
                                            patience=5, lr=5e-4))
    export_checkpoint(ckpt, out / ANOMALY_NAME,
                      calibration_rows=np.concatenate([parts.val, parts.test]))


def build_default_models(out: Path, only: list[str] | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for spec in DEFAULT_MODELS:
        if only and spec.name not in only:
            continue
        start = time.perf_counter()
        _fit_named(spec, out)
        print(f"{spec.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not only or ANOMALY_NAME in only:
        _fit_anomaly(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="exported_models", type=Path)
    p.add_argument("--only", nargs="*", help="rebuild only these model names")
    ns = p.parse_args(argv)
    build_default_models(ns.out, ns.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
