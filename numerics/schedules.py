"""VP-SDE noise schedules, the conversions between diffusion model parameterizations, and
EDM's preconditioning, sigma steps and probability-flow ODE (``x_sigma = x_0 + sigma n``).

Variance-preserving SDE (Song et al. 2021, "Score-Based Generative Modeling through SDEs",
eq. 11): ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW``, with marginals
``x_t = alpha(t) x_0 + sigma(t) eps``, ``alpha(t)^2 = exp(-int_0^t beta)``,
``sigma(t)^2 = 1 - alpha(t)^2``; ``t = 0`` is data and ``t = 1`` is (nearly) pure noise.

Every function is plain array arithmetic on numpy arrays or torch tensors (see
:func:`numerics.solvers.array_namespace`); times ``t`` are ``(batch,)`` arrays (a Python float
is accepted and treated as numpy). ``alpha``/``sigma`` arguments of the conversions are
anything that broadcasts against ``x: (batch, dim)``, typically ``(batch, 1)``.

Example:
    >>> import numpy as np
    >>> s = make_schedule("linear")
    >>> t = np.array([0.25, 0.5])
    >>> bool(np.allclose(s.alpha(t) ** 2 + s.sigma(t) ** 2, 1.0))
    True
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from numerics.arrays import Array, array_namespace

__all__ = [
    "SCHEDULES",
    "CosineSchedule",
    "EDMPreconditioning",
    "LinearSchedule",
    "VPSchedule",
    "edm_divergence",
    "edm_jvp",
    "edm_velocity",
    "eps_to_score",
    "eps_to_v",
    "eps_to_x0",
    "make_schedule",
    "pf_ode_divergence",
    "pf_ode_eps",
    "pf_ode_jvp",
    "pf_ode_velocity",
    "rho_grid",
    "score_to_eps",
    "v_to_eps",
    "x0_to_eps",
]


def _softplus(a: Array) -> Array:
    """``log(1 + exp(a))`` without overflow."""
    xp = array_namespace(a)
    return a.clip(min=0.0) + xp.log1p(xp.exp(-xp.abs(a)))


class VPSchedule:
    """Shared derived quantities of a VP schedule; subclasses define ``log_alpha2``,
    ``beta`` and ``t_from_log_snr``."""

    def log_alpha2(self, t: Array) -> Array:
        """``log alpha(t)^2 = -int_0^t beta(s) ds``, ``(batch,) -> (batch,)``."""
        raise NotImplementedError

    def beta(self, t: Array) -> Array:
        """``beta(t) = -d/dt log alpha(t)^2``, ``(batch,) -> (batch,)``."""
        raise NotImplementedError

    def t_from_log_snr(self, log_snr: Array) -> Array:
        """Inverse of :meth:`log_snr`, ``(batch,) -> (batch,)``."""
        raise NotImplementedError

    def alpha(self, t: Array) -> Array:
        """Signal scale ``alpha(t)``, ``(batch,) -> (batch,)``."""
        t = _as_time(t)
        return array_namespace(t).exp(0.5 * self.log_alpha2(t))

    def sigma(self, t: Array) -> Array:
        """Noise scale ``sigma(t) = sqrt(1 - alpha(t)^2)`` (computed with expm1 for small t)."""
        t = _as_time(t)
        xp = array_namespace(t)
        return xp.sqrt(-xp.expm1(self.log_alpha2(t)))

    def log_snr(self, t: Array) -> Array:
        """``lambda(t) = log(alpha^2 / sigma^2)``, decreasing in t (``+inf`` at ``t = 0``)."""
        t = _as_time(t)
        xp = array_namespace(t)
        la2 = self.log_alpha2(t)
        return la2 - xp.log(-xp.expm1(la2))


def _as_time(t: Array) -> Array:
    if isinstance(t, int | float):
        return np.asarray(t, dtype=np.float64)
    return t


@dataclass(frozen=True)
class LinearSchedule(VPSchedule):
    """``beta(t) = beta_min + t (beta_max - beta_min)`` (Song et al. 2021, VP-SDE; the
    continuous limit of DDPM's linear schedule, Ho et al. 2020).

    ``log alpha^2(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2)``; with the defaults
    ``log_snr(1) = -10.05``.
    """

    name: ClassVar[str] = "linear"
    beta_min: float = 0.1
    beta_max: float = 20.0

    def log_alpha2(self, t: Array) -> Array:
        t = _as_time(t)
        return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t)

    def beta(self, t: Array) -> Array:
        t = _as_time(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def t_from_log_snr(self, log_snr: Array) -> Array:
        # alpha^2 = sigmoid(lambda) so u = -log alpha^2 = softplus(-lambda); solve
        # beta_min t + d t^2 / 2 = u with the cancellation-free root 2u / (b + sqrt(b^2 + 2du)).
        log_snr = _as_time(log_snr)
        xp = array_namespace(log_snr)
        u = _softplus(-log_snr)
        d = self.beta_max - self.beta_min
        return 2.0 * u / (self.beta_min + xp.sqrt(self.beta_min**2 + 2.0 * d * u))


@dataclass(frozen=True)
class CosineSchedule(VPSchedule):
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17) in continuous time, with a clipped tail.

    ``alpha(t)^2 = cos^2(phi(t)) / cos^2(phi(0))``, ``phi(t) = pi/2 (t + s) / (1 + s)``, so
    ``beta(t) = -d/dt log alpha^2 = pi / (1 + s) tan(phi(t))``, which diverges as
    ``2 / (1 - t)`` at ``t = 1`` (where ``alpha = 0`` and DDIM/DPM-Solver would divide by
    zero). We clip it: ``beta(t) = min(pi / (1 + s) tan(phi(t)), max_beta)``, and define
    ``alpha`` from the clipped beta so that ``beta = -d/dt log alpha^2`` holds everywhere: the
    schedule is the cosine one up to ``t_clip`` (where the analytic beta reaches
    ``max_beta``, ``1 - t_clip ~ 2 / max_beta``) and has constant beta after it. The default
    ``max_beta = 200`` clips the last 1% of time and gives ``log_snr(1) = -10.3``, close to
    the linear schedule's ``-10.05``. This plays the role of Nichol & Dhariwal's discrete
    clip ``beta_t <= 0.999``.
    """

    name: ClassVar[str] = "cosine"
    s: float = 0.008
    max_beta: float = 200.0

    @property
    def _phi_clip(self) -> float:
        return math.atan(self.max_beta * (1.0 + self.s) / math.pi)

    @property
    def t_clip(self) -> float:
        """Time after which beta is constant (``max_beta``)."""
        return self._phi_clip * (1.0 + self.s) / (0.5 * math.pi) - self.s

    def _phi(self, t: Array) -> Array:
        return (0.5 * math.pi / (1.0 + self.s)) * (t + self.s)

    @property
    def _log_cos2_phi0(self) -> float:
        return 2.0 * math.log(math.cos(0.5 * math.pi * self.s / (1.0 + self.s)))

    def log_alpha2(self, t: Array) -> Array:
        t = _as_time(t)
        xp = array_namespace(t)
        phi = self._phi(t).clip(max=self._phi_clip)
        tail = (t - self.t_clip).clip(min=0.0)
        return 2.0 * xp.log(xp.cos(phi)) - self._log_cos2_phi0 - self.max_beta * tail

    def beta(self, t: Array) -> Array:
        t = _as_time(t)
        xp = array_namespace(t)
        return (math.pi / (1.0 + self.s)) * xp.tan(self._phi(t).clip(max=self._phi_clip))

    def t_from_log_snr(self, log_snr: Array) -> Array:
        log_snr = _as_time(log_snr)
        xp = array_namespace(log_snr)
        log_alpha2 = -_softplus(-log_snr)
        # Cosine part: cos(phi) = alpha cos(phi(0)); cos(phi) <= cos(phi0) keeps acos defined.
        cos_phi = xp.exp(0.5 * (log_alpha2 + self._log_cos2_phi0)).clip(max=1.0)
        t_cos = xp.arccos(cos_phi) * (1.0 + self.s) / (0.5 * math.pi) - self.s
        # Tail: log alpha^2 falls linearly at rate max_beta after t_clip.
        la2_clip = 2.0 * math.log(math.cos(self._phi_clip)) - self._log_cos2_phi0
        t_tail = self.t_clip + (la2_clip - log_alpha2) / self.max_beta
        return xp.where(log_alpha2 >= la2_clip, t_cos, t_tail)


SCHEDULES: dict[str, type[VPSchedule]] = {"linear": LinearSchedule, "cosine": CosineSchedule}


def make_schedule(name: str, **params: float | None) -> VPSchedule:
    """Build a schedule by name: ``"linear"`` (``beta_min``, ``beta_max``) or ``"cosine"``
    (``s``, ``max_beta``). Parameters the schedule does not take, and ``None`` values, are
    ignored, so a config or manifest can pass every field it has."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    taken = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in params.items() if k in taken and v is not None})


# --- parameterization conversions, for x_t = alpha x0 + sigma eps ----------------------------


def eps_to_score(eps: Array, sigma: Array) -> Array:
    """Score ``grad log p_t(x) = -eps / sigma`` (Song et al. 2021, denoising score matching)."""
    return -eps / sigma


def score_to_eps(score: Array, sigma: Array) -> Array:
    """Inverse of :func:`eps_to_score`: ``eps = -sigma * score``."""
    return -sigma * score


def eps_to_x0(x: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """Data prediction ``x0 = (x - sigma eps) / alpha`` (Ho et al. 2020, eq. 15)."""
    return (x - sigma * eps) / alpha


def x0_to_eps(x: Array, x0: Array, alpha: Array, sigma: Array) -> Array:
    """Inverse of :func:`eps_to_x0`: ``eps = (x - alpha x0) / sigma``."""
    return (x - alpha * x0) / sigma


def v_to_eps(x: Array, v_pred: Array, alpha: Array, sigma: Array) -> Array:
    """``eps = sigma x + alpha v`` for v-prediction ``v = alpha eps - sigma x0`` (Salimans &
    Ho 2022, "Progressive Distillation", sec. 4); assumes ``alpha^2 + sigma^2 = 1`` (VP)."""
    return sigma * x + alpha * v_pred


def eps_to_v(x: Array, eps: Array, alpha: Array, sigma: Array) -> Array:
    """``v = alpha eps - sigma x0`` with ``x0`` from :func:`eps_to_x0`."""
    return alpha * eps - sigma * eps_to_x0(x, eps, alpha, sigma)


# --- probability-flow ODE (Song et al. 2021, eq. 13) for the VP-SDE --------------------------


def pf_ode_velocity(x: Array, eps: Array, t: Array, schedule: VPSchedule) -> Array:
    """``dx/dt = f(x, t) - 1/2 g(t)^2 score = -1/2 beta x + 1/2 beta eps / sigma``.

    Args:
        x: ``(batch, dim)``; eps: predicted noise ``(batch, dim)``; t: ``(batch,)``, t > 0
            wherever ``sigma(t) = 0`` would divide by zero.
    Returns:
        ``(batch, dim)``.
    """
    beta = schedule.beta(t)[:, None]
    return -0.5 * beta * x + (0.5 * beta / schedule.sigma(t)[:, None]) * eps


def pf_ode_eps(x: Array, velocity: Array, t: Array, schedule: VPSchedule) -> Array:
    """The eps prediction behind a PF-ODE velocity: :func:`pf_ode_velocity` solved for
    ``eps`` (an affine map), ``eps = (v + 1/2 beta x) 2 sigma / beta``; all ``(batch, dim)``
    but ``t: (batch,)``."""
    beta, sigma = schedule.beta(t)[:, None], schedule.sigma(t)[:, None]
    return (velocity + 0.5 * beta * x) * 2.0 * sigma / beta


def pf_ode_divergence(div_eps: Array, t: Array, dim: int, schedule: VPSchedule) -> Array:
    """Divergence of :func:`pf_ode_velocity`: ``-1/2 beta D + 1/2 beta / sigma * div eps``.

    Args:
        div_eps: ``(batch,)`` trace of the Jacobian of the eps model; t: ``(batch,)``;
            dim: data dimension ``D``.
    """
    beta = schedule.beta(t)
    return -0.5 * beta * dim + (0.5 * beta / schedule.sigma(t)) * div_eps


def pf_ode_jvp(e: Array, jvp_eps: Array, t: Array, schedule: VPSchedule) -> Array:
    """Jacobian-vector product of :func:`pf_ode_velocity` with ``e``:
    ``-1/2 beta e + 1/2 beta / sigma * (J_eps e)``; all ``(batch, dim)``, t ``(batch,)``."""
    beta = schedule.beta(t)[:, None]
    return -0.5 * beta * e + (0.5 * beta / schedule.sigma(t)[:, None]) * jvp_eps


# --- EDM (Karras, Aittala, Aila & Laine 2022, "Elucidating the design space of diffusion-based
# generative models"): x_sigma = x_0 + sigma n, time t = sigma ---------------------------------


@dataclass(frozen=True)
class EDMPreconditioning:
    """The preconditioning of EDM's denoiser (Karras et al. 2022, table 1, "ours")::

        D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma))

    with ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)`` (``sd``: ``sigma_data``, the data's standard deviation)
    and the loss weight ``lambda = 1 / c_out^2``. The paper's ``c_noise = 1/4 ln sigma`` is
    mapped affinely onto ``[0, 1]`` between ``sigma_min`` and ``sigma_max``: the same
    conditioning up to an affine map, in the interval the networks' Fourier time features
    tell apart. Every method takes ``sigma: (batch,)`` and returns ``(batch,)``.

    Example:
        >>> import numpy as np
        >>> p = EDMPreconditioning(sigma_data=0.5)
        >>> s = np.array([0.1, 1.0, 10.0])
        >>> bool(np.allclose(p.c_out(s) ** 2 * p.loss_weight(s), 1.0))
        True
    """

    sigma_data: float = 1.0
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def c_skip(self, sigma: Array) -> Array:
        sd2 = self.sigma_data**2
        return sd2 / (sigma * sigma + sd2)

    def c_out(self, sigma: Array) -> Array:
        xp = array_namespace(sigma)
        return sigma * self.sigma_data / xp.sqrt(sigma * sigma + self.sigma_data**2)

    def c_in(self, sigma: Array) -> Array:
        xp = array_namespace(sigma)
        return 1.0 / xp.sqrt(sigma * sigma + self.sigma_data**2)

    def c_noise(self, sigma: Array) -> Array:
        xp = array_namespace(sigma)
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return (xp.log(sigma) - lo) / (hi - lo)

    def loss_weight(self, sigma: Array) -> Array:
        """``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 = 1 / c_out^2``."""
        return (sigma * sigma + self.sigma_data**2) / (sigma * self.sigma_data) ** 2


def rho_grid(t0: float, t1: float, steps: int, rho: float) -> np.ndarray:
    """``(steps + 1,)`` times from ``t0`` to ``t1`` (either direction), uniform in
    ``t^(1/rho)``: EDM's time steps (Karras et al. 2022, eq. 5) ``t_i = (t0^(1/rho) + i /
    steps (t1^(1/rho) - t0^(1/rho)))^rho``. With ``rho = 7`` from ``sigma_max`` down to
    ``sigma_min`` the steps shorten near the data, where the trajectories bend. The ends are
    exactly ``t0`` and ``t1``; both must be positive.

    Example:
        >>> g = rho_grid(80.0, 0.002, 4, 7.0)
        >>> float(g[0]), float(g[-1]), bool((g[1:] < g[:-1]).all())
        (80.0, 0.002, True)
    """
    if not (t0 > 0 and t1 > 0):
        raise ValueError(f"a rho grid needs positive ends, got {t0!r} and {t1!r}")
    a, b = t0 ** (1.0 / rho), t1 ** (1.0 / rho)
    grid = (a + np.linspace(0.0, 1.0, steps + 1) * (b - a)) ** rho
    grid[0], grid[-1] = t0, t1
    return grid


def edm_velocity(x: Array, denoised: Array, sigma: Array) -> Array:
    """EDM's probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` (Karras et al.
    2022, eq. 3 with ``sigma(t) = t``, ``s(t) = 1``): ``x, denoised: (batch, dim)``,
    ``sigma: (batch,)``."""
    return (x - denoised) / sigma[:, None]


def edm_divergence(div_denoised: Array, sigma: Array, dim: int) -> Array:
    """Divergence of :func:`edm_velocity`: ``(dim - tr J_D) / sigma``, ``(batch,)``."""
    return (dim - div_denoised) / sigma


def edm_jvp(e: Array, jvp_denoised: Array, sigma: Array) -> Array:
    """Jacobian-vector product of :func:`edm_velocity`: ``(e - J_D e) / sigma``."""
    return (e - jvp_denoised) / sigma[:, None]
