"""Log-likelihood of an ODE flow by the instantaneous change of variables.

For ``dx/dt = v(x, t)`` carrying data (``t0``, near 0) to noise (``t1 = 1``),
``d/dt log p_t(x_t) = -div v(x_t, t)`` (Chen et al. 2018, "Neural ODEs", theorem 1), hence

    log p_{t0}(x) = log p_base(z) + int_{t0}^{t1} div v(x_t, t) dt,   z = x_{t1}.

The state ``[x, int div]`` is integrated jointly by :func:`numerics.solvers.integrate`
(``(batch, dim + 1)``), so ``dopri5`` controls the error of the log-density too. The divergence
is either exact (a ``velocity_div`` graph) or Hutchinson's estimate ``e^T (dv/dx) e`` with
Rademacher probes ``e`` held fixed along the path (Grathwohl et al. 2019, "FFJORD", sec. 3.1).

Works on numpy arrays and torch tensors alike; no autograd.

Example:
    >>> import numpy as np
    >>> shift = lambda x, t: (np.ones_like(x), np.zeros(x.shape[0]))  # x_t = x + t
    >>> res = log_likelihood_exact(shift, np.zeros((1, 2)), method="rk4", steps=4)
    >>> bool(np.allclose(res.log_prob, standard_normal_log_prob(np.ones((1, 2)))))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from numerics.arrays import Array, array_namespace, asarray_like
from numerics.solvers import integrate

__all__ = [
    "LikelihoodResult",
    "VelocityDiv",
    "VelocityJvp",
    "log_likelihood_exact",
    "keyed_uniform",
    "log_likelihood_hutchinson",
    "normal_log_prob",
    "probe_mean",
    "rademacher_probes",
    "standard_normal_log_prob",
]

VelocityDiv = Callable[[Array, Array], tuple[Array, Array]]
"""``velocity_div(x: (batch, dim), t: (batch,)) -> (v: (batch, dim), div: (batch,))``."""
VelocityJvp = Callable[[Array, Array, Array], tuple[Array, Array]]
"""``velocity_jvp(x, t, e) -> (v, (dv/dx) e)``, all ``(batch, dim)`` but ``t: (batch,)``."""

_LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_log_prob(z: Array) -> Array:
    """``log N(z; 0, I)``: ``(batch, dim) -> (batch,)``."""
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[-1] * _LOG_2PI


def normal_log_prob(std: float = 1.0) -> Callable[[Array], Array]:
    """``z -> log N(z; 0, std^2 I)``, ``(batch, dim) -> (batch,)``: the base density of an
    ODE whose noise end is ``std`` times standard normal (EDM: ``sqrt(sigma_max^2 +
    data_std^2)``)."""
    if std == 1.0:
        return standard_normal_log_prob
    return lambda z: standard_normal_log_prob(z / std) - z.shape[-1] * math.log(std)


@dataclass(frozen=True)
class LikelihoodResult:
    """Attributes:
    log_prob: ``(batch,)`` log-density at ``t0`` (nats), same array type as ``x``.
    std_error: ``(batch,)`` Monte-Carlo standard error of ``log_prob`` (Hutchinson), or
        ``None`` for the exact divergence.
    nfe: velocity calls made by the solver (over the replicated batch for Hutchinson).
    z: ``(batch, dim)`` the state at ``t1`` (for Hutchinson, the mean over probes, whose
        paths differ only within solver tolerance).
    """

    log_prob: Array
    std_error: Array | None
    nfe: int
    z: Array


def log_likelihood_exact(
    velocity_div: VelocityDiv,
    x: Array,
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    method: str = "dopri5",
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10000,
    base_log_prob: Callable[[Array], Array] = standard_normal_log_prob,
    rho: float | None = None,
) -> LikelihoodResult:
    """``log p_{t0}(x)`` with the exact divergence.

    Args:
        velocity_div: ``(x: (batch, dim), t: (batch,)) -> (v: (batch, dim), div: (batch,))``.
        x: data ``(batch, dim)`` at ``t0``.
        t0, t1: integrate from ``t0`` (data side, the model's ``t_min``) to ``t1`` (noise).
        method, steps, rtol, atol, max_steps, rho: passed to
            :func:`numerics.solvers.integrate`.
        base_log_prob: ``(batch, dim) -> (batch,)`` log-density of ``x_{t1}``.

    Returns:
        :class:`LikelihoodResult` with ``std_error=None``.
    """
    xp = array_namespace(x)
    dim = x.shape[-1]

    def augmented(state: Array, t: Array) -> Array:
        v, div = velocity_div(state[:, :dim], t)
        return xp.concatenate([v, div[:, None]], -1)

    state = xp.concatenate([x, xp.zeros_like(x[:, :1])], -1)
    sol = integrate(
        augmented,
        state,
        t0,
        t1,
        method=method,
        steps=steps,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        rho=rho,
    )
    z = sol.x[:, :dim]
    return LikelihoodResult(base_log_prob(z) + sol.x[:, dim], None, sol.nfe, z)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a bijection of ``uint64`` that spreads
    every input bit over every output bit; arrays wrap modulo 2**64 as the hash needs."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keyed_uniform(seeds: int | np.ndarray, rows: np.ndarray, probes: int, dim: int,
                  stream: int) -> np.ndarray:
    """Uniforms in ``(0, 1)``, ``(probes, batch, dim)``, as a counter-based hash.

    Entry ``(k, b, j)`` is a function of ``(seeds[b], rows[b], stream, k, j)`` only, like
    :func:`rademacher_probes`' signs (``stream`` keeps independent uses apart): a row's
    draws never depend on its batch.
    """
    rows = np.asarray(rows, dtype=np.uint64).reshape(-1)
    seeds = np.broadcast_to(np.asarray(seeds, dtype=np.uint64), rows.shape)
    key = _mix64(_mix64(_mix64(seeds + _GOLDEN) + rows) + np.uint64(stream))
    k = np.arange(probes, dtype=np.uint64)[:, None, None]
    j = np.arange(dim, dtype=np.uint64)[None, None, :]
    bits = _mix64(_mix64(key[None, :, None] + k * _GOLDEN) + j) >> np.uint64(11)
    return (bits.astype(np.float64) + 0.5) / float(1 << 53)


def rademacher_probes(seeds: int | np.ndarray, rows: np.ndarray, probes: int,
                      dim: int) -> np.ndarray:
    """Signs in ``{-1.0, +1.0}``, ``(probes, batch, dim)``, as a counter-based hash.

    Entry ``(k, b, j)`` is a function of ``(seeds[b], rows[b], k, j)`` only: a row's probes
    are the same whatever rows share its batch, where it sits in the batch, or how a
    request was split across batches.

    Args:
        seeds: ``(batch,)`` non-negative seeds, one per row (an int: the same for all rows).
        rows: ``(batch,)`` non-negative row indices (a row's place in its own request).
        probes: probes per row.
        dim: values per probe.
    """
    rows = np.asarray(rows, dtype=np.uint64).reshape(-1)
    seeds = np.broadcast_to(np.asarray(seeds, dtype=np.uint64), rows.shape)
    key = _mix64(_mix64(seeds + _GOLDEN) + rows)  # (batch,)
    k = np.arange(probes, dtype=np.uint64)[:, None, None]
    j = np.arange(dim, dtype=np.uint64)[None, None, :]
    bits = _mix64(_mix64(key[None, :, None] + k * _GOLDEN) + j) >> np.uint64(63)
    return bits.astype(np.float64) * 2.0 - 1.0


def log_likelihood_hutchinson(
    velocity_jvp: VelocityJvp,
    x: Array,
    *,
    probes: int = 8,
    seed: int | np.ndarray = 0,
    rows: np.ndarray | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    method: str = "dopri5",
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10000,
    base_log_prob: Callable[[Array], Array] = standard_normal_log_prob,
    rho: float | None = None,
) -> LikelihoodResult:
    """``log p_{t0}(x)`` with Hutchinson's divergence estimate (FFJORD, sec. 3.1).

    Each row is replicated ``probes`` times (``(probes * batch, dim)``, probe-major); replica
    ``k`` uses one Rademacher probe ``e_k``, fixed over the whole path, so it yields its own
    unbiased estimate of ``log p(x)``. The result is the mean of the ``probes`` estimates
    and its standard error ``std / sqrt(probes)`` (``std`` with ``ddof=1``; ``nan`` when
    ``probes == 1``). Probes come from :func:`rademacher_probes` keyed by each row's seed and
    index, and are converted to the array type of ``x``: numpy and torch inputs give the same
    numbers, and a row's estimate does not depend on the other rows of the batch.

    Args:
        velocity_jvp: ``(x, t, e) -> (v, (dv/dx) e)``, ``x, e, v: (batch, dim)``,
            ``t: (batch,)``.
        x: data ``(batch, dim)`` at ``t0``.
        probes: number of probes ``K >= 1``.
        seed: seed of the probes: an int, or ``(batch,)`` one per row.
        rows: ``(batch,)`` each row's index within its request (default ``0 .. batch-1``).
        t0, t1, method, steps, rtol, atol, max_steps, base_log_prob, rho: as in
            :func:`log_likelihood_exact`.

    Returns:
        :class:`LikelihoodResult` with ``std_error: (batch,)``.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    xp = array_namespace(x)
    batch, dim = x.shape
    rows = np.arange(batch) if rows is None else rows
    e = asarray_like(rademacher_probes(seed, rows, probes, dim).reshape(probes * batch, dim), x)

    def velocity_div(state: Array, t: Array) -> tuple[Array, Array]:
        v, jv = velocity_jvp(state, t, e)
        return v, (e * jv).sum(-1)

    res = log_likelihood_exact(
        velocity_div,
        xp.concatenate([x] * probes, 0),
        t0=t0,
        t1=t1,
        method=method,
        steps=steps,
        rtol=rtol,
        atol=atol,
        max_steps=max_steps,
        base_log_prob=base_log_prob,
        rho=rho,
    )
    mean, std_error = probe_mean(res.log_prob.reshape(probes, batch))
    return LikelihoodResult(mean, std_error, res.nfe, res.z.reshape(probes, batch, dim).mean(0))


def probe_mean(estimates: Array) -> tuple[Array, Array]:
    """The mean over probes of ``estimates: (probes, batch)`` (one unbiased estimate per
    probe, probe-major as :func:`rademacher_probes` draws them) and its standard error
    ``std / sqrt(probes)`` (``ddof=1``; ``nan`` for one probe): both ``(batch,)``."""
    xp = array_namespace(estimates)
    probes = estimates.shape[0]
    mean = estimates.mean(0)
    if probes == 1:
        return mean, xp.full_like(mean, float("nan"))
    var = ((estimates - mean) ** 2).sum(0) / (probes - 1)
    return mean, xp.sqrt(var / probes)
