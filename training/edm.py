r"""EDM: the preconditioned denoiser of Karras et al. 2022; family ``"edm"``.

Karras, Aittala, Aila & Laine, "Elucidating the design space of diffusion-based generative
models" (2022). Noisy data ``x_sigma = x_0 + sigma n``; the network ``F`` is wrapped into the
denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` (their table 1, the
coefficients in ``numerics.schedules.EDMPreconditioning``) and trained with ``ln sigma ~
N(P_mean, P_std^2)`` and loss weight ``lambda(sigma) = 1 / c_out^2`` (their sec. 5), which
makes the loss ``|F - (x_0 - c_skip x_sigma) / c_out|^2``: unit-variance targets at every
sigma.

Time is sigma: the exported ``velocity`` is the probability-flow ODE ``dx/dsigma = (x -
D(x; sigma)) / sigma`` (eq. 3 with ``sigma(t) = t``, ``s(t) = 1``) from ``sigma_min`` (data)
to ``sigma_max`` (noise), and the base at ``sigma_max`` is ``N(0, (sigma_max^2 +
data_std^2) I)`` (the second moment of data plus noise; ``data_std`` is the rows' std, 1 for
standardized rows, and need not be the preconditioning's ``sigma_data``). The ODE solvers
step on EDM's ``rho``-grid (``numerics.schedules.rho_grid``), so ``heun`` is EDM's
deterministic sampler (algorithm 1, except that ``steps`` Heun steps cost ``2 steps``
evaluations and the last one ends at ``sigma_min``: the paper's final Euler step from
``sigma_min`` to 0 costs an evaluation and leaves one Heun step fewer for the sigmas where
trajectories bend) and ``edm_stochastic`` its stochastic one (algorithm 2,
``numerics.samplers``); the likelihood (exact or Hutchinson) is the shared one over the same
field, as for every ODE model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from artifact.manifest import Defaults, TimeSpec
from numerics import samplers
from numerics.schedules import EDMPreconditioning, edm_divergence, edm_jvp, edm_velocity
from numerics.solvers import SOLVERS
from training.config import ModelConfig
from training.nets import TimeMLP, VelocityModel, conditioned, given

__all__ = ["EDMModel", "build_edm"]

_DEFAULT_STEPS = 16


class EDMModel(VelocityModel):
    """An EDM denoiser around a :class:`training.nets.TimeMLP` ``F``.

    Arguments:
        dim: data dimension ``D``.
        net: ``F((batch, D), (batch,)) -> (batch, D)`` with ``jvp`` and ``divergence``.
        precond: the preconditioning (``sigma_data``, ``sigma_min``, ``sigma_max``).
        rho: the sigma steps' exponent (7 in the paper; ``ModelConfig`` defaults to 2).
        data_std: the rows' std, which sets the base (None: ``precond.sigma_data``, the
            paper's assumption that the two agree).
        p_mean, p_std: ``ln sigma ~ N(p_mean, p_std^2)`` in training.
        churn: the stochastic sampler's ``s_churn``, ``s_tmin``, ``s_tmax`` (None: no
            bound), ``s_noise``.

    Example:
        >>> model = build_edm(2, ModelConfig(hidden_features=16))
        >>> model.sample(3, steps=4).shape
        torch.Size([3, 2])
    """

    family = "edm"
    ode_name = "EDM probability-flow ODE in sigma"

    def __init__(self, dim: int, net: TimeMLP, precond: EDMPreconditioning, rho: float = 7.0,
                 p_mean: float = -1.2, p_std: float = 1.2,
                 churn: tuple[float, float, float | None, float] = (0.0, 0.0, None, 1.0),
                 kind: str = "edm", data_std: float | None = None) -> None:
        super().__init__()
        self.kind, self.dim, self.net, self.precond = kind, dim, net, precond
        self.t_min, self.t_max = precond.sigma_min, precond.sigma_max
        data_std = precond.sigma_data if data_std is None else data_std
        self.noise_std = math.sqrt(precond.sigma_max**2 + data_std**2)
        self.rho, self.p_mean, self.p_std = rho, p_mean, p_std
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = churn

    def _coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``c_skip, c_out, c_in`` as ``(batch, 1)`` columns and ``c_noise: (batch,)``."""
        p = self.precond
        return (p.c_skip(sigma)[:, None], p.c_out(sigma)[:, None], p.c_in(sigma)[:, None],
                p.c_noise(sigma))

    def denoise(self, x: Tensor, sigma: Tensor, context: Tensor | None = None) -> Tensor:
        """``D(x; sigma)``: ``x: (batch, D)``, ``sigma: (batch,)`` -> ``(batch, D)`` (given a
        conditional model's ``context: (batch, C)``)."""
        c_skip, c_out, c_in, c_noise = self._coefficients(sigma)
        return c_skip * x + c_out * self.net(c_in * x, c_noise, *given(context))

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None,
                      context: Tensor | None = None) -> Tensor:
        """``E lambda(sigma) |D(x + sigma n; sigma) - x|^2`` with ``ln sigma ~ N(P_mean,
        P_std^2)``, written as ``E |F - (x - c_skip x_sigma) / c_out|^2`` (``lambda c_out^2 =
        1``); mean over batch and dims. All randomness comes from ``generator``. A
        conditional model's ``context`` is dropped to the null token with probability
        ``cfg_dropout`` (classifier-free guidance)."""
        ln_sigma = torch.randn(len(x), generator=generator, dtype=x.dtype, device=x.device)
        sigma = torch.exp(self.p_mean + self.p_std * ln_sigma)
        n = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        c_skip, c_out, c_in, c_noise = self._coefficients(sigma)
        x_sigma = x + sigma[:, None] * n
        target = (x - c_skip * x_sigma) / c_out
        out = self.net(c_in * x_sigma, c_noise, *given(self.dropped(context, generator)))
        return (out - target).square().mean()

    def _denoise_jvp(self, x: Tensor, sigma: Tensor, e: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(D, J_D e)``: ``J_D = c_skip I + c_out c_in J_F``."""
        c_skip, c_out, c_in, c_noise = self._coefficients(sigma)
        out, tangent = self.net.jvp(c_in * x, c_noise, e, *given(context))
        return c_skip * x + c_out * out, c_skip * e + c_out * c_in * tangent

    def _denoise_div(self, x: Tensor, sigma: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(D, tr J_D)``: ``tr J_D = c_skip D + c_out c_in tr J_F``."""
        c_skip, c_out, c_in, c_noise = self._coefficients(sigma)
        out, div = self.net.divergence(c_in * x, c_noise, *given(context))
        return (c_skip * x + c_out * out,
                (c_skip * self.dim + c_out * c_in * div[:, None])[:, 0])

    def velocity(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        """``dx/dsigma = (x - D(x; sigma)) / sigma`` at ``sigma = t``: ``(batch, D)``."""
        return edm_velocity(x, self.denoise(x, t, context), t)

    def velocity_div(self, x: Tensor, t: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v, div v)``: ``(batch, D)``, ``(batch,)``; exact, forward-mode."""
        denoised, div = self._denoise_div(x, t, context)
        return edm_velocity(x, denoised, t), edm_divergence(div, t, self.dim)

    def velocity_jvp(self, x: Tensor, t: Tensor, e: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v, (dv/dx) e)``, both ``(batch, D)``."""
        denoised, jvp = self._denoise_jvp(x, t, e, context)
        return edm_velocity(x, denoised, t), edm_jvp(e, jvp, t)

    def time_spec(self) -> TimeSpec:
        return TimeSpec(t_min=float(self.t_min), t_max=float(self.t_max),
                        noise_std=float(self.noise_std), rho=float(self.rho),
                        sigma_data=float(self.precond.sigma_data), s_churn=float(self.s_churn),
                        s_tmin=float(self.s_tmin),
                        s_tmax=None if self.s_tmax is None else float(self.s_tmax),
                        s_noise=float(self.s_noise))

    def serving_defaults(self) -> Defaults:
        return Defaults(solver="heun", steps=_DEFAULT_STEPS, method=self.likelihood_method)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        steps: int | None = _DEFAULT_STEPS,
        solver: str = "heun",
        context: Tensor | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """``(n, D)`` samples of ``p_{sigma_min}`` from noise at ``sigma_max`` (given
        ``context: (n, C)``, guided with weight ``guidance``).

        ``solver``: an ODE solver of ``numerics.solvers.SOLVERS`` on the rho-grid (``heun``:
        EDM's algorithm 1) or ``"edm_stochastic"`` (algorithm 2 with the model's churn; its
        noise from ``generator``). ``steps``: sigma steps (default 16).
        """
        choices = SOLVERS + samplers.EDM_SAMPLERS
        if solver not in choices:
            raise ValueError(f"unknown EDM solver {solver!r}; choose one of {', '.join(choices)}")
        steps = _DEFAULT_STEPS if steps is None and solver != "dopri5" else steps
        z = self.noise(n, generator)
        if solver in SOLVERS:
            return self.transport(z, steps=steps, solver=solver, context=context,
                                  guidance=guidance)
        noise = generator if generator is not None else torch.Generator().manual_seed(
            int(torch.randint(2**62, (1,))))
        x, _ = samplers.edm_stochastic_sample(
            self.field(context, guidance), z, self.t_max, self.t_min, steps, noise, rho=self.rho,
            s_churn=self.s_churn, s_tmin=self.s_tmin,
            s_tmax=math.inf if self.s_tmax is None else self.s_tmax, s_noise=self.s_noise)
        return x


def build_edm(dim: int, cfg: ModelConfig) -> EDMModel:
    """Untrained EDM with an MLP ``F``: ``cfg.edm_sigma_min``/``edm_sigma_top``,
    ``edm_data_std``, ``sigma_data``, ``rho``, ``p_mean``/``p_std`` and the churn ``s_*``."""
    precond = EDMPreconditioning(cfg.sigma_data, cfg.edm_sigma_min, cfg.edm_sigma_top)
    net = TimeMLP(dim, cfg.hidden_features, cfg.hidden_layers, cfg.time_embedding,
                  cfg.context_features)
    return conditioned(EDMModel(dim, net, precond, cfg.rho, cfg.p_mean, cfg.p_std,
                                (cfg.s_churn, cfg.s_tmin, cfg.s_tmax, cfg.s_noise),
                                data_std=cfg.edm_data_std), cfg)
