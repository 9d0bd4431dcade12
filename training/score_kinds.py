"""Fitting the anomaly score kinds (``artifact.scores``) of a trained model, on normal rows only.

* :func:`synthetic_outliers`: the positives of every choice made here and of
  ``fit-anomaly --score auto`` (docs/anomaly-selection-protocol.md, third protocol): held-out
  normal rows moved by Gaussian steps of 0.25, 0.5 and 1 training standard deviations, and
  uniform draws in the training rows' bounding box widened by 10 %, in equal numbers.
* :func:`denoise_spec`: the ``denoise`` levels and the combination of their features, chosen
  by AUROC of normal validation rows against the synthetic outliers: the equal-weight mean of
  all standardized levels, or one level alone where that separates better by more than 0.01.
* :func:`dte_spec`, :func:`latent_spec`: the fixed grids of the other kinds.
* :func:`in_process_scores`: a kind's score computed with the torch model and the same
  arithmetic the service runs on the exported graphs (``numerics.denoise``,
  ``numerics.neighbours``): what selection compares, before anything is exported.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from artifact.scores import AnomalyScoreSpec
from numerics.denoise import denoise_features, diffusion_time_estimate, keyed_normal
from numerics.neighbours import knn_mean_distance
from training.checkpoint import Checkpoint
from training.evaluate import data_log_prob

__all__ = ["DENOISE_TIMES", "DTE_TIMES", "LATENT_NEIGHBOURS", "LATENT_ROWS", "auroc",
           "denoise_spec", "dte_spec", "in_process_scores", "latent_spec",
           "synthetic_outliers"]

DENOISE_TIMES = (0.05, 0.1, 0.2, 0.35, 0.5)
DTE_TIMES = tuple(float(t) for t in np.geomspace(0.01, 0.8, 10))
LATENT_NEIGHBOURS = 5
LATENT_ROWS = 2000  # training latents stored at most (float32: 8 kB per column)
PERTURBATION_SCALES = (0.25, 0.5, 1.0)
BOX_MARGIN = 0.1
SINGLE_LEVEL_MARGIN = 0.01


def synthetic_outliers(x_val: np.ndarray, x_train: np.ndarray, seed: int) -> np.ndarray:
    """``(4 * len(x_val), dim)`` synthetic anomalies made from normal rows only."""
    rng = np.random.default_rng([seed, 29])
    std = x_train.std(0) + 1e-12
    moved = [x_val + c * std * rng.standard_normal(x_val.shape) for c in PERTURBATION_SCALES]
    lo, hi = x_train.min(0), x_train.max(0)
    pad = BOX_MARGIN * (hi - lo)
    box = rng.uniform(lo - pad, hi + pad, x_val.shape)
    return np.concatenate([*moved, box])


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Mann-Whitney AUROC of ``positives`` scoring above ``negatives`` (ties count half)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([negatives, positives]))
    n_pos, n_neg = len(positives), len(negatives)
    return float((ranks[n_neg:].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _model_space(ckpt: Checkpoint, x: np.ndarray) -> np.ndarray:
    dtype = next(ckpt.model.parameters()).dtype
    with torch.no_grad():
        u, _ = ckpt.preprocessor.eval()(torch.as_tensor(x, dtype=dtype))
    return u.double().numpy()


def _velocity(ckpt: Checkpoint) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    model = ckpt.model.eval()
    dtype = next(model.parameters()).dtype

    def velocity(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            v = model.velocity(torch.as_tensor(x, dtype=dtype), torch.as_tensor(t, dtype=dtype))
        return v.double().numpy()

    return velocity


def _encode(ckpt: Checkpoint, u: np.ndarray) -> np.ndarray:
    model = ckpt.model.eval()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        z, _ = model(torch.as_tensor(u, dtype=dtype))
    return z.double().numpy()


def _denoise_features(ckpt: Checkpoint, spec: AnomalyScoreSpec, x: np.ndarray,
                      seed: int) -> np.ndarray:
    u = _model_space(ckpt, x)
    levels = spec.noise_levels()
    noise = keyed_normal(seed, np.arange(len(u)), len(levels) * spec.draws, u.shape[1])
    return denoise_features(_velocity(ckpt), u, levels, noise)


def in_process_scores(ckpt: Checkpoint, spec: AnomalyScoreSpec, x: np.ndarray, *,
                      seed: int = 0, latents: np.ndarray | None = None) -> np.ndarray:
    """``(rows,)``: the score of ``spec.kind`` for raw rows ``x``, higher more anomalous."""
    if spec.kind == "nll":
        return -data_log_prob(ckpt, x)["log_prob"]
    if spec.kind == "denoise":
        return spec.combine(_denoise_features(ckpt, spec, x, seed))
    if spec.kind == "dte":
        return diffusion_time_estimate(_velocity(ckpt), _model_space(ckpt, x),
                                       spec.noise_levels())
    return knn_mean_distance(_encode(ckpt, _model_space(ckpt, x)), latents, spec.neighbours)


def denoise_spec(ckpt: Checkpoint, x_val: np.ndarray, outliers: np.ndarray,
                 seed: int = 0) -> tuple[AnomalyScoreSpec, dict[str, float]]:
    """The ``denoise`` spec: levels at :data:`DENOISE_TIMES`, features standardized on the
    normal validation rows, and the combination chosen against the synthetic outliers.
    Returns the spec and the AUROC of each combination tried."""
    levels = ckpt.model.noise_levels(DENOISE_TIMES)
    k = len(levels)
    probe = AnomalyScoreSpec(kind="denoise", levels=levels, center=[0.0] * k,
                             scale=[1.0] * k, weights=[1.0 / k] * k)
    f_val = _denoise_features(ckpt, probe, x_val, seed)
    f_out = _denoise_features(ckpt, probe, outliers, seed + 1)
    center, scale = f_val.mean(0), f_val.std(0) + 1e-9
    z_val, z_out = (f_val - center) / scale, (f_out - center) / scale
    tried = {"mean": auroc(z_val.mean(1), z_out.mean(1))}
    for i, t in enumerate(DENOISE_TIMES):
        tried[f"t={t:g}"] = auroc(z_val[:, i], z_out[:, i])
    best_single = max(range(k), key=lambda i: tried[f"t={DENOISE_TIMES[i]:g}"])
    weights = [1.0 / k] * k
    if tried[f"t={DENOISE_TIMES[best_single]:g}"] > tried["mean"] + SINGLE_LEVEL_MARGIN:
        weights = [1.0 if i == best_single else 0.0 for i in range(k)]
    spec = AnomalyScoreSpec(kind="denoise", levels=levels, center=center.tolist(),
                            scale=scale.tolist(), weights=weights)
    return spec, tried


def dte_spec(ckpt: Checkpoint) -> AnomalyScoreSpec:
    """The ``dte`` spec: levels at :data:`DTE_TIMES`."""
    return AnomalyScoreSpec(kind="dte", levels=ckpt.model.noise_levels(DTE_TIMES))


def latent_spec(ckpt: Checkpoint, x_train: np.ndarray,
                seed: int = 0) -> tuple[AnomalyScoreSpec, np.ndarray]:
    """The ``latent`` spec and the training latents it stores (a seeded subsample of at
    most :data:`LATENT_ROWS` raw training rows, encoded)."""
    if not hasattr(ckpt.model, "encode_graphs"):
        raise ValueError(f"a latent score needs a single flow; {ckpt.config.model_type} has "
                         "no latent space (use --score nll)")
    rows = x_train
    if len(rows) > LATENT_ROWS:
        keep = np.random.default_rng([seed, 3]).choice(len(rows), LATENT_ROWS, replace=False)
        rows = rows[np.sort(keep)]
    z = _encode(ckpt, _model_space(ckpt, rows)).astype(np.float32)
    spec = AnomalyScoreSpec(kind="latent", neighbours=LATENT_NEIGHBOURS, latent_rows=len(z))
    return spec, z
