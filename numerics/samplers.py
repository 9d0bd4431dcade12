"""Diffusion samplers over an epsilon callable, for numpy arrays and torch tensors.

Every sampler takes ``eps_fn(x: (batch, dim), t: (batch,)) -> eps: (batch, dim)`` (a
v-prediction model is wrapped with :func:`numerics.schedules.v_to_eps`), noise ``z: (batch,
dim)`` at ``t = 1`` and a :class:`numerics.schedules.VPSchedule`, walks a time grid from
``1`` down to ``t_min`` and returns ``(x, nfe)``: a sample of ``p_{t_min}`` (no extra
denoising jump at the end, so every sampler and the probability-flow ODE solved by
:func:`numerics.solvers.integrate` target the same distribution) and the number of
``eps_fn`` calls.

Randomness is an argument: ``noise`` is a ``numpy.random.Generator``, a ``torch.Generator``
or a callable ``shape -> standard normal array``; the same seed gives the same samples.

Example:
    >>> import numpy as np
    >>> from numerics.schedules import make_schedule
    >>> z = np.random.default_rng(0).standard_normal((5, 2))
    >>> x, nfe = ddim_sample(lambda x, t: 0.0 * x, z, make_schedule("linear"), steps=10)
    >>> x.shape, nfe
    ((5, 2), 10)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from numerics.arrays import Array, array_namespace, asarray_like, no_grad
from numerics.schedules import VPSchedule, eps_to_x0, rho_grid
from numerics.solvers import Velocity, integrate

__all__ = [
    "DEFAULT_T_MIN",
    "EDM_SAMPLERS",
    "SAMPLERS",
    "EpsFn",
    "NoiseSource",
    "ddim_sample",
    "ddpm_sample",
    "diffusion_sample",
    "dpmpp_2m_sample",
    "edm_stochastic_sample",
    "noise_fn",
    "time_grid",
]

EpsFn = Callable[[Array, Array], Array]
"""``eps_fn(x: (batch, dim), t: (batch,)) -> (batch, dim)``."""
NoiseSource = Any
"""``numpy.random.Generator``, ``torch.Generator`` or ``Callable[[tuple[int, ...]], Array]``."""

SAMPLERS: tuple[str, ...] = ("ddpm", "ddim", "dpmpp2m")
"""The diffusion samplers by name: ancestral DDPM, DDIM, DPM-Solver++(2M)."""
EDM_SAMPLERS: tuple[str, ...] = ("edm_stochastic",)
"""EDM's stochastic sampler (Karras et al. 2022, algorithm 2) over a velocity in sigma."""
DEFAULT_T_MIN = 1e-3
"""Where sampling stops (Song et al. 2021 sample to ``t = 1e-3``)."""


def noise_fn(noise: NoiseSource, like: Array) -> Callable[[tuple[int, ...]], Array]:
    """A ``shape -> standard normal array`` function whose output matches ``like``'s array
    type, dtype and device. A ``torch.Generator`` draws in float64 on its own device."""
    if isinstance(noise, np.random.Generator):
        return lambda shape: asarray_like(noise.standard_normal(shape), like)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(noise, torch.Generator):
        return lambda shape: asarray_like(
            torch.randn(shape, generator=noise, dtype=torch.float64, device=noise.device), like
        )
    if callable(noise):
        return lambda shape: asarray_like(noise(shape), like)
    raise TypeError(
        "noise must be a numpy.random.Generator, a torch.Generator or a callable "
        f"shape -> array, got {type(noise).__name__}"
    )


def time_grid(
    schedule: VPSchedule, steps: int, t_min: float = DEFAULT_T_MIN, spacing: str = "time"
) -> np.ndarray:
    """``(steps + 1,)`` decreasing times from ``1`` to ``t_min``.

    ``spacing="time"``: uniform in t. ``spacing="logsnr"``: uniform in
    ``lambda = log(alpha^2/sigma^2)`` (Lu et al. 2022, DPM-Solver), which spends
    more steps near the data where the trajectories bend.
    """
    if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 < t_min < 1.0:
        raise ValueError(f"t_min must lie in (0, 1), got {t_min!r}")
    if spacing == "time":
        return np.linspace(1.0, t_min, steps + 1)
    if spacing == "logsnr":
        ends = schedule.log_snr(np.array([1.0, t_min]))
        grid = np.asarray(schedule.t_from_log_snr(np.linspace(ends[0], ends[1], steps + 1)))
        grid[0], grid[-1] = 1.0, t_min
        return grid
    raise ValueError(f"unknown spacing {spacing!r}; choose 'time' or 'logsnr'")


class _Step(NamedTuple):
    """Coefficients of one step from ``t`` down to ``s``; all rows share them, so they are
    ``(1, 1)`` columns that broadcast over ``(batch, dim)``."""

    t: Array  # (batch,) the time of every row, for eps_fn
    alpha_t: Array
    sigma_t: Array
    alpha_s: Array
    sigma_s: Array
    var_ts: Array  # sigma_{t|s}^2 = 1 - alpha_t^2 / alpha_s^2, via expm1
    h: Array  # log(alpha_s / sigma_s) - log(alpha_t / sigma_t) = half the log-SNR increase


def _steps(schedule: VPSchedule, z: Array, grid: np.ndarray) -> list[_Step]:
    xp = array_namespace(z)
    one, rows = xp.zeros_like(z[:1, 0]), xp.zeros_like(z[:, 0])
    steps = []
    for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
        t, s = one + float(t_now), one + float(t_next)
        values = (
            schedule.alpha(t),
            schedule.sigma(t),
            schedule.alpha(s),
            schedule.sigma(s),
            -xp.expm1(schedule.log_alpha2(t) - schedule.log_alpha2(s)),
            0.5 * (schedule.log_snr(s) - schedule.log_snr(t)),
        )
        steps.append(_Step(rows + float(t_now), *(v[:, None] for v in values)))
    return steps


def ddpm_sample(
    eps_fn: EpsFn,
    z: Array,
    schedule: VPSchedule,
    steps: int,
    noise: NoiseSource,
    t_min: float = DEFAULT_T_MIN,
) -> tuple[Array, int]:
    """Ancestral sampling from the posterior ``q(x_s | x_t, x0_hat)`` (Ho et al. 2020, eqs.
    6-7, written in continuous time as in Kingma et al. 2021, "Variational Diffusion Models").

    For ``s < t`` with ``alpha_{t|s} = alpha_t / alpha_s``, ``sigma_{t|s}^2 = 1 -
    alpha_{t|s}^2``: mean ``alpha_{t|s} sigma_s^2 / sigma_t^2 x_t + alpha_s sigma_{t|s}^2 /
    sigma_t^2 x0_hat``, variance ``sigma_{t|s}^2 sigma_s^2 / sigma_t^2``. The grid is uniform
    in time. Equals :func:`ddim_sample` with ``eta = 1`` and the same noise.

    Args:
        eps_fn: ``(x: (batch, dim), t: (batch,)) -> (batch, dim)``.
        z: ``(batch, dim)`` standard normal start at ``t = 1``.
        schedule: the VP schedule the model was trained with.
        steps: number of steps (= NFE).
        noise: generator or ``shape -> array`` (see :func:`noise_fn`).
        t_min: final time.

    Returns:
        ``(x: (batch, dim), nfe)``.
    """
    draw = noise_fn(noise, z)
    xp = array_namespace(z)
    x = z
    with no_grad(z):
        for c in _steps(schedule, z, time_grid(schedule, steps, t_min)):
            x0 = eps_to_x0(x, eps_fn(x, c.t), c.alpha_t, c.sigma_t)
            ratio = c.sigma_s**2 / c.sigma_t**2
            mean = (c.alpha_t / c.alpha_s) * ratio * x + c.alpha_s * (c.var_ts / c.sigma_t**2) * x0
            x = mean + xp.sqrt(c.var_ts * ratio) * draw(tuple(x.shape))
    return x, steps


def ddim_sample(
    eps_fn: EpsFn,
    z: Array,
    schedule: VPSchedule,
    steps: int,
    eta: float = 0.0,
    noise: NoiseSource | None = None,
    t_min: float = DEFAULT_T_MIN,
) -> tuple[Array, int]:
    """DDIM (Song, Meng & Ermon 2021, eq. 12), uniform time grid.

    ``x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c noise`` with ``c = eta
    sigma_s / sigma_t sqrt(1 - alpha_t^2 / alpha_s^2)`` (their eq. 16). ``eta = 0`` is
    deterministic: a first-order exponential integrator of the probability-flow ODE (Lu et
    al. 2022), so it converges to the PF-ODE solution as ``steps`` grows; ``eta = 1`` is
    ancestral DDPM.

    Args:
        eps_fn, z, schedule, steps, t_min: as in :func:`ddpm_sample`.
        eta: stochasticity in ``[0, 1]``.
        noise: required when ``eta > 0``.

    Returns:
        ``(x: (batch, dim), nfe)``.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if eta > 0 and noise is None:
        raise ValueError("ddim_sample with eta > 0 needs noise (a generator or a callable)")
    draw = noise_fn(noise, z) if eta > 0 else None
    xp = array_namespace(z)
    x = z
    with no_grad(z):
        for c in _steps(schedule, z, time_grid(schedule, steps, t_min)):
            eps = eps_fn(x, c.t)
            x0 = eps_to_x0(x, eps, c.alpha_t, c.sigma_t)
            if draw is None:
                x = c.alpha_s * x0 + c.sigma_s * eps
                continue
            std = eta * (c.sigma_s / c.sigma_t) * xp.sqrt(c.var_ts)
            direction = xp.sqrt((c.sigma_s**2 - std**2).clip(min=0.0))
            x = c.alpha_s * x0 + direction * eps + std * draw(tuple(x.shape))
    return x, steps


def dpmpp_2m_sample(
    eps_fn: EpsFn,
    z: Array,
    schedule: VPSchedule,
    steps: int,
    t_min: float = DEFAULT_T_MIN,
    spacing: str = "logsnr",
) -> tuple[Array, int]:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2): multistep,
    second-order, data prediction ``x0_hat = (x - sigma eps) / alpha``.

    Lu et al.'s ``lambda`` is ``log(alpha / sigma)``, half of :meth:`VPSchedule.log_snr`.
    With ``h_i = lambda_{t_i} - lambda_{t_{i-1}}`` and ``r_i = h_{i-1} / h_i``:
    ``x_i = sigma_i / sigma_{i-1} x_{i-1} - alpha_i (e^{-h_i} - 1) D_i``, where ``D_1 =
    x0_hat_0`` (first step is first order, DDIM) and ``D_i = (1 + 1/(2 r_i)) x0_hat_{i-1} -
    1/(2 r_i) x0_hat_{i-2}``. One ``eps_fn`` call per step.

    Args:
        eps_fn, z, schedule, steps, t_min: as in :func:`ddpm_sample`.
        spacing: time grid, ``"logsnr"`` (default, uniform in log-SNR, the paper's choice for
            low-dimensional data) or ``"time"`` (see :func:`time_grid`).

    Returns:
        ``(x: (batch, dim), nfe)``.
    """
    xp = array_namespace(z)
    x, x0_prev, h_prev = z, None, None
    with no_grad(z):
        for c in _steps(schedule, z, time_grid(schedule, steps, t_min, spacing)):
            x0 = eps_to_x0(x, eps_fn(x, c.t), c.alpha_t, c.sigma_t)
            if x0_prev is None:
                d = x0
            else:
                half_inv_r = 0.5 * c.h / h_prev
                d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_prev
            x = (c.sigma_s / c.sigma_t) * x - c.alpha_s * xp.expm1(-c.h) * d
            x0_prev, h_prev = x0, c.h
    return x, steps


def diffusion_sample(
    name: str,
    eps_fn: EpsFn,
    z: Array,
    schedule: VPSchedule,
    steps: int,
    noise: NoiseSource | None = None,
    t_min: float = DEFAULT_T_MIN,
    eta: float = 0.0,
) -> tuple[Array, int]:
    """The sampler ``name`` of :data:`SAMPLERS`: ``(x at t_min, number of eps calls)``.

    ``noise`` is required by ``"ddpm"`` and by ``"ddim"`` with ``eta > 0``.
    """
    if name == "ddpm":
        return ddpm_sample(eps_fn, z, schedule, steps, noise, t_min)
    if name == "ddim":
        return ddim_sample(eps_fn, z, schedule, steps, eta, noise, t_min)
    if name == "dpmpp2m":
        return dpmpp_2m_sample(eps_fn, z, schedule, steps, t_min)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def edm_stochastic_sample(
    velocity: Velocity,
    z: Array,
    sigma_max: float,
    sigma_min: float,
    steps: int,
    noise: NoiseSource,
    *,
    rho: float = 7.0,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> tuple[Array, int]:
    """EDM's stochastic sampler (Karras et al. 2022, algorithm 2) on ``x_sigma = x_0 +
    sigma n``, where time is ``sigma``.

    On the sigma steps :func:`numerics.schedules.rho_grid` from ``sigma_max`` to
    ``sigma_min``, each step first adds noise to climb from ``t_i`` to ``t_hat = (1 +
    gamma) t_i``, ``gamma = min(s_churn / steps, sqrt(2) - 1)`` where ``s_tmin <= t_i <=
    s_tmax`` (else 0), ``x_hat = x + sqrt(t_hat^2 - t_i^2) s_noise eps``, then takes one Heun
    step of the probability-flow ODE from ``t_hat`` to ``t_{i+1}`` with
    :func:`numerics.solvers.integrate`. ``s_churn = 0`` is the deterministic Heun sampler
    (algorithm 1) on the same steps. Unlike algorithm 1 the last step ends at ``sigma_min``
    with a Heun step rather than an Euler step to 0: every sampler targets ``p_{sigma_min}``.

    Args:
        velocity: ``dx/dsigma``, ``(x: (batch, dim), sigma: (batch,)) -> (batch, dim)``.
        z: ``(batch, dim)`` the start at ``sigma_max`` (noise of that scale).
        steps: sigma steps; the sampler calls ``velocity`` twice per step.
        noise: generator or ``shape -> array`` (see :func:`noise_fn`); drawn only on the
            steps with ``gamma > 0``, which depend on the grid alone, so the k-th draw is the
            same draw for every row whatever the batch.

    Returns:
        ``(x: (batch, dim), nfe)``.
    """
    draw = noise_fn(noise, z)
    gamma_max = min(s_churn / steps, math.sqrt(2.0) - 1.0)
    x, nfe = z, 0
    with no_grad(z):
        grid = rho_grid(sigma_max, sigma_min, steps, rho)
        for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
            gamma = gamma_max if s_tmin <= t_now <= s_tmax else 0.0
            t_hat = float(t_now) * (1.0 + gamma)
            if gamma > 0:
                x = x + math.sqrt(t_hat**2 - float(t_now) ** 2) * s_noise * draw(tuple(x.shape))
            sol = integrate(velocity, x, t_hat, float(t_next), method="heun", steps=1)
            x, nfe = sol.x, nfe + sol.nfe
    return x, nfe
