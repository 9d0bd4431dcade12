"""Discrete flow matching over tokens: the corruption, the CTMC Euler sampler and the masked
ELBO, for numpy arrays and torch tensors (``training.dfm`` trains, the service serves).

Tokens are whole numbers stored in float arrays ``(batch, D)`` with values in ``[0, V)``; the
mask token is ``V``. Time: ``t = 0`` data, ``t = 1`` source. A *denoiser* is ``(x_t: (batch,
D), t: (batch,)) -> log p(x^i | x_t): (batch, D, V)``. Randomness is an argument:
``uniform(shape)`` returns U(0, 1) draws of the array type (seeded by the caller, per request
in the service), so the same seeds give the same tokens in training and serving.

Example:
    >>> import numpy as np
    >>> flat = lambda x, t: np.log(np.full((len(x), x.shape[1], 3), 1 / 3))
    >>> res = masked_elbo(flat, np.array([[0.0, 2.0, 1.0]]), 3, probes=2)
    >>> bool(np.allclose(res.log_prob, 3 * np.log(1 / 3)))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from numerics.arrays import Array, array_namespace, asarray_like, no_grad
from numerics.guidance import guided_log_probs

__all__ = ["DFM_SOLVERS", "ELBO_NODES", "ELBO_T_MIN", "SOURCES", "ElboResult", "corrupt",
           "conditioned_denoiser", "ctmc_sample", "elbo", "masked_elbo", "normal_to_uniform",
           "source_tokens", "uniform_elbo"]

SOURCES = ("mask", "uniform")
DFM_SOLVERS = ("ctmc",)
"""The CTMC's Euler sampler, the one way a DFM model samples."""

ELBO_NODES = 16
"""The uniform source's ELBO: stratified time nodes per probe (one denoiser call each)."""
ELBO_T_MIN = 1e-3
"""The uniform source's ELBO: the time ``t_eps`` of the final redraw (see :func:`uniform_elbo`)."""

_UNIFORM_KEY = 1_000_003  # the uniform ELBO's probes in a row's seed sequence (orders: 0, 1..)

Denoiser = Callable[[Array, Array], Array]
Uniform = Callable[[tuple[int, ...]], Array]


def conditioned_denoiser(denoiser: Callable[..., Array], cond: Array | None,
                         guidance: float | None = None) -> Denoiser:
    """``denoiser(x, t, context)`` as a :data:`Denoiser` given each row's context rows
    ``cond: (rows, C)`` (None: ``denoiser`` itself). The sampler and the bounds call it on
    replicas of the rows stacked replica-major, so the context is tiled alike. With
    ``guidance`` ``w`` the conditional and null-token (all-zero) rows run in one call and
    combine as ``numerics.guidance.guided_log_probs``. Numpy arrays or torch tensors."""
    if cond is None:
        return denoiser
    xp = array_namespace(cond)
    if guidance is None:
        return lambda x, t: denoiser(x, t, xp.tile(cond, (len(x) // len(cond), 1)))
    both = xp.concatenate([cond, xp.zeros_like(cond)])

    def guided_denoiser(x: Array, t: Array) -> Array:
        lp = denoiser(xp.concatenate([x, x]), xp.concatenate([t, t]), both)
        return guided_log_probs(lp[:len(x)], lp[len(x):], guidance)

    return guided_denoiser


def normal_to_uniform(z: np.ndarray) -> np.ndarray:
    """``Phi(z)``: U(0, 1) draws from standard normal ones (the service's seeded noise)."""
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z) / math.sqrt(2.0)))


def _one_hot(x: Array, vocab: int) -> Array:
    """``(batch, D)`` tokens -> ``(batch, D, V)`` zeros and ones of x's array type."""
    xp = array_namespace(x)
    classes = asarray_like(np.arange(vocab, dtype=np.float64), x)
    return xp.where(x[..., None] == classes, 1.0 + 0 * x[..., None], 0 * x[..., None])


def source_tokens(u: Array, vocab: int, source: str) -> Array:
    """Draws of the source from ``u ~ U(0, 1)``: all masks (``V``), or uniform tokens."""
    xp = array_namespace(u)
    if source == "mask":
        return 0 * u + vocab
    return xp.floor(u * vocab).clip(max=vocab - 1)


def corrupt(x: Array, t: Array, u: Array, v: Array, vocab: int,
            source: str) -> tuple[Array, Array]:
    """``x_t`` of the factorized path: each token is replaced by a source draw with
    probability ``t`` (``u < t``; ``v`` draws the uniform source's token); returns ``(x_t,
    replaced)``."""
    xp = array_namespace(x)
    replaced = u < t[:, None]
    return xp.where(replaced, source_tokens(v, vocab, source), x), replaced


def ctmc_sample(denoiser: Denoiser, x: Array, steps: int, uniform: Uniform,
                source: str) -> Array:
    """Euler steps of the CTMC from the source at ``t = 1`` to data at ``t = 0``.

    On the path ``p_t = (1 - t) delta_data + t source``, the rate from a token to ``y`` at
    time ``t`` (backwards) is ``p(y | x_t) / t``, so one step from ``t`` to ``s`` redraws each
    token that may move from the denoiser with probability ``h / t`` (``h = t - s``; the
    last step has ``s = 0`` and redraws every such token). Masked source: the masked tokens
    move, and a redrawn one stays put; uniform source: every token may move.

    Args:
        denoiser: ``(x, t) -> (batch, D, V)`` log-probabilities.
        x: ``(batch, D)`` source tokens at ``t = 1``.
        steps: Euler steps (denoiser calls).
        uniform: ``shape -> U(0, 1)`` draws; called twice per step.
    """
    xp = array_namespace(x)
    grid = np.linspace(1.0, 0.0, steps + 1)
    with no_grad(x):
        for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
            t = 0 * x[:, 0] + float(t_now)
            probs = xp.exp(denoiser(x, t))
            vocab_of = probs.shape[-1]
            cdf = xp.cumsum(probs, -1)
            jump = uniform(tuple(x.shape)) < (t_now - t_next) / t_now
            if source == "mask":
                jump = jump & (x == vocab_of)
            draw = (uniform(tuple(x.shape))[..., None] > cdf).sum(-1)
            draw = (0 * x + draw).clip(max=vocab_of - 1)
            x = xp.where(jump, draw, x)
    return x


@dataclass(frozen=True)
class ElboResult:
    """``log_prob``: ``(batch,)`` the ELBO in nats; ``std_error``: ``(batch,)`` its Monte-Carlo
    standard error over the probes (``nan`` with one probe); ``nfe``: denoiser evaluations
    per row."""

    log_prob: Array
    std_error: Array
    nfe: int


def _orders(seeds: np.ndarray, rows: np.ndarray, probe: int, dim: int) -> np.ndarray:
    """``(batch, D)`` each row's rank of every token in a random order, from ``(seed, row,
    probe)`` only: a row's answer never depends on its batch."""
    return np.stack([np.argsort(np.random.default_rng([int(s), int(r), probe]).permutation(dim))
                     for s, r in zip(seeds, rows, strict=True)])


def masked_elbo(denoiser: Denoiser, x: Array, vocab: int, *, probes: int = 4,
                seed: int | np.ndarray = 0, rows: np.ndarray | None = None) -> ElboResult:
    """The masked source's evidence lower bound of ``x: (batch, D)`` (tokens in ``[0,
    vocab)``), in nats; ``seed`` and ``rows`` key each row's random orders.

    ``ELBO = int_0^1 1/t E[sum_{i masked at t} log p(x^i | x_t)] dt`` with every token masked
    with probability ``t``. Given ``k`` masked tokens, ``t`` has the density ``C(D, k) t^k (1 -
    t)^(D - k)``, and ``int 1/t C(D, k) t^k (1 - t)^(D - k) dt = 1/k``, so ``ELBO = sum_k 1/k
    E_{|S| = k}[sum_{i in S} log p(x^i | x_{-S})]``, the time integral done exactly; that is
    the expectation over uniformly random orders of ``sum_j log p(x_{o_j} | x_{o_<j})``
    (any-order autoregression: at step ``j`` the masked set is uniform of size ``D - j + 1``
    and ``o_j`` uniform in it). A probe draws one order per row and scores that sum, every
    size at once (one denoiser call on ``batch * D`` rows); with the true conditionals each
    probe is ``log p(x)`` exactly. The result is the mean of ``probes`` such estimates.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    xp = array_namespace(x)
    batch, dim = x.shape
    rows = np.arange(batch) if rows is None else np.asarray(rows)
    seeds = np.broadcast_to(np.asarray(seed, dtype=np.uint64), (batch,))
    k = np.arange(1, dim + 1, dtype=np.float64)  # masked-set sizes
    estimates = []
    with no_grad(x):
        for p in range(probes):
            rank = _orders(seeds, rows, p, dim)  # (batch, D)
            # size k: the last k tokens of the order are masked, the first of them is scored
            masked = rank[None, :, :] >= dim - k[:, None, None]  # (D sizes, batch, D)
            scored = asarray_like((rank[None, :, :] == dim - k[:, None, None])
                                  .astype(np.float64), x)
            m = asarray_like(masked.astype(np.float64), x)
            x_rep = xp.concatenate([x[None]] * dim, 0)  # (sizes, batch, D)
            t = asarray_like(np.repeat(k / dim, batch), x)
            flat = (x_rep * (1 - m) + m * vocab).reshape(dim * batch, dim)  # mask token V
            log_p = denoiser(flat, t).reshape(dim, batch, dim, vocab)
            # where, not a product: a -inf log-probability of another token is no NaN here
            picked = xp.where(_one_hot(x_rep, vocab) > 0, log_p, xp.zeros_like(log_p)).sum(-1)
            # the other tokens' terms may be -inf under a sharp denoiser: where, not a product
            estimates.append(xp.where(scored > 0, picked, xp.zeros_like(picked)).sum(-1).sum(0))
    return _mean_and_error(xp, estimates, probes * dim)


def uniform_elbo(denoiser: Denoiser, x: Array, vocab: int, *, probes: int = 4,
                 nodes: int = ELBO_NODES, t_min: float = ELBO_T_MIN,
                 seed: int | np.ndarray = 0, rows: np.ndarray | None = None) -> ElboResult:
    """The uniform source's evidence lower bound of ``x: (batch, D)`` in nats; ``seed`` and
    ``rows`` key each row's random draws.

    The model: the CTMC with rates ``u(y^i, z) = p(y^i | z, t) / t`` (``y^i != z^i``), run from
    uniform tokens at ``t = 1`` down to ``t_eps = t_min``, then one redraw of every token from
    ``p(. | z, t_eps)`` (the chain the Euler sampler of :func:`ctmc_sample` approximates; its
    last step also redraws every token). The conditional path ``q_t(z | x) = prod_i ((1 - t)
    delta_{x^i} + t / V)`` is the CTMC that moves a wrong token to ``x^i`` at rate ``1 / t``
    from the same uniform start, so (Campbell et al. 2022, 2024; Shaul et al. 2024, the path
    KL of two CTMCs)::

        log p(x) >= E_{q_eps}[sum_i log p(x^i | z, t_eps)]
                    + int_{t_eps}^1 E_{q_t}[sum_i g_i(z, t)] dt / t,
        g_i = [z^i != x^i] (1 + log p(x^i | z, t)) - (1 - p(z^i | z, t)).

    Both terms are estimated without bias: the integral in ``ln t`` at ``nodes`` stratified
    times (one uniform draw per stratum), each with one draw ``z ~ q_t(. | x)``; the first term
    with one draw at ``t_eps``. A probe makes one denoiser call on ``(nodes + 1) * batch``
    rows; the result is the mean of ``probes`` probes with its standard error. The bound is
    not tight even with the exact denoiser (the conditional path is not the model's
    posterior); the gap is measured in tests/test_dfm.py.
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be a positive integer, got {nodes!r}")
    if not 0 < t_min < 1:
        raise ValueError(f"t_min must lie in (0, 1), got {t_min!r}")
    xp = array_namespace(x)
    batch, dim = x.shape
    rows = np.arange(batch) if rows is None else np.asarray(rows)
    seeds = np.broadcast_to(np.asarray(seed, dtype=np.uint64), (batch,))
    span = -math.log(t_min)
    estimates = []
    with no_grad(x):
        for p in range(probes):
            draws = [np.random.default_rng([int(s), int(r), _UNIFORM_KEY + p])
                     for s, r in zip(seeds, rows, strict=True)]
            strata = np.stack([g.uniform(size=nodes) for g in draws], 1)  # (nodes, batch)
            uv = np.stack([g.uniform(size=(2, nodes + 1, dim)) for g in draws], 2)
            log_t = -span + (np.arange(nodes)[:, None] + strata) * (span / nodes)
            t = np.concatenate([np.exp(log_t), np.full((1, batch), t_min)], 0)  # (nodes+1, b)
            x_rep = xp.concatenate([x[None]] * (nodes + 1), 0)  # (nodes + 1, batch, D)
            z, _ = corrupt(x_rep.reshape(-1, dim), asarray_like(t.reshape(-1), x),
                           asarray_like(uv[0].reshape(-1, dim), x),
                           asarray_like(uv[1].reshape(-1, dim), x), vocab, "uniform")
            log_p = denoiser(z, asarray_like(t.reshape(-1), x)).reshape(nodes + 1, batch, dim,
                                                                         vocab)
            z = z.reshape(nodes + 1, batch, dim)
            # where, not a product: another token's -inf log-probability is no NaN here
            zeros = xp.zeros_like(log_p)
            log_px = xp.where(_one_hot(x_rep, vocab) > 0, log_p, zeros).sum(-1)
            p_z = xp.exp(xp.where(_one_hot(z, vocab) > 0, log_p, zeros).sum(-1))
            wrong = z != x_rep
            g = xp.where(wrong, 1.0 + log_px, xp.zeros_like(log_px)) - (1.0 - p_z)
            path = g[:nodes].sum(-1).mean(0) * span
            estimates.append(log_px[nodes].sum(-1) + path)
    return _mean_and_error(xp, estimates, probes * (nodes + 1))


def _mean_and_error(xp: Any, estimates: list[Array], nfe: int) -> ElboResult:
    """The mean of per-probe estimates ``(batch,)`` and its standard error (nan for one)."""
    stack = xp.stack(estimates, 0)
    mean = stack.mean(0)
    n = len(estimates)
    if n > 1:
        se = xp.sqrt(((stack - mean) ** 2).sum(0) / (n - 1) / n)
    else:
        se = 0 * mean + float("nan")
    return ElboResult(mean, se, nfe)


def elbo(denoiser: Denoiser, x: Array, vocab: int, source: str, *, probes: int = 4,
         nodes: int | None = None, seed: int | np.ndarray = 0,
         rows: np.ndarray | None = None) -> ElboResult:
    """The evidence lower bound of ``x`` under the path with ``source``:
    :func:`masked_elbo` or :func:`uniform_elbo` (``nodes``: its time nodes, default
    ``ELBO_NODES``; the masked ELBO's time integral is exact and takes none)."""
    if source == "mask":
        return masked_elbo(denoiser, x, vocab, probes=probes, seed=seed, rows=rows)
    if source == "uniform":
        return uniform_elbo(denoiser, x, vocab, probes=probes, nodes=nodes or ELBO_NODES,
                            seed=seed, rows=rows)
    raise ValueError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
