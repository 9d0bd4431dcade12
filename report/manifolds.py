"""The report of a model on a manifold (``rfm``): its samples next to held-out rows, drawn on
the manifold (the sphere in 3-D, the torus on its unrolled square), and the log-likelihood of
the test rows next to the exact density where the data set has one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from report.plots import manifold_figure
from training.checkpoint import load_checkpoint
from training.data import load_data, split, true_log_density
from training.evaluate import data_log_prob, sample_data

__all__ = ["manifold_report"]


def manifold_report(checkpoint: str | Path, out: str | Path, *, points: int = 1000,
                    steps: int = 32, solver: str = "rk4") -> dict[str, Any]:
    """Write ``out/manifold_samples.png`` and ``out/metrics.json`` for an ``rfm`` checkpoint."""
    ckpt = load_checkpoint(checkpoint)
    name = getattr(getattr(ckpt.model, "manifold", None), "name", None)
    if name is None or (name == "sphere" and ckpt.config.dim != 3) or (
            name == "torus" and ckpt.config.dim != 2):
        raise ValueError(f"{checkpoint}: the manifold report draws rfm models on S^2 (3 values "
                         "a row) or T^2 (2 angles a row)")
    d = ckpt.config.data
    data = load_data(d.name, n=d.rows, seed=d.data_seed)
    test = split(data.x, seed=d.split_seed).test[:points]
    samples = sample_data(ckpt, points, seed=1, steps=steps, solver=solver)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifold_figure(test, samples, name, f"rfm ({solver}, {steps} steps)",
                    out / "manifold_samples.png")
    lp = data_log_prob(ckpt, test, method="exact", solver="dopri5")["log_prob"]
    truth = true_log_density(d.name) if not Path(d.name).suffix else None
    summary = {"data": d.name, "manifold": name, "rows": len(test),
               "log_likelihood": float(np.mean(lp)),
               "exact_log_likelihood": None if truth is None else float(np.mean(truth(test)))}
    (out / "metrics.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
