"""Named data sets of the newer families, with exact densities where they have one.

Manifolds (Riemannian flow matching): a von Mises-Fisher mixture on the sphere S^2
(``vmf_s2``) and a wrapped-Gaussian mixture on the torus T^2 (``torus_t2``, angle pairs like
protein backbone dihedrals); densities are with respect to the manifold's area (S^2: total
4 pi; T^2: d theta_1 d theta_2, total (2 pi)^2). Tokens (discrete flow matching): binarised
digits (``digits_binary``, 64 pixels in {0, 1}) and a Markov chain's sequences
(``markov_seq``, 8 tokens of 4 values, exact probabilities)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.toys import logsumexp

__all__ = ["MARKOV_SEQ", "VMF_S2", "WRAPPED_T2", "MarkovChain", "VonMisesFisherMixture",
           "WrappedGaussianMixture", "binary_digits"]


@dataclass(frozen=True, eq=False)
class VonMisesFisherMixture:
    """``p(x) = sum_k w_k C(kappa_k) exp(kappa_k mu_k . x)`` on S^2, ``C(k) = k / (4 pi sinh
    k)``; sampled by Wood's (1994) method, exact on S^2."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, 3) unit vectors
    kappas: np.ndarray  # (K,)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        kappa, mu = self.kappas[labels], self.means[labels]
        u = rng.uniform(size=n)
        # w = mu . x: its law on S^2 has density ~ exp(kappa w) on [-1, 1], inverted exactly
        w = 1.0 + np.log(u + (1.0 - u) * np.exp(-2.0 * kappa)) / kappa
        v = rng.standard_normal((n, 3))
        v -= (v * mu).sum(1, keepdims=True) * mu  # a uniform direction orthogonal to mu
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        x = w[:, None] * mu + np.sqrt(np.clip(1.0 - w * w, 0.0, None))[:, None] * v
        return x / np.linalg.norm(x, axis=1, keepdims=True), labels

    def log_density(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        k = self.kappas
        # log C(k) = log k - log 2 pi - k - log(1 - exp(-2k)), stable for large k
        log_c = np.log(k) - math.log(2 * math.pi) - k - np.log1p(-np.exp(-2 * k))
        return logsumexp(np.log(self.weights) + log_c + k * (x @ self.means.T), axis=-1)


@dataclass(frozen=True, eq=False)
class WrappedGaussianMixture:
    """Diagonal Gaussians wrapped onto ``[-pi, pi)^2``; the density sums ``WRAPS`` images of
    each coordinate either side (their mass beyond is below 1e-12 for stds <= 1)."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, D) angles
    stds: np.ndarray  # (K, D)
    WRAPS = 3

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.choice(len(self.weights), size=n, p=self.weights)
        x = self.means[labels] + self.stds[labels] * rng.standard_normal((n, self.means.shape[1]))
        return (x + math.pi) % (2 * math.pi) - math.pi, labels

    def log_density(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        shifts = 2 * math.pi * np.arange(-self.WRAPS, self.WRAPS + 1)
        d = x[..., None, :, None] - self.means[:, :, None] + shifts  # (..., K, D, wraps)
        s = self.stds[:, :, None]
        log_n = -0.5 * (d / s) ** 2 - np.log(s) - 0.5 * math.log(2 * math.pi)
        per_dim = logsumexp(log_n, axis=-1).sum(-1)  # (..., K)
        return logsumexp(np.log(self.weights) + per_dim, axis=-1)


def _unit(v: list[float]) -> list[float]:
    a = np.asarray(v, dtype=np.float64)
    return list(a / np.linalg.norm(a))


VMF_S2 = VonMisesFisherMixture(
    weights=np.array([0.4, 0.35, 0.25]),
    means=np.array([_unit([1, 0, 0.3]), _unit([-0.5, 0.8, -0.2]), _unit([0.1, -0.6, -0.8])]),
    kappas=np.array([10.0, 20.0, 6.0]),
)
"""Three vMF components of different concentrations (the issue's S^2 set)."""

WRAPPED_T2 = WrappedGaussianMixture(
    weights=np.array([0.5, 0.3, 0.2]),
    # roughly the alpha-helix, beta-sheet and left-handed regions of a Ramachandran plot
    means=np.array([[-1.1, -0.8], [-2.1, 2.4], [1.0, 0.7]]),
    stds=np.array([[0.3, 0.35], [0.4, 0.3], [0.3, 0.4]]),
)
"""Three wrapped Gaussians on T^2; the second one wraps around the psi = pi edge."""


@dataclass(frozen=True, eq=False)
class MarkovChain:
    """Sequences of ``length`` tokens: the first from ``initial``, each next one from the row
    of ``transition`` of the one before; ``log p`` is exact."""

    initial: np.ndarray  # (V,)
    transition: np.ndarray  # (V, V), rows sum to 1
    length: int

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, None]:
        v = len(self.initial)
        x = np.empty((n, self.length), dtype=np.int64)
        x[:, 0] = rng.choice(v, size=n, p=self.initial)
        cdf = np.cumsum(self.transition, 1)
        for i in range(1, self.length):
            u = rng.uniform(size=n)
            x[:, i] = np.minimum((u[:, None] > cdf[x[:, i - 1]]).sum(1), v - 1)
        return x.astype(np.float64), None

    def log_density(self, x: np.ndarray) -> np.ndarray:
        t = np.asarray(x).astype(np.int64)
        lp = np.log(self.initial)[t[..., 0]]
        return lp + np.log(self.transition)[t[..., :-1], t[..., 1:]].sum(-1)


MARKOV_SEQ = MarkovChain(
    initial=np.array([0.4, 0.3, 0.2, 0.1]),
    transition=np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1],
                         [0.05, 0.05, 0.1, 0.8], [0.6, 0.2, 0.1, 0.1]]),
    length=8,
)
"""A sticky, cyclic chain over 4 tokens: structure a per-token model cannot see."""


def binary_digits(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits (offline), pixels above 7 of 16 as 1: 64 binary tokens."""
    import sklearn.datasets  # heavy: import where used

    bunch = sklearn.datasets.load_digits()
    x, y = (bunch.data > 7).astype(np.float64), np.asarray(bunch.target)
    keep = np.arange(len(x)) if n == len(x) else np.sort(rng.choice(len(x), n, False))
    return x[keep], y[keep]
