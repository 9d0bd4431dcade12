"""The generated toy sets: Gaussian mixtures with exact densities and samplers, and the 2-D
toys (moons, circles, pinwheel, two spirals, swiss roll, checkerboard) that the named sets of
``training.data`` draw from.

Everything random takes a ``numpy.random.Generator``; nothing touches a global RNG. Arrays are
``(rows, dim)`` float64.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from artifact.tables import DataError

__all__ = [
    "MIXTURE_SETS",
    "GaussianMixture",
    "Sampler",
    "checkerboard",
    "checkerboard_log_density",
    "circles",
    "gaussian_mixture",
    "logsumexp",
    "mixture_sampler",
    "moons",
    "pinwheel",
    "swissroll",
    "two_spirals",
]

Sampler = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray | None]]
"""``sampler(n, rng) -> (x: (n, dim), labels: (n,) or None)``: how a named set draws rows."""


# --------------------------------------------------------------------------- mixtures


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """``p(x) = sum_k w_k N(x; mu_k, Sigma_k)`` with exact density and sampler.

    Attributes:
        weights: ``(K,)``, summing to 1.
        means: ``(K, D)``.
        covariances: ``(K, D, D)``, symmetric positive definite.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``x: (n, D)`` and the component labels ``(n,)``."""
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        noise = rng.standard_normal((n, self.means.shape[1]))
        chols = np.linalg.cholesky(self.covariances)[labels]
        return self.means[labels] + np.einsum("nij,nj->ni", chols, noise), labels

    def component_log_densities(self, x: np.ndarray) -> np.ndarray:
        """Exact ``log N(x; mu_k, Sigma_k)`` of every component: ``x: (n, D)`` -> ``(n, K)``
        (the conditional density ``log p(x | y = k)`` when the component is the label)."""
        flat = np.asarray(x, dtype=np.float64).reshape(-1, self.means.shape[1])
        dim = flat.shape[1]
        chols = np.linalg.cholesky(self.covariances)
        diff = flat[:, None, :] - self.means[None]  # (n, K, D)
        z = np.einsum("kij,nkj->nki", np.linalg.inv(chols), diff)
        half_logdet = np.log(np.diagonal(chols, axis1=1, axis2=2)).sum(-1)
        return -0.5 * (z**2).sum(-1) - half_logdet - 0.5 * dim * math.log(2 * math.pi)

    def log_density(self, x: np.ndarray) -> np.ndarray:
        """Exact ``log p(x)``: ``x: (..., D)`` -> ``(...,)``."""
        x = np.asarray(x, dtype=np.float64)
        log_normal = self.component_log_densities(x)
        return logsumexp(log_normal + np.log(self.weights), axis=1).reshape(x.shape[:-1])


def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    """``log sum exp a`` along ``axis``, shifted by the maximum so that nothing overflows."""
    top = a.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def _farthest_points(candidates: np.ndarray, k: int) -> np.ndarray:
    chosen = [0]
    gap = np.linalg.norm(candidates - candidates[0], axis=1)
    for _ in range(k - 1):
        chosen.append(int(gap.argmax()))
        gap = np.minimum(gap, np.linalg.norm(candidates - candidates[chosen[-1]], axis=1))
    return candidates[chosen]


def _random_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diagonal(r))  # sign fix makes the rotation unique


@functools.cache
def _random_mixture(dim: int, components: int, seed: int) -> GaussianMixture:
    """Fixed mixture: per-axis std in [0.5, 1], closest means 3.5 apart (they overlap a bit)."""
    rng = np.random.default_rng(seed)
    means = _farthest_points(rng.uniform(-1, 1, (64 * components, dim)), components)
    closest = min(np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1 :])
    stds = rng.uniform(0.5, 1.0, (components, dim))
    rotations = [_random_rotation(dim, rng) for _ in range(components)]
    covs = np.stack([q @ np.diag(s**2) @ q.T for q, s in zip(rotations, stds, strict=True)])
    weights = rng.uniform(1.0, 2.0, components)
    return GaussianMixture(weights / weights.sum(), means * (3.5 / closest), covs)


@functools.cache
def _eight_gaussians() -> GaussianMixture:
    angles = np.arange(8) * (np.pi / 4)
    means = 2 * math.sqrt(2) * np.stack([np.cos(angles), np.sin(angles)], 1)
    return GaussianMixture(np.full(8, 1 / 8), means, np.tile(np.eye(2) / 8, (8, 1, 1)))


@functools.cache
def _three_clusters() -> GaussianMixture:
    means = np.array([[-2.5, -1.0], [2.5, -1.0], [0.0, 2.5]])
    covs = np.array([[[0.5, 0.0], [0.0, 0.5]], [[0.8, 0.4], [0.4, 0.4]], [[0.3, 0], [0, 0.9]]])
    return GaussianMixture(np.array([0.4, 0.35, 0.25]), means, covs)


_MIXTURES: dict[str, Callable[[], GaussianMixture]] = {
    "8gaussians": _eight_gaussians,
    "3clusters": _three_clusters,
    "gmm2": lambda: _random_mixture(2, 5, 1002),
    "gmm6": lambda: _random_mixture(6, 6, 1006),
    "gmm16": lambda: _random_mixture(16, 8, 1016),
}


MIXTURE_SETS = frozenset(_MIXTURES)
"""The named sets drawn from a Gaussian mixture; their labels are its components."""


def gaussian_mixture(name: str) -> GaussianMixture:
    """The exact mixture behind a mixture-valued named set (``gmm*``, 8gaussians, 3clusters)."""
    if name not in _MIXTURES:
        raise DataError(f"'{name}' is not a Gaussian mixture; choose one of {sorted(_MIXTURES)}")
    return _MIXTURES[name]()


# --------------------------------------------------------------------------- 2D toys

_CHECKER_CORNERS = np.array(
    [(-4 + 2 * i, -4 + 2 * j) for i in range(4) for j in range(4) if (i + j) % 2 == 0], float
)


def checkerboard(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    cells = rng.integers(0, len(_CHECKER_CORNERS), n)
    return _CHECKER_CORNERS[cells] + 2 * rng.uniform(size=(n, 2)), cells


def checkerboard_log_density(x: np.ndarray) -> np.ndarray:
    """Uniform on the 8 black 2x2 squares of a 4x4 board over [-4, 4)^2: 1/32 there, else 0."""
    x = np.asarray(x, dtype=np.float64)
    cell = np.floor((x + 4) / 2)
    inside = np.all((cell >= 0) & (cell <= 3), axis=-1) & (cell.sum(-1) % 2 == 0)
    return np.where(inside, -math.log(32.0), -np.inf)


def moons(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, n)
    t = rng.uniform(0, np.pi, n)
    outer = np.stack([np.cos(t), np.sin(t)], 1)
    inner = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
    x = np.where(labels[:, None] == 0, outer, inner) + 0.1 * rng.standard_normal((n, 2))
    return x, labels


def circles(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, n)
    t = rng.uniform(0, 2 * np.pi, n)
    radius = np.where(labels == 0, 1.0, 0.5)[:, None]
    x = radius * np.stack([np.cos(t), np.sin(t)], 1) + 0.05 * rng.standard_normal((n, 2))
    return x, labels


def pinwheel(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Five arms, as in Johnson et al. 2016 (structured VAEs)."""
    labels = rng.integers(0, 5, n)
    feats = rng.standard_normal((n, 2)) * [0.3, 0.1] + [1.0, 0.0]
    angles = labels * (2 * np.pi / 5) + 0.25 * np.exp(feats[:, 0])
    cos, sin = np.cos(angles), np.sin(angles)
    x = np.stack([feats[:, 0] * cos - feats[:, 1] * sin, feats[:, 0] * sin + feats[:, 1] * cos])
    return 2 * x.T, labels


def two_spirals(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, n)
    t = np.sqrt(rng.uniform(size=n)) * 3 * np.pi
    arm = np.stack([-np.cos(t) * t, np.sin(t) * t], 1) + 0.5 * rng.uniform(size=(n, 2))
    x = np.where(labels[:, None] == 0, arm, -arm) / 3
    return x + 0.1 * rng.standard_normal((n, 2)), labels


def swissroll(n: int, rng: np.random.Generator) -> tuple[np.ndarray, None]:
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + rng.standard_normal((n, 2))
    return x / 5, None


def mixture_sampler(name: str) -> Sampler:
    return lambda n, rng: gaussian_mixture(name).sample(n, rng)
