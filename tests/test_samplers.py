"""numerics.schedules and numerics.samplers against the closed-form Gaussian diffusion."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from test_solvers import GAUSS

from numerics.samplers import ddim_sample, ddpm_sample, dpmpp_2m_sample, time_grid
from numerics.schedules import (
    CosineSchedule,
    eps_to_score,
    eps_to_v,
    eps_to_x0,
    make_schedule,
    pf_ode_divergence,
    pf_ode_jvp,
    pf_ode_velocity,
    score_to_eps,
    v_to_eps,
    x0_to_eps,
)
from numerics.solvers import integrate

NAMES = ["linear", "cosine"]
T = np.linspace(0.0, 1.0, 41)[1:]


# --- schedules ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_schedule_is_variance_preserving_and_monotone(name: str) -> None:
    s = make_schedule(name)
    assert np.allclose(s.alpha(T) ** 2 + s.sigma(T) ** 2, 1.0, atol=1e-14)
    assert s.alpha(0.0) == 1.0 and s.sigma(0.0) == 0.0
    assert np.all(np.diff(s.log_snr(T)) < 0) and 0 < s.alpha(1.0) < 0.01
    assert np.all(s.beta(T) > 0)


@pytest.mark.parametrize("name", NAMES)
def test_beta_is_minus_the_derivative_of_log_alpha2(name: str) -> None:
    s, h = make_schedule(name), 1e-6
    fd = -(s.log_alpha2(T + h) - s.log_alpha2(T - h)) / (2 * h)
    assert np.allclose(fd, s.beta(T), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_log_snr_inverse(name: str) -> None:
    s = make_schedule(name)
    assert np.abs(s.t_from_log_snr(s.log_snr(T)) - T).max() < 1e-10
    t = torch.from_numpy(T)
    assert np.abs(s.t_from_log_snr(s.log_snr(t)).numpy() - T).max() < 1e-10


def test_cosine_schedule_is_nichol_dhariwal_before_the_clip() -> None:
    s = CosineSchedule()
    t = T[T < s.t_clip]
    f = lambda u: np.cos(0.5 * np.pi * (u + s.s) / (1 + s.s)) ** 2  # noqa: E731
    assert np.allclose(s.alpha(t) ** 2, f(t) / f(0.0), rtol=1e-12)
    assert 0.98 < s.t_clip < 1.0 and np.isclose(s.beta(1.0), s.max_beta)
    assert np.all(s.beta(T) <= s.max_beta + 1e-9)


def test_linear_schedule_closed_forms() -> None:
    s = make_schedule("linear", beta_min=0.1, beta_max=20.0)
    assert np.isclose(s.log_alpha2(1.0), -10.05) and np.isclose(s.beta(0.5), 10.05)
    with pytest.raises(ValueError, match="choose one of linear, cosine"):
        make_schedule("sigmoid")


@pytest.mark.parametrize("name", NAMES)
def test_parameterization_conversions_round_trip(name: str) -> None:
    s, rng = make_schedule(name), np.random.default_rng(0)
    t = rng.uniform(0.01, 0.99, 16)
    alpha, sigma = s.alpha(t)[:, None], s.sigma(t)[:, None]
    x0, eps = rng.standard_normal((16, 3)), rng.standard_normal((16, 3))
    x = alpha * x0 + sigma * eps
    assert np.allclose(score_to_eps(eps_to_score(eps, sigma), sigma), eps)
    assert np.allclose(eps_to_x0(x, eps, alpha, sigma), x0)
    assert np.allclose(x0_to_eps(x, x0, alpha, sigma), eps)
    v = eps_to_v(x, eps, alpha, sigma)
    assert np.allclose(v, alpha * eps - sigma * x0)
    assert np.allclose(v_to_eps(x, v, alpha, sigma), eps)


@pytest.mark.parametrize("name", NAMES)
def test_pf_ode_velocity_divergence_and_jvp_match_closed_form(name: str) -> None:
    s, rng = make_schedule(name), np.random.default_rng(1)
    t = rng.uniform(0.01, 0.99, 16)
    x, e = rng.standard_normal((16, 3)) + GAUSS.mu, rng.standard_normal((16, 3))
    v_ref, div_ref = GAUSS.vp_velocity_div(x, t, s)
    assert np.allclose(pf_ode_velocity(x, GAUSS.vp_eps(x, t, s), t, s), v_ref)
    var = GAUSS.vp_marginal(t, s, x)[1]
    div_eps = s.sigma(t) * (1.0 / var).sum(-1)  # d eps / dx = sigma C_t^{-1}
    assert np.allclose(pf_ode_divergence(div_eps, t, 3, s), div_ref)
    jvp_eps = s.sigma(t)[:, None] * GAUSS.from_eig((e @ GAUSS.U) / var)
    assert np.allclose(pf_ode_jvp(e, jvp_eps, t, s), GAUSS.vp_velocity_jvp(x, t, e, s)[1])


# --- samplers -------------------------------------------------------------------------------


def _eps(schedule: object):  # noqa: ANN202
    return partial(GAUSS.vp_eps, schedule=schedule)


def _z(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, GAUSS.dim))


def _pf_ode_sample(schedule: object, z: np.ndarray, t_min: float = 1e-3) -> np.ndarray:
    eps = _eps(schedule)
    field = lambda x, t: pf_ode_velocity(x, eps(x, t), t, schedule)  # noqa: E731
    return integrate(field, z, 1.0, t_min, method="rk4", steps=400).x


@pytest.mark.parametrize("name", NAMES)
def test_ddim_and_dpmpp_converge_to_the_pf_ode(name: str) -> None:
    s, z = make_schedule(name), _z(200)
    ref = _pf_ode_sample(s, z)
    ddim = [np.abs(ddim_sample(_eps(s), z, s, n)[0] - ref).max() for n in (10, 20, 40, 160)]
    assert all(1.7 < a / b < 2.3 for a, b in zip(ddim[:2], ddim[1:3], strict=True))  # 1st order
    assert ddim[-1] < 0.05
    dpm = [np.abs(dpmpp_2m_sample(_eps(s), z, s, n)[0] - ref).max() for n in (20, 40, 80)]
    assert all(a / b > 3.0 for a, b in zip(dpm[:-1], dpm[1:], strict=True))  # 2nd order
    assert dpm[-1] < 5e-3


def _assert_moments(x: np.ndarray, mean_tol: float, cov_tol: float) -> None:
    assert np.abs(x.mean(0) - GAUSS.mu).max() < mean_tol
    assert np.abs(np.cov(x.T) - GAUSS.cov).max() < cov_tol


@pytest.mark.parametrize("name", NAMES)
def test_samples_have_the_data_moments(name: str) -> None:
    s, z = make_schedule(name), _z(20_000)
    x, nfe = ddpm_sample(_eps(s), z, s, 200, np.random.default_rng(1))
    _assert_moments(x, 0.04, 0.1)
    assert nfe == 200
    x, nfe = ddim_sample(_eps(s), z, s, 100)
    _assert_moments(x, 0.03, 0.08)
    x, nfe = dpmpp_2m_sample(_eps(s), z, s, 20)
    _assert_moments(x, 0.03, 0.05)
    assert nfe == 20


def test_ddpm_is_ddim_with_eta_one() -> None:
    s, z = make_schedule("linear"), _z(64)
    a, _ = ddpm_sample(_eps(s), z, s, 30, np.random.default_rng(5))
    b, _ = ddim_sample(_eps(s), z, s, 30, eta=1.0, noise=np.random.default_rng(5))
    assert np.abs(a - b).max() < 1e-10


def test_stochastic_samplers_are_reproducible_from_a_seed() -> None:
    s, z = make_schedule("cosine"), _z(32)
    run = partial(ddpm_sample, _eps(s), z, s, 10)
    assert np.array_equal(run(np.random.default_rng(3))[0], run(np.random.default_rng(3))[0])
    assert not np.array_equal(run(np.random.default_rng(3))[0], run(np.random.default_rng(4))[0])
    zt = torch.from_numpy(z)
    t_run = partial(ddim_sample, _eps(s), zt, s, 10, 0.5)
    a = t_run(noise=torch.Generator().manual_seed(3))[0]
    assert isinstance(a, torch.Tensor) and a.dtype == torch.float64
    assert torch.equal(a, t_run(noise=torch.Generator().manual_seed(3))[0])
    rng = np.random.default_rng(9)
    c = ddim_sample(_eps(s), z, s, 10, 0.5, noise=lambda shape: rng.standard_normal(shape))[0]
    assert np.array_equal(
        c, ddim_sample(_eps(s), z, s, 10, 0.5, noise=np.random.default_rng(9))[0]
    )


@pytest.mark.parametrize("sampler", [ddim_sample, dpmpp_2m_sample])
def test_numpy_and_torch_samples_agree(sampler: object) -> None:
    s, z = make_schedule("linear"), _z(16)
    a = sampler(_eps(s), z, s, 15)[0]
    b = sampler(_eps(s), torch.from_numpy(z), s, 15)[0]
    assert isinstance(b, torch.Tensor) and np.abs(a - b.numpy()).max() < 1e-12


def test_time_grids_and_argument_errors() -> None:
    s = make_schedule("linear")
    for spacing in ("time", "logsnr"):
        grid = time_grid(s, 12, 1e-3, spacing)
        assert grid.shape == (13,) and grid[0] == 1.0 and grid[-1] == 1e-3
        assert np.all(np.diff(grid) < 0)
    lam = s.log_snr(time_grid(s, 12, 1e-3, "logsnr"))
    assert np.allclose(np.diff(lam), np.diff(lam)[0])
    z = _z(2)
    with pytest.raises(ValueError, match="needs noise"):
        ddim_sample(_eps(s), z, s, 5, eta=1.0)
    with pytest.raises(TypeError, match="noise must be"):
        ddpm_sample(_eps(s), z, s, 5, noise=42)
    with pytest.raises(ValueError, match="t_min"):
        dpmpp_2m_sample(_eps(s), z, s, 5, t_min=0.0)
    with pytest.raises(ValueError, match="spacing"):
        dpmpp_2m_sample(_eps(s), z, s, 5, spacing="karras")
    assert math.isfinite(float(s.log_snr(1.0)))
