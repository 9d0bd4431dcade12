"""numerics.solvers: known ODEs, convergence orders, dopri5 batch independence, numpy == torch.

Also home of :class:`AnalyticGaussian`, the closed-form Gaussian fixture that
tests/test_likelihood.py and tests/test_samplers.py import.
"""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from numerics.arrays import array_namespace, asarray_like
from numerics.solvers import SOLVERS, integrate, trajectory


@dataclass
class AnalyticGaussian:
    """Data ``N(mu, cov)`` and the closed-form fields of two probability paths.

    Both paths have Gaussian marginals ``N(m_t, U diag(var_t) U^T)`` with ``cov = U diag(lam)
    U^T``; every method takes ``x: (batch, dim)``, ``t: (batch,)`` (numpy or torch) and works
    row by row in the eigenbasis, so the fields are affine in ``x`` with known traces.

    * linear path ``x_t = (1 - t) x0 + t z``: ``m_t = (1 - t) mu``, ``var_t = (1 - t)^2 lam
      + t^2``, marginal velocity ``E[z - x0 | x_t] = -mu + (t - (1 - t) cov) C_t^{-1} (x - m_t)``.
    * VP path ``x_t = alpha x0 + sigma eps``: ``m_t = alpha mu``, ``var_t = alpha^2 lam +
      sigma^2``, score ``-C_t^{-1} (x - m_t)``.
    """

    mu: np.ndarray = field(default_factory=lambda: np.array([1.0, -0.5, 0.3]))
    cov: np.ndarray = field(
        default_factory=lambda: np.array([[1.0, 0.6, 0.2], [0.6, 0.8, -0.1], [0.2, -0.1, 0.5]])
    )

    def __post_init__(self) -> None:
        self.lam, self.U = np.linalg.eigh(self.cov)
        self.dim = self.mu.shape[0]

    def _c(self, a: np.ndarray, like: object) -> object:
        return asarray_like(a, like)

    def to_eig(self, x: object, mean: object) -> object:
        return (x - mean) @ self._c(self.U, x)

    def from_eig(self, y: object) -> object:
        return y @ self._c(self.U.T, y)

    def log_prob_at(self, x: object, mean: object, var: object) -> object:
        """``log N(x; mean, U diag(var) U^T)``, mean/var ``(batch, dim)``."""
        xp = array_namespace(x)
        y = self.to_eig(x, mean)
        return -0.5 * (
            (y * y / var).sum(-1) + xp.log(var).sum(-1) + self.dim * math.log(2 * math.pi)
        )

    def log_prob(self, x: object) -> object:
        return self.log_prob_at(x, self._c(self.mu, x), self._c(self.lam, x))

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.map_noise(rng.standard_normal((n, self.dim)))

    def map_noise(self, z: object) -> object:
        """The exact linear-path flow from ``t = 1`` to ``t = 0``: ``mu + cov^{1/2} z``."""
        return self._c(self.mu, z) + self.from_eig(
            (z @ self._c(self.U, z)) * self._c(np.sqrt(self.lam), z)
        )

    # --- linear (rectified-flow) path -------------------------------------------------------
    def _linear(self, x: object, t: object) -> tuple[object, object]:
        t = t[:, None]
        lam = self._c(self.lam, x)
        var = (1 - t) ** 2 * lam + t**2
        return (1 - t) * self._c(self.mu, x), (t - (1 - t) * lam) / var

    def linear_velocity(self, x: object, t: object) -> object:
        mean, coef = self._linear(x, t)
        return -self._c(self.mu, x) + self.from_eig(self.to_eig(x, mean) * coef)

    def linear_velocity_div(self, x: object, t: object) -> tuple[object, object]:
        return self.linear_velocity(x, t), self._linear(x, t)[1].sum(-1)

    def linear_velocity_jvp(self, x: object, t: object, e: object) -> tuple[object, object]:
        coef = self._linear(x, t)[1]
        return self.linear_velocity(x, t), self.from_eig((e @ self._c(self.U, e)) * coef)

    # --- VP path of a schedule --------------------------------------------------------------
    def vp_marginal(self, t: object, schedule: object, like: object) -> tuple[object, object]:
        alpha, sigma = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
        return alpha * self._c(self.mu, like), alpha**2 * self._c(self.lam, like) + sigma**2

    def vp_score(self, x: object, t: object, schedule: object) -> object:
        mean, var = self.vp_marginal(t, schedule, x)
        return -self.from_eig(self.to_eig(x, mean) / var)

    def vp_eps(self, x: object, t: object, schedule: object) -> object:
        """The exact noise prediction ``-sigma * score``."""
        return -schedule.sigma(t)[:, None] * self.vp_score(x, t, schedule)

    def vp_velocity_div(self, x: object, t: object, schedule: object) -> tuple[object, object]:
        """PF-ODE ``-beta/2 (x + score)`` and its trace, written from the score (smooth at 0)."""
        beta = schedule.beta(t)
        v = -0.5 * beta[:, None] * (x + self.vp_score(x, t, schedule))
        var = self.vp_marginal(t, schedule, x)[1]
        return v, -0.5 * beta * self.dim + 0.5 * beta * (1.0 / var).sum(-1)

    def vp_velocity_jvp(self, x: object, t: object, e: object, schedule: object) -> tuple:
        beta = schedule.beta(t)[:, None]
        var = self.vp_marginal(t, schedule, x)[1]
        jvp = -0.5 * beta * e + 0.5 * beta * self.from_eig((e @ self._c(self.U, e)) / var)
        return self.vp_velocity_div(x, t, schedule)[0], jvp


GAUSS = AnalyticGaussian()


def _noise(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, GAUSS.dim))


@pytest.mark.parametrize("method", SOLVERS)
def test_cubic_field_is_integrated_exactly_both_ways(method: str) -> None:
    # dx/dt = 3 t^2: x(1) = x(0) + 1. rk4 (Simpson) and dopri5 are exact for this polynomial;
    # lower orders are exact once steps are fine enough for the quadrature error.
    def velocity(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return np.broadcast_to(3 * t[:, None] ** 2, x.shape)

    x0 = np.array([[0.0], [2.5]])
    tol = {"euler": 2e-3, "midpoint": 1e-6, "heun": 1e-6, "rk4": 1e-13, "dopri5": 1e-12}[method]
    forward = integrate(velocity, x0, 0.0, 1.0, method=method, steps=1000 if tol > 1e-9 else 4)
    assert np.allclose(forward.x, x0 + 1.0, atol=tol, rtol=0)
    backward = integrate(velocity, x0 + 1.0, 1.0, 0.0, method=method, steps=1000)
    assert np.allclose(backward.x, x0, atol=tol, rtol=0)


def test_linear_decay_matches_exponential() -> None:
    x0 = np.array([[1.0, -2.0]])
    sol = integrate(lambda x, t: -x, x0, 0.0, 1.0, method="dopri5", rtol=1e-10, atol=1e-10)
    assert np.allclose(sol.x, x0 * math.exp(-1.0), atol=1e-9, rtol=0)
    assert sol.steps is not None and sol.steps.shape == (1,) and sol.nfe > 0
    sol = integrate(lambda x, t: -x, x0, 0.0, 1.0, method="rk4", steps=100)
    assert np.allclose(sol.x, x0 * math.exp(-1.0), atol=1e-9, rtol=0)
    assert sol.nfe == 400 and sol.steps is None


def _decay(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return -x * np.cos(t[:, None])  # x(t) = x(0) exp(-sin t)


@pytest.mark.parametrize(
    ("method", "order"), [("euler", 1), ("midpoint", 2), ("heun", 2), ("rk4", 4)]
)
def test_fixed_step_convergence_order(method: str, order: int) -> None:
    # Error ratio when steps double, integrating backwards (negative h): exactly 2^order on a
    # generic field; at least that on the Gaussian flow (midpoint happens to be 3rd order there).
    z = _noise(16)
    cases = [
        (_decay, 2.0, z * math.exp(math.sin(2.0)), True),
        (GAUSS.linear_velocity, 1.0, GAUSS.map_noise(z), False),
    ]
    for field_, t0, exact, tight in cases:
        errors = [
            np.abs(integrate(field_, z, t0, 0.0, method=method, steps=n).x - exact).max()
            for n in (32, 64)
        ]
        ratio = errors[0] / errors[1]
        assert 0.8 * 2**order < ratio, (field_, errors, ratio)
        assert ratio < 1.25 * 2**order or not tight, (field_, errors, ratio)


def test_dopri5_matches_exact_flow_map() -> None:
    z = _noise(64)
    sol = integrate(GAUSS.linear_velocity, z, 1.0, 0.0, method="dopri5", rtol=1e-9, atol=1e-9)
    assert np.abs(sol.x - GAUSS.map_noise(z)).max() < 1e-7
    assert sol.steps.dtype == np.int64 and sol.steps.min() >= 1


def _stiffish(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    # Rows with large |x| oscillate fast and need many more steps than small ones.
    return np.cos(x * x + 3.0 * t[:, None]) * x[:, ::-1] - 0.5 * x


def test_dopri5_rows_are_batch_independent() -> None:
    batch = np.array([[0.1, -0.2], [6.0, -5.0], [1e-3, 2.0], [3.0, 3.0]])
    together = integrate(_stiffish, batch, 0.0, 1.0, method="dopri5", rtol=1e-7, atol=1e-9)
    assert len(set(together.steps.tolist())) > 1  # rows really took different steps
    for i in range(len(batch)):
        alone = integrate(
            _stiffish, batch[i : i + 1], 0.0, 1.0, method="dopri5", rtol=1e-7, atol=1e-9
        )
        assert np.abs(alone.x[0] - together.x[i]).max() <= 1e-12
        assert alone.steps[0] == together.steps[i]
        assert alone.nfe <= together.nfe


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_numpy_and_torch_give_the_same_numbers(method: str) -> None:
    z = _noise(8)
    a = integrate(GAUSS.linear_velocity, z, 1.0, 0.0, method=method, steps=20)
    b = integrate(GAUSS.linear_velocity, torch.from_numpy(z), 1.0, 0.0, method=method, steps=20)
    assert isinstance(b.x, torch.Tensor) and b.x.dtype == torch.float64
    assert np.abs(a.x - b.x.numpy()).max() < 1e-12
    assert a.nfe == b.nfe
    if method == "dopri5":
        assert np.array_equal(a.steps, b.steps)


def test_trajectory_matches_integrate_and_records_every_time() -> None:
    z = _noise(5)
    times = np.linspace(1.0, 0.0, 11)
    traj = trajectory(GAUSS.linear_velocity, z, times, method="heun")
    assert traj.states.shape == (11, 5, GAUSS.dim)
    assert np.array_equal(traj.states[0], z)
    assert np.array_equal(
        traj.states[-1], integrate(GAUSS.linear_velocity, z, 1.0, 0.0, method="heun", steps=10).x
    )
    assert traj.nfe == 20 and traj.steps is None
    adaptive = trajectory(
        GAUSS.linear_velocity,
        torch.from_numpy(z),
        times[::5],
        method="dopri5",
        rtol=1e-9,
        atol=1e-9,
    )
    assert adaptive.states.shape == (3, 5, GAUSS.dim) and adaptive.steps.shape == (5,)
    assert np.abs(adaptive.states[-1].numpy() - GAUSS.map_noise(z)).max() < 1e-7


def test_bad_arguments_raise_clear_errors() -> None:
    z = _noise(2)
    with pytest.raises(ValueError, match="choose one of euler, heun, midpoint, rk4, dopri5"):
        integrate(GAUSS.linear_velocity, z, 1.0, 0.0, method="rk45")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        integrate(GAUSS.linear_velocity, z, 1.0, 0.0, method="euler", steps=0)
    with pytest.raises(RuntimeError, match="max_steps=3"):
        integrate(_stiffish, z * 10, 0.0, 1.0, method="dopri5", max_steps=3)
    with pytest.raises(ValueError, match="strictly"):
        trajectory(GAUSS.linear_velocity, z, [1.0, 0.5, 0.7])


def test_empty_interval_is_the_identity() -> None:
    z = _noise(3)
    sol = integrate(GAUSS.linear_velocity, z, 0.5, 0.5, method="dopri5")
    assert sol.x is z and sol.nfe == 0


def test_service_modules_import_and_run_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import numpy as np\n"
        "import numerics.likelihood, numerics.samplers, numerics.schedules\n"
        "import numerics.solvers as s\n"
        "r = s.integrate(lambda x, t: -x, np.ones((2, 2)), 0.0, 1.0, method='dopri5')\n"
        "assert abs(r.x[0, 0] - np.exp(-1)) < 1e-4\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
