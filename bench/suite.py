"""The suite that chooses defaults: seeded sets of varied shape with exact densities.

Each synthetic set is a :class:`Density` (``sample(n, rng)`` and exact ``log_density(x)``)
built from a fixed seed: Gaussian mixtures with random component counts, weights and full
covariances (2 to 32 dimensions), Student-t mixtures (heavy tails), noisy curves (a 1-D
parabola-like manifold with Gaussian noise around it, rotated into D dimensions: a
triangular map of unit Jacobian, so its density is exact) and products of 2-D toys. Beside
them, scikit-learn's bundled tables (no known density: compared by test log-likelihood).

The split into a **tuning half** and a **confirmation half** is fixed here, before any run:
defaults are chosen on the tuning half's validation splits only, and the confirmation half
is reported once (``bench/defaults.py``).

    from bench.suite import SUITE, suite_splits

    s = SUITE["gmm12_c"]
    train, val, test = suite_splits(s)
    gap = s.density().log_density(test).mean() - model_log_prob(test).mean()
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from scipy.special import gammaln, logsumexp

from training.data import DATASETS, load_data, split, true_log_density
from training.toys import GaussianMixture

__all__ = ["SUITE", "Curve", "Density", "NamedToy", "Product", "StudentTMixture", "SuiteSet",
           "gaussian_mixture", "student_t_mixture", "suite_splits"]

TRAIN_ROWS, VAL_ROWS, TEST_ROWS = 10_000, 2_000, 2_000


class Density(Protocol):
    dim: int

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray: ...

    def log_density(self, x: np.ndarray) -> np.ndarray: ...


def _rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    return q * np.sign(np.diagonal(r))


def _random_covariances(dim: int, k: int, rng: np.random.Generator,
                        low: float, high: float) -> np.ndarray:
    """``k`` full covariances: random rotations of per-axis std uniform in [low, high]."""
    out = []
    for _ in range(k):
        q, s = _rotation(dim, rng), rng.uniform(low, high, dim)
        out.append(q @ np.diag(s**2) @ q.T)
    return np.stack(out)


def _random_means(dim: int, k: int, rng: np.random.Generator, spread: float) -> np.ndarray:
    """``k`` means, the closest pair ``spread`` apart (components overlap a little)."""
    means = rng.standard_normal((k, dim))
    gaps = [np.linalg.norm(a - b) for i, a in enumerate(means) for b in means[i + 1:]]
    return means * (spread / min(gaps)) if gaps else means


class _GaussianMixtureSet:
    """``training.toys.GaussianMixture`` under the :class:`Density` protocol."""

    def __init__(self, mixture: GaussianMixture) -> None:
        self.mixture, self.dim = mixture, mixture.means.shape[1]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.mixture.sample(n, rng)[0]

    def log_density(self, x: np.ndarray) -> np.ndarray:
        return self.mixture.log_density(x)


def gaussian_mixture(dim: int, seed: int) -> Density:
    """2 to 8 components, Dirichlet(2) weights, full covariances (std 0.4..1.2), means 3 apart."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    weights = rng.dirichlet(np.full(k, 2.0))
    covs = _random_covariances(dim, k, rng, 0.4, 1.2)
    return _GaussianMixtureSet(GaussianMixture(weights, _random_means(dim, k, rng, 3.0), covs))


@dataclass(frozen=True, eq=False)
class StudentTMixture:
    """``p(x) = sum_k w_k t_nu_k(x; mu_k, Sigma_k)``: multivariate Student-t components.

    ``t_nu(x; mu, Sigma) = Gamma((nu+D)/2) / (Gamma(nu/2) (nu pi)^(D/2) |Sigma|^(1/2))
    (1 + m/nu)^(-(nu+D)/2)`` with ``m`` the Mahalanobis distance squared; a draw is
    ``mu + L z / sqrt(chi2_nu / nu)`` (``L L^T = Sigma``).
    """

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, D)
    scales: np.ndarray  # (K, D, D)
    dofs: np.ndarray  # (K,)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        z = rng.standard_normal((n, self.dim))
        chols = np.linalg.cholesky(self.scales)[labels]
        u = rng.chisquare(self.dofs[labels]) / self.dofs[labels]
        return self.means[labels] + np.einsum("nij,nj->ni", chols, z) / np.sqrt(u)[:, None]

    def log_density(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dim)
        d, nu = self.dim, self.dofs
        chols = np.linalg.cholesky(self.scales)
        z = np.einsum("kij,nkj->nki", np.linalg.inv(chols), x[:, None, :] - self.means[None])
        maha = (z**2).sum(-1)  # (n, K)
        logdet = 2 * np.log(np.diagonal(chols, axis1=1, axis2=2)).sum(-1)
        log_t = (gammaln((nu + d) / 2) - gammaln(nu / 2) - 0.5 * d * np.log(nu * math.pi)
                 - 0.5 * logdet - 0.5 * (nu + d) * np.log1p(maha / nu))
        return logsumexp(log_t + np.log(self.weights), axis=1)


def student_t_mixture(dim: int, seed: int) -> Density:
    """2 to 5 components, degrees of freedom 2.5..6 (heavy tails), means 4 apart."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    return StudentTMixture(rng.dirichlet(np.full(k, 2.0)), _random_means(dim, k, rng, 4.0),
                           _random_covariances(dim, k, rng, 0.4, 1.0),
                           rng.uniform(2.5, 6.0, k))


@dataclass(frozen=True, eq=False)
class Curve:
    """A noisy curve in ``D`` dimensions, rotated: exact density by a unit-Jacobian map.

    Before the rotation ``R``: ``y_1 ~ N(0, a^2)`` and ``y_j = b_j (y_1^2 - a^2) + sigma e_j``
    for ``j >= 2``, so ``p(y) = N(y_1; 0, a^2) prod_j N(y_j; b_j (y_1^2 - a^2), sigma^2)``
    (a parabola-shaped 1-D manifold blurred by ``sigma``); ``x = R y`` keeps that density.
    """

    a: float
    bends: np.ndarray  # (D-1,)
    sigma: float
    rotation: np.ndarray  # (D, D)

    @property
    def dim(self) -> int:
        return len(self.bends) + 1

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        y1 = self.a * rng.standard_normal(n)
        rest = self.bends * (y1**2 - self.a**2)[:, None]
        rest = rest + self.sigma * rng.standard_normal((n, self.dim - 1))
        return np.concatenate([y1[:, None], rest], 1) @ self.rotation.T

    def log_density(self, x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float64).reshape(-1, self.dim) @ self.rotation
        y1, rest = y[:, 0], y[:, 1:]
        resid = (rest - self.bends * (y1**2 - self.a**2)[:, None]) / self.sigma
        return (-0.5 * (y1 / self.a) ** 2 - math.log(self.a)
                - 0.5 * (resid**2).sum(-1) - (self.dim - 1) * math.log(self.sigma)
                - 0.5 * self.dim * math.log(2 * math.pi))


def curve(dim: int, seed: int, sigma: float = 0.15) -> Density:
    rng = np.random.default_rng(seed)
    bends = rng.uniform(0.2, 0.6, dim - 1) * rng.choice([-1.0, 1.0], dim - 1)
    return Curve(1.0, bends / math.sqrt(dim - 1), sigma, _rotation(dim, rng))


@dataclass(frozen=True)
class NamedToy:
    """A 2-D named set of ``training.data`` that has an exact density."""

    name: str

    @property
    def dim(self) -> int:
        return DATASETS[self.name].dim

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return DATASETS[self.name].sampler(n, rng)[0]

    def log_density(self, x: np.ndarray) -> np.ndarray:
        log_p = true_log_density(self.name)
        assert log_p is not None, f"{self.name} has no exact density"
        return log_p(np.asarray(x, dtype=np.float64).reshape(-1, self.dim))


@dataclass(frozen=True)
class Product:
    """Independent blocks side by side: ``log p(x) = sum_i log p_i(x_i)``."""

    parts: tuple[Density, ...]

    @property
    def dim(self) -> int:
        return sum(p.dim for p in self.parts)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.concatenate([p.sample(n, rng) for p in self.parts], 1)

    def log_density(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1, self.dim)
        edges = np.cumsum([0] + [p.dim for p in self.parts])
        return sum(p.log_density(x[:, lo:hi])
                   for p, lo, hi in zip(self.parts, edges[:-1], edges[1:], strict=True))


@dataclass(frozen=True)
class SuiteSet:
    """One set of the suite. ``build``: its exact density, or ``None`` for a table."""

    name: str
    half: Literal["tuning", "confirmation"]
    summary: str
    build: Callable[[], Density] | None = None
    table: str | None = None  # a key of training.data.DATASETS (a bundled table)
    seed: int = 0  # draws of the rows and their split

    @functools.cached_property
    def _density(self) -> Density | None:
        return None if self.build is None else self.build()

    def density(self) -> Density | None:
        return self._density

    @property
    def dim(self) -> int:
        return self._density.dim if self._density is not None else DATASETS[self.table].dim


def _set(name: str, half: str, summary: str, build: Callable[[], Density], seed: int) -> SuiteSet:
    return SuiteSet(name, half, summary, build=build, seed=seed)  # type: ignore[arg-type]


# Fixed before any run (issue #30): the suffix says the half (_t tuning, _c confirmation).
_SETS = [
    _set("gmm3_t", "tuning", "Gaussian mixture, 3-D", lambda: gaussian_mixture(3, 3003), 3003),
    _set("gmm10_t", "tuning", "Gaussian mixture, 10-D", lambda: gaussian_mixture(10, 3010),
         3010),
    _set("gmm24_t", "tuning", "Gaussian mixture, 24-D", lambda: gaussian_mixture(24, 3024),
         3024),
    _set("tmix4_t", "tuning", "Student-t mixture, 4-D", lambda: student_t_mixture(4, 3104),
         3104),
    _set("curve8_t", "tuning", "noisy curve, 8-D", lambda: curve(8, 3208), 3208),
    _set("toys4_t", "tuning", "8gaussians x checkerboard, 4-D",
         lambda: Product((NamedToy("8gaussians"), NamedToy("checkerboard"))), 3304),
    _set("gmm2_c", "confirmation", "Gaussian mixture, 2-D", lambda: gaussian_mixture(2, 4002),
         4002),
    _set("gmm12_c", "confirmation", "Gaussian mixture, 12-D",
         lambda: gaussian_mixture(12, 4012), 4012),
    _set("gmm32_c", "confirmation", "Gaussian mixture, 32-D",
         lambda: gaussian_mixture(32, 4032), 4032),
    _set("tmix8_c", "confirmation", "Student-t mixture, 8-D",
         lambda: student_t_mixture(8, 4108), 4108),
    _set("curve5_c", "confirmation", "noisy curve, 5-D", lambda: curve(5, 4205), 4205),
    _set("toys6_c", "confirmation", "3clusters x 2-D curve x 8gaussians, 6-D",
         lambda: Product((NamedToy("3clusters"), curve(2, 4306), NamedToy("8gaussians"))),
         4306),
]
_TABLES = [
    SuiteSet("wine_t", "tuning", "scikit-learn wine, 13-D (no known density)", table="wine"),
    SuiteSet("breast_cancer_c", "confirmation",
             "scikit-learn breast cancer, 30-D (no known density)", table="breast_cancer"),
]
SUITE: dict[str, SuiteSet] = {s.name: s for s in _SETS + _TABLES}


def suite_splits(s: SuiteSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test rows of one set, ``(rows, dim)`` each, from its seed.

    Synthetic sets: 10000 / 2000 / 2000 fresh draws. Tables: ``training.data.split``.
    """
    if s.table is not None:
        parts = split(load_data(s.table, seed=s.seed).x, seed=s.seed)
        return parts.train, parts.val, parts.test
    rng = np.random.default_rng(s.seed)
    x = s.density().sample(TRAIN_ROWS + VAL_ROWS + TEST_ROWS, rng)  # type: ignore[union-attr]
    return x[:TRAIN_ROWS], x[TRAIN_ROWS:TRAIN_ROWS + VAL_ROWS], x[TRAIN_ROWS + VAL_ROWS:]
