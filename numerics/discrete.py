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

import numpy as np

from numerics.arrays import Array, array_namespace, asarray_like, no_grad

__all__ = ["DFM_SOLVERS", "SOURCES", "ElboResult", "corrupt", "ctmc_sample", "masked_elbo",
           "normal_to_uniform", "source_tokens"]

SOURCES = ("mask", "uniform")
DFM_SOLVERS = ("ctmc",)
"""The CTMC's Euler sampler, the one way a DFM model samples."""

Denoiser = Callable[[Array, Array], Array]
Uniform = Callable[[tuple[int, ...]], Array]


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
    stack = xp.stack(estimates, 0)
    mean = stack.mean(0)
    if probes > 1:
        se = xp.sqrt(((stack - mean) ** 2).sum(0) / (probes - 1) / probes)
    else:
        se = 0 * mean + float("nan")
    return ElboResult(mean, se, probes * dim)
