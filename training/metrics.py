"""Sample-quality and likelihood summaries used by ``evaluate``, the report and the benchmarks."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["likelihood_summary", "wasserstein2"]


def wasserstein2(a: np.ndarray, b: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between two equal-size point clouds ``(n, dim)``.

    Solved as an assignment problem on squared Euclidean costs (uniform weights), so it is
    exact, not a Sinkhorn approximation. Unequal sizes are cut to the smaller one.
    """
    from scipy.optimize import linear_sum_assignment

    n = min(len(a), len(b))
    a, b = np.asarray(a[:n], dtype=np.float64), np.asarray(b[:n], dtype=np.float64)
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return float(math.sqrt(cost[rows, cols].mean()))


def likelihood_summary(log_prob: np.ndarray, dim: int) -> dict[str, float]:
    """Mean test log-likelihood in nats per sample with its standard error, and bits/dim.

    Beside the mean: the median and the worst row (its value and index). On a small test
    set one row the model finds very unlikely can dominate the mean (and its standard
    error); the median says what a typical row gets, and the worst row which one to look at.
    """
    lp = np.asarray(log_prob, dtype=np.float64)
    mean = float(lp.mean())
    se = float(lp.std(ddof=1) / math.sqrt(len(lp))) if len(lp) > 1 else float("nan")
    worst = int(np.argmin(lp))
    return {
        "log_likelihood": mean,
        "log_likelihood_se": se,
        "log_likelihood_median": float(np.median(lp)),
        "log_likelihood_min": float(lp[worst]),
        "worst_row": worst,
        "bits_per_dim": -mean / (dim * math.log(2)),
        "bits_per_dim_se": se / (dim * math.log(2)),
        "rows": int(len(lp)),
    }
