"""The defaults suite (bench/suite.py): exact densities that integrate to 1, samplers that
draw from them, and a tuning / confirmation split fixed in the code."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_t

from bench.suite import (
    SUITE,
    NamedToy,
    Product,
    curve,
    gaussian_mixture,
    student_t_mixture,
    suite_splits,
)

# Importance sampling's tolerance: |Z - 1| within 4 standard errors or 0.03, whichever is
# larger, and the estimate itself no coarser than 0.03 (else the test could not fail).
Z_TOL, SE_MAX = 0.03, 0.05
LOW_DIM = [s for s in SUITE.values() if s.build is not None and s.dim <= 8]
BUILDERS = {
    "gmm2": lambda: gaussian_mixture(2, 1), "gmm3": lambda: gaussian_mixture(3, 2),
    "t2": lambda: student_t_mixture(2, 3), "t3": lambda: student_t_mixture(3, 4),
    "curve2": lambda: curve(2, 5), "curve3": lambda: curve(3, 6),
    "product": lambda: Product((NamedToy("3clusters"), curve(2, 7))),
}


def _proposal(d, rng: np.random.Generator, centers: int = 300, h: float = 0.5):
    """Half a wide Student-t (df 3), half a Gaussian kernel density on the set's own draws:
    it covers the tails and the thin parts. Returns ``draw(n)`` and ``log_q(z)``."""
    x = d.sample(5000, rng)
    mean, chol = x.mean(0), np.linalg.cholesky(np.cov(x.T))
    wide = multivariate_t(mean, 4 * chol @ chol.T, df=3, seed=int(rng.integers(2**31)))
    ctr, inv = d.sample(centers, rng), np.linalg.inv(chol)
    log_norm = (math.log(centers) + d.dim * math.log(h) + np.log(np.diag(chol)).sum()
                + 0.5 * d.dim * math.log(2 * math.pi))

    def draw(n: int) -> np.ndarray:
        kde = ctr[rng.integers(centers, size=n - n // 2)]
        kde = kde + h * rng.standard_normal((len(kde), d.dim)) @ chol.T
        return np.concatenate([wide.rvs(n // 2).reshape(-1, d.dim), kde])

    def log_q(z: np.ndarray) -> np.ndarray:
        u = np.concatenate([((c[:, None, :] - ctr[None]) @ inv.T / h)
                            for c in np.array_split(z, max(len(z) // 2000, 1))])
        log_kde = logsumexp(-0.5 * (u**2).sum(-1), axis=1) - log_norm
        return np.logaddexp(wide.logpdf(z), log_kde) - math.log(2)

    return draw, log_q


def _normaliser(d, rng: np.random.Generator, n: int = 30_000):
    """``Z = E_q[p/q]`` with its standard error, and the draws and weights."""
    draw, log_q = _proposal(d, rng)
    z = draw(n)
    w = np.exp(d.log_density(z) - log_q(z))
    return float(w.mean()), float(w.std() / math.sqrt(n)), z, w


def _energy_pvalue(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                   permutations: int = 200) -> float:
    """Permutation p-value of the energy distance between two samples (Szekely & Rizzo)."""
    both = np.concatenate([a, b])
    dist = np.linalg.norm(both[:, None] - both[None], axis=-1)
    n = len(a)

    def stat(idx: np.ndarray) -> float:
        i, j = idx[:n], idx[n:]
        return 2 * dist[np.ix_(i, j)].mean() - dist[np.ix_(i, i)].mean() - \
            dist[np.ix_(j, j)].mean()

    observed = stat(np.arange(len(both)))
    null = [stat(rng.permutation(len(both))) for _ in range(permutations)]
    return (1 + sum(s >= observed for s in null)) / (1 + permutations)


def _density_cases():
    return [pytest.param(b, id=k) for k, b in BUILDERS.items()] + \
        [pytest.param(s.density, id=s.name) for s in LOW_DIM]


@pytest.mark.parametrize("build", _density_cases())
def test_density_integrates_to_one_and_matches_samples(build) -> None:
    """Monte Carlo: ``E_q[p/q] = 1`` within 4 s.e. or 0.03. The builders are checked at
    D = 2 and 3 (a wrong D-dependent constant fails one of them); the 24- and 32-D suite
    sets use the same builders (importance sampling there is too noisy for a fast test).

    Then the sampler's draws and importance-resampled draws of ``log_density`` pass an
    energy two-sample test (p > 0.01), and the same test rejects draws scaled by 1.5 (power).
    """
    rng = np.random.default_rng(0)
    d = build()
    z_hat, se, z, w = _normaliser(d, rng)
    assert se < SE_MAX, f"estimate too coarse to test: {z_hat} +- {se}"
    assert abs(z_hat - 1) < max(4 * se, Z_TOL), f"integral {z_hat} +- {se}"
    resampled = z[rng.choice(len(z), 300, p=w / w.sum())]
    drawn = d.sample(300, rng)
    assert _energy_pvalue(drawn, resampled, rng) > 0.01
    mean = drawn.mean(0)
    assert _energy_pvalue(mean + 1.5 * (drawn - mean), resampled, rng) <= 0.01


def test_halves_are_fixed_and_balanced() -> None:
    halves = {h: [s for s in SUITE.values() if s.half == h] for h in ("tuning", "confirmation")}
    assert len(SUITE) >= 12
    for sets in halves.values():
        assert sum(s.build is not None for s in sets) >= 6
        assert any(s.table is not None for s in sets)
    dims = sorted(s.dim for s in SUITE.values() if s.build is not None)
    assert dims[0] == 2 and dims[-1] == 32
    train, val, test = suite_splits(SUITE["gmm2_c"])
    again = suite_splits(SUITE["gmm2_c"])[2]
    assert train.shape == (10_000, 2) and val.shape == test.shape == (2_000, 2)
    np.testing.assert_array_equal(test, again)  # the same rows from the seed every time
