"""``genserve evaluate``: test log-likelihood in data units, sample quality and speed."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import torch

from artifact.conditions import condition_rows
from training.checkpoint import Checkpoint
from training.conditioning import condition_data
from training.config import TrainConfig
from training.data import DataError, Dataset, load_data, split, split_indices
from training.metrics import likelihood_summary, wasserstein2
from training.toys import MIXTURE_SETS, gaussian_mixture

__all__ = ["THREADS", "checkpoint_splits", "data_log_prob", "evaluate", "sample_data"]

# torch CPU threads `genserve evaluate` (and the report, whose metrics it reproduces) runs on
# unless told otherwise: training's default, for the same reason (training.train)
THREADS: int = TrainConfig.model_fields["threads"].default


def _checkpoint_dataset(ckpt: Checkpoint) -> Dataset:
    """The data set the checkpoint was trained on, loaded again as at training time."""
    d = ckpt.config.data
    source = d.name if d.source == "named" else d.source
    try:
        return load_data(source, n=d.rows if d.source == "named" else None,
                         seed=d.data_seed, images=ckpt.config.model.image_shape is not None)
    except DataError as err:
        if d.source == "named" or os.path.exists(source):
            raise
        raise DataError(f"{err}; the checkpoint was trained on the file '{source}' (a path "
                        "as given at training time): run from that directory, or pass the "
                        "test rows with --data FILE") from None


def checkpoint_splits(ckpt: Checkpoint) -> Any:
    """Rebuild the train/validation/test splits the checkpoint was trained on."""
    d = ckpt.config.data
    return split(_checkpoint_dataset(ckpt).x, seed=d.split_seed, fractions=d.split_fractions)


def conditional_test_rows(ckpt: Checkpoint) -> tuple[np.ndarray, np.ndarray]:
    """A conditional checkpoint's test rows and each one's condition (class indices, or raw
    context rows), split and separated from the features as ``training.fit`` did."""
    d, spec = ckpt.config.data, ckpt.config.condition
    dataset = _checkpoint_dataset(ckpt)
    train, _, test = split_indices(len(dataset.x), d.split_seed, d.split_fractions)
    label = spec.kind == "label"
    cond = condition_data(dataset, spec.kind, train,
                          label_col=spec.columns[0] if label and spec.columns else None,
                          context_cols=None if label else spec.columns)
    if label and cond.spec.classes != spec.classes:
        raise DataError(f"the data's classes {cond.spec.classes} are not the checkpoint's "
                        f"{spec.classes}: it was trained on other data")
    return cond.x[test], cond.values[test]


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
        options["context"] = torch.as_tensor(condition_rows(cond, condition), dtype=dtype)
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
    ckpt: Checkpoint, n: int, *, seed: int = 0, steps: int | None = None,
    solver: str | None = None, condition: np.ndarray | None = None,
) -> np.ndarray:
    """Draw ``n`` samples in data units (a conditional checkpoint's given each sample's
    ``condition``: class indices ``(n,)`` or raw context rows ``(n, width)``)."""
    generator = torch.Generator().manual_seed(seed)
    options: dict[str, Any] = {}
    if steps is not None:
        options["steps"] = steps
    if solver is not None:
        options["solver"] = solver
    cond = ckpt.config.condition
    if cond is not None:
        options["context"] = torch.as_tensor(condition_rows(cond, condition),
                                             dtype=next(ckpt.model.parameters()).dtype)
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

    A conditional checkpoint is scored on its own test rows given each row's condition:
    ``log p(x | y)`` (or ``| context``) with the same summary, a label model's marginal
    ``log p(x)`` beside it, the exact conditional density where the named set is a Gaussian
    mixture whose components are the labels, and samples drawn given the test rows'
    conditions (W2 to those rows)."""
    cfg = ckpt.config
    condition = None
    if cfg.condition is not None:
        if x is not None:
            raise DataError("a conditional checkpoint is evaluated on its own test rows and "
                            "their conditions; leave out --data")
        x_test, condition = conditional_test_rows(ckpt)
    else:
        x_test = checkpoint_splits(ckpt).test if x is None else np.asarray(x, dtype=np.float64)
    start = time.perf_counter()
    lp = data_log_prob(ckpt, x_test, method=method, steps=steps, solver=solver, seed=seed,
                       condition=condition)
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
    if cfg.condition is not None:
        report |= _conditional_report(ckpt, x_test, condition, lp["log_prob"], method=method,
                                      steps=steps, solver=solver, seed=seed)
    else:
        truth = cfg.data.true_log_density() if x is None else None
        if truth is not None:
            true_ll = float(np.mean(truth(x_test)))
            report["true_log_likelihood"] = true_ll
            report["gap_to_truth"] = true_ll - report["log_likelihood"]
    if samples > 0:
        n = int(min(samples, len(x_test)))  # conditional: given the first test rows' conditions
        start = time.perf_counter()
        generated = sample_data(ckpt, samples if condition is None else n, seed=seed,
                                steps=steps, solver=solver,
                                condition=None if condition is None else condition[:n])
        seconds = time.perf_counter() - start
        report["samples_per_second"] = len(generated) / seconds
        report["w2_to_test"] = wasserstein2(generated, x_test[:samples])
        report["w2_rows"] = n
    residual = getattr(ckpt.model, "inversion_residual", None)
    if callable(residual):  # residual flows: how far the served fixed-point inverse got
        z = torch.randn(max(samples, 256), cfg.dim, generator=torch.Generator().manual_seed(seed))
        given = {} if condition is None else {"context": torch.as_tensor(condition_rows(
            cfg.condition, np.resize(condition, (len(z), *condition.shape[1:]))),
            dtype=z.dtype)}
        report["fixed_point_residual"] = residual(z, **given)
    return report


def _conditional_report(ckpt: Checkpoint, x: np.ndarray, condition: np.ndarray,
                        log_prob: np.ndarray, **options: Any) -> dict[str, Any]:
    """What a conditional checkpoint adds: its condition, a label model's marginal
    ``log p(x) = logsumexp_y log p(x | y) + log p(y)`` (the training priors), and the exact
    conditional and marginal densities where the named set is a Gaussian mixture whose
    components are the labels."""
    cfg, spec = ckpt.config, ckpt.config.condition
    out: dict[str, Any] = {"condition": spec.kind, "log_likelihood_is": "log p(x | " + (
        "y)" if spec.kind == "label" else "context)")}
    if spec.kind != "label":
        return out
    each = np.stack([data_log_prob(ckpt, x, condition=np.full(len(x), k), **options)["log_prob"]
                     for k in range(spec.width)])
    marginal = np.logaddexp.reduce(each + np.log(spec.priors)[:, None], axis=0)
    out["marginal_log_likelihood"] = float(np.mean(marginal))
    if cfg.data.source == "named" and cfg.data.name in MIXTURE_SETS:
        mixture = gaussian_mixture(cfg.data.name)
        exact = mixture.component_log_densities(x)[np.arange(len(x)), condition]
        out["true_log_likelihood"] = float(np.mean(exact))
        out["gap_to_truth"] = out["true_log_likelihood"] - float(np.mean(log_prob))
        out["true_marginal_log_likelihood"] = float(np.mean(mixture.log_density(x)))
        out["marginal_gap_to_truth"] = (out["true_marginal_log_likelihood"]
                                        - out["marginal_log_likelihood"])
    return out
