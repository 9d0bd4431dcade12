r"""VP-SDE diffusion with epsilon- or v-prediction; family ``"diffusion"``.

Forward process (Song et al., "Score-based generative modeling through SDEs", 2021, eq. 11;
the continuous limit of DDPM, Ho et al. 2020): ``x_t = alpha(t) x_0 + sigma(t) eps`` with
``alpha^2 + sigma^2 = 1``, ``t = 0`` data, ``t = 1`` noise. The network predicts ``eps``
(Ho et al. 2020, eq. 14) or ``v = alpha eps - sigma x_0`` (Salimans & Ho, "Progressive
distillation", 2022, sec. 4). Sampling walks ``1 -> t_min`` with an ancestral / DDIM /
DPM-Solver++ sampler from ``numerics.samplers`` or an ODE solver on the probability-flow ODE
(Song et al. 2021, eq. 13); likelihood integrates the same ODE ``t_min -> 1``.

Schedules, parameterization conversions and the PF-ODE's linear maps all come from
``numerics.schedules``: this module only wires a network to them and propagates tangents
through the (linear) conversions, so the exported ``velocity_div`` / ``velocity_jvp`` graphs
need no autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from artifact.manifest import Defaults, TimeSpec
from numerics import samplers
from numerics.schedules import (
    VPSchedule,
    eps_to_v,
    make_schedule,
    pf_ode_divergence,
    pf_ode_eps,
    pf_ode_jvp,
    pf_ode_velocity,
    v_to_eps,
)
from numerics.solvers import SOLVERS
from training.config import ModelConfig
from training.nets import TimeMLP, VelocityModel, conditioned, given

__all__ = ["DIFFUSION_SAMPLERS", "DiffusionModel", "build_ddpm"]

DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
"""Samplers over the eps model; the ODE solvers ``numerics.solvers.SOLVERS`` also work."""

_DEFAULT_STEPS = {"ddpm": 200, "ddim": 50, "dpmpp2m": 25, "dopri5": None}
_DEFAULT_ODE_STEPS = 100


class DiffusionModel(VelocityModel):
    """A VP-SDE diffusion model around a :class:`training.nets.TimeMLP`.

    Arguments:
        dim: data dimension ``D``.
        net: ``(batch, D), (batch,) -> (batch, D)`` with ``jvp`` and ``divergence``.
        schedule: a ``numerics.schedules.VPSchedule``.
        prediction: ``"epsilon"`` or ``"v"``: what ``net`` is trained to predict.
        t_min: smallest time sampled, trained and integrated (``sigma(t_min) > 0``).

    Example:
        >>> model = build_ddpm(2, ModelConfig(hidden_features=16))
        >>> model.sample(3, steps=5).shape
        torch.Size([3, 2])
    """

    family = "diffusion"
    ode_name = "probability-flow ODE"

    def __init__(
        self,
        dim: int,
        net: TimeMLP,
        schedule: VPSchedule,
        prediction: str = "epsilon",
        t_min: float = 1e-3,
        kind: str = "ddpm",
    ) -> None:
        super().__init__()
        if prediction not in ("epsilon", "v"):
            raise ValueError(f"prediction must be 'epsilon' or 'v', got {prediction!r}")
        self.kind, self.dim, self.t_min = kind, dim, t_min
        self.net, self.schedule, self.prediction = net, schedule, prediction

    def _alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha(t), sigma(t)`` as ``(batch, 1)`` columns."""
        return self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None,
                      context: Tensor | None = None) -> Tensor:
        """Denoising loss ``E |net(x_t, t) - target|^2`` with ``t ~ U(t_min, 1)``.

        ``target = eps`` (Ho et al. 2020, "simple" loss) or ``v = alpha eps - sigma x``
        (Salimans & Ho 2022); mean over batch and dims. ``x: (batch, D)``; all randomness
        comes from ``generator``. A conditional model's network sees each row's ``context``
        (dropped to the null token with probability ``cfg_dropout``).
        """
        u = torch.rand(len(x), generator=generator, dtype=x.dtype, device=x.device)
        t = self.t_min + (1 - self.t_min) * u
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        alpha, sigma = self._alpha_sigma(t)
        x_t = alpha * x + sigma * eps
        target = eps if self.prediction == "epsilon" else eps_to_v(x_t, eps, alpha, sigma)
        out = self.net(x_t, t, *given(self.dropped(context, generator)))
        return (out - target).square().mean()

    def eps(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        """Predicted noise ``(batch, D)`` at ``x: (batch, D)``, ``t: (batch,)``."""
        out = self.net(x, t, *given(context))
        if self.prediction == "epsilon":
            return out
        return v_to_eps(x, out, *self._alpha_sigma(t))

    def _eps_jvp(self, x: Tensor, t: Tensor, e: Tensor,
                 context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(eps, J_eps e)``; ``eps = sigma x + alpha v`` is linear in ``(x, v)``, so its
        tangent is the same map applied to ``(e, J_v e)``."""
        out, tangent = self.net.jvp(x, t, e, *given(context))
        if self.prediction == "epsilon":
            return out, tangent
        alpha, sigma = self._alpha_sigma(t)
        return v_to_eps(x, out, alpha, sigma), v_to_eps(e, tangent, alpha, sigma)

    def _eps_div(self, x: Tensor, t: Tensor,
                 context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(eps, tr J_eps)``: ``tr(sigma I + alpha J_v) = sigma D + alpha div v``, i.e. the
        same linear map applied to the traces ``(D, div v)``."""
        out, div = self.net.divergence(x, t, *given(context))
        if self.prediction == "epsilon":
            return out, div
        alpha, sigma = self._alpha_sigma(t)
        return v_to_eps(x, out, alpha, sigma), v_to_eps(self.dim, div, alpha[:, 0], sigma[:, 0])

    def velocity(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        """Probability-flow ODE ``dx/dt = -beta/2 (x - eps / sigma)``: ``(batch, D)``."""
        return pf_ode_velocity(x, self.eps(x, t, context), t, self.schedule)

    def velocity_div(self, x: Tensor, t: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v, div v)``: ``(batch, D)``, ``(batch,)``; exact, forward-mode."""
        eps, div_eps = self._eps_div(x, t, context)
        velocity = pf_ode_velocity(x, eps, t, self.schedule)
        return velocity, pf_ode_divergence(div_eps, t, self.dim, self.schedule)

    def velocity_jvp(self, x: Tensor, t: Tensor, e: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v, (dv/dx) e)``, both ``(batch, D)``."""
        eps, jvp_eps = self._eps_jvp(x, t, e, context)
        velocity = pf_ode_velocity(x, eps, t, self.schedule)
        return velocity, pf_ode_jvp(e, jvp_eps, t, self.schedule)

    def _field_eps(self, context: Tensor, guidance: float | None,
                   ) -> Callable[[Tensor, Tensor], Tensor]:
        """The noise prediction behind the (guided) conditional field, for the samplers."""
        v = self.field(context, guidance)
        return lambda x, t: pf_ode_eps(x, v(x, t), t, self.schedule)

    def path(self, t: float) -> tuple[float, float, float, float]:
        """VP: ``a = alpha``, ``s = sigma``, ``a' = -beta alpha / 2``, ``s' = beta alpha^2 /
        (2 sigma)`` (from ``alpha^2 + sigma^2 = 1``)."""
        tt = np.array([t])
        a, s = float(self.schedule.alpha(tt)[0]), float(self.schedule.sigma(tt)[0])
        beta = float(self.schedule.beta(tt)[0])
        return a, s, -0.5 * beta * a, 0.5 * beta * a * a / s

    def time_spec(self) -> TimeSpec:
        s = self.schedule
        return TimeSpec(t_min=float(self.t_min), schedule=s.name,
                        beta_min=getattr(s, "beta_min", None),
                        beta_max=getattr(s, "beta_max", None))

    def serving_defaults(self) -> Defaults:
        return Defaults(solver="dpmpp2m", steps=20, method=self.likelihood_method)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        solver: str = "dpmpp2m",
        eta: float = 0.0,
        context: Tensor | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """``(n, D)`` samples of ``p_{t_min}`` from ``z ~ N(0, I)`` at ``t = 1``.

        ``solver``: ``"ddpm"`` (ancestral; noise from ``generator``), ``"ddim"`` (``eta``
        in ``[0, 1]``), ``"dpmpp2m"`` (DPM-Solver++(2M)), or an ODE solver
        (``"euler"``, ``"heun"``, ``"midpoint"``, ``"rk4"``, ``"dopri5"``) on the PF-ODE.
        ``steps`` defaults per solver (200, 50, 25, 100; adaptive for dopri5).
        ``context: (n, C)``/``guidance``: the conditional (guided) field of ``field``.
        """
        if solver not in DIFFUSION_SAMPLERS + SOLVERS:
            choices = ", ".join(DIFFUSION_SAMPLERS + SOLVERS)
            raise ValueError(f"unknown diffusion solver {solver!r}; choose one of {choices}")
        steps = _DEFAULT_STEPS.get(solver, _DEFAULT_ODE_STEPS) if steps is None else steps
        z = self.noise(n, generator)
        if solver in SOLVERS:
            return self.transport(z, steps=steps, solver=solver, context=context,
                                  guidance=guidance)
        eps = self.eps if context is None else self._field_eps(context, guidance)
        with torch.no_grad():
            if solver == "ddpm":
                noise = _ancestral_noise(generator)
                x, _ = samplers.ddpm_sample(eps, z, self.schedule, steps, noise, self.t_min)
            elif solver == "ddim":
                noise = _ancestral_noise(generator) if eta > 0 else None
                x, _ = samplers.ddim_sample(
                    eps, z, self.schedule, steps, eta, noise, self.t_min
                )
            else:
                x, _ = samplers.dpmpp_2m_sample(eps, z, self.schedule, steps, self.t_min)
        return x


def _ancestral_noise(generator: torch.Generator | None) -> torch.Generator:
    """Stochastic samplers need a generator; without one, seed a fresh one from torch's
    global RNG, as ``torch.randn`` would have used it."""
    if generator is not None:
        return generator
    return torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))


def build_ddpm(dim: int, cfg: ModelConfig) -> DiffusionModel:
    """Untrained VP-SDE diffusion model with an MLP: ``cfg.schedule``, ``cfg.prediction``,
    ``cfg.t_min`` and (linear schedule) ``cfg.beta_min``/``cfg.beta_max``."""
    schedule = make_schedule(cfg.schedule, beta_min=cfg.beta_min, beta_max=cfg.beta_max)
    net = TimeMLP(dim, cfg.hidden_features, cfg.hidden_layers, cfg.time_embedding,
                  cfg.context_features)
    return conditioned(DiffusionModel(dim, net, schedule, cfg.prediction, cfg.t_min, "ddpm"),
                       cfg)
