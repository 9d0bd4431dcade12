"""``genserve evaluate``: test log-likelihood in data units, sample quality and speed."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from artifact.conditions import context_rows
from training.checkpoint import Checkpoint
from training.data import DataError, load_data, split
from training.metrics import likelihood_summary, wasserstein2

__all__ = ["checkpoint_splits", "data_log_prob", "evaluate", "sample_data"]


def checkpoint_splits(ckpt: Checkpoint) -> Any:
    """Rebuild the train/validation/test splits the checkpoint was trained on."""
    d = ckpt.config.data
    source = d.name if d.source == "named" else d.source
    try:
        dataset = load_data(source, n=d.rows if d.source == "named" else None,
                            seed=d.data_seed, images=ckpt.config.model.image_shape is not None)
    except DataError as err:
        if d.source == "named" or os.path.exists(source):
            raise
        raise DataError(f"{err}; the checkpoint was trained on the file '{source}' (a path "
                        "as given at training time): run from that directory, or pass the "
                        "test rows with --data FILE") from None
    return split(dataset.x, seed=d.split_seed, fractions=d.split_fractions)


def data_log_prob(
    ckpt: Checkpoint,
    x: np.ndarray,
    *,
    method: str | None = None,
    steps: int | None = None,
    solver: str | None = None,
    seed: int = 0,
    condition: np.ndarray | None = None,
) -> dict[str, Any]:
    """log p(x) in the user's data units for ``x: (rows, dim)``; returns arrays and NFE.

    Preprocessing's log-det is added; integer data is dequantized with seeded uniform noise, so
    the figure is the usual variational lower bound on the discrete log-mass. A conditional
    checkpoint answers ``log p(x | condition)`` given each row's ``condition`` (class indices
    ``(rows,)`` or raw context rows ``(rows, width)``).
    """
    model, pre = ckpt.model, ckpt.preprocessor
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    xt = torch.as_tensor(x, dtype=dtype)
    options: dict[str, Any] = {"seed": seed}
    for key, value in (("method", method), ("steps", steps), ("solver", solver)):
        if value is not None:
            options[key] = value
    cond = ckpt.config.condition
    if cond is not None:
        key = "labels" if cond.kind == "label" else "context"
        options["context"] = torch.as_tensor(context_rows(cond, **{key: condition}),
                                             dtype=dtype)
    with torch.no_grad():
        u, ladj = pre(xt, generator=generator if ckpt.config.data.levels else None)
        res = model.log_prob_with_error(u, **options)
    se = res.std_error
    return {
        "log_prob": (res.log_prob + ladj).double().numpy(),
        "std_error": None if se is None else torch.as_tensor(se).double().numpy(),
        "nfe": int(res.nfe),
        "method": "exact" if se is None else "hutchinson",
    }


def sample_data(
    ckpt: Checkpoint, n: int, *, seed: int = 0, steps: int | None = None, solver: str | None = None
) -> np.ndarray:
    """Draw ``n`` samples in data units."""
    generator = torch.Generator().manual_seed(seed)
    options: dict[str, Any] = {}
    if steps is not None:
        options["steps"] = steps
    if solver is not None:
        options["solver"] = solver
    with torch.no_grad():
        u = ckpt.model.sample(n, generator=generator, **options)
        return ckpt.preprocessor.inverse(u).double().numpy()


def evaluate(
    ckpt: Checkpoint,
    x: np.ndarray | None = None,
    *,
    method: str | None = None,
    steps: int | None = None,
    solver: str | None = None,
    samples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Test log-likelihood (nats/sample, bits/dim, s.e.), W2 of samples, and sampling speed.

    Unconditional checkpoints only: a conditional model is evaluated through its export
    (``/log_likelihood`` with ``y`` or ``marginal``; ``bench/conditional.py``)."""
    cfg = ckpt.config
    if cfg.condition is not None:
        raise DataError(f"this checkpoint is conditioned on a {cfg.condition.kind}; evaluate "
                        "scores unconditional models only: export it and ask /log_likelihood "
                        "with 'y' (or 'marginal') or 'context'")
    x_test = checkpoint_splits(ckpt).test if x is None else np.asarray(x, dtype=np.float64)
    start = time.perf_counter()
    lp = data_log_prob(ckpt, x_test, method=method, steps=steps, solver=solver, seed=seed)
    ll_seconds = time.perf_counter() - start
    report: dict[str, Any] = {
        "model_type": cfg.model_type,
        "family": cfg.family,
        "data": cfg.data.name if x is None else "given",
        "dim": cfg.dim,
        **likelihood_summary(lp["log_prob"], cfg.dim),
        "method": lp["method"],
        "nfe": lp["nfe"],
        "log_likelihood_seconds": ll_seconds,
    }
    if lp["std_error"] is not None:
        report["hutchinson_se_mean"] = float(np.mean(lp["std_error"]))
    truth = cfg.data.true_log_density() if x is None else None
    if truth is not None:
        true_ll = float(np.mean(truth(x_test)))
        report["true_log_likelihood"] = true_ll
        report["gap_to_truth"] = true_ll - report["log_likelihood"]
    if samples > 0:
        start = time.perf_counter()
        generated = sample_data(ckpt, samples, seed=seed, steps=steps, solver=solver)
        seconds = time.perf_counter() - start
        report["samples_per_second"] = samples / seconds
        report["w2_to_test"] = wasserstein2(generated, x_test[:samples])
        report["w2_rows"] = int(min(samples, len(x_test)))
    residual = getattr(ckpt.model, "inversion_residual", None)
    if callable(residual):  # residual flows: how far the served fixed-point inverse got
        z = torch.randn(max(samples, 256), cfg.dim, generator=torch.Generator().manual_seed(seed))
        report["fixed_point_residual"] = residual(z)
    return report
