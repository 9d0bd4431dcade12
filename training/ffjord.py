r"""FFJORD: a continuous normalizing flow trained by maximum likelihood through the ODE.

Grathwohl et al., "FFJORD: Free-form continuous dynamics for scalable reversible generative
models", 2019. The model is a free-form time-conditioned MLP velocity ``v(x, t)`` (the same
network, export graphs and serving as flow matching: ``t = 0`` data, ``t = 1`` noise).
Only the training objective differs: instead of regressing ``v`` onto a probability path,
it maximises the instantaneous change of variables (Chen et al. 2018, thm. 1)

    ``log p(x) = log N(z; 0, I) + int_0^1 tr(dv/dx)(x_t, t) dt``,  ``z = x_1``,

integrated by the shared adaptive Dormand-Prince solver (``numerics.solvers``, tolerances
``ModelConfig.ode_rtol``/``ode_atol``). During training the trace is Hutchinson's estimate
``e^T (dv/dx) e`` with one Rademacher probe ``e`` per row, fixed along the path; ``(dv/dx) e``
is the network's forward-mode Jacobian-vector product (``TimeMLP.jvp``, explicit arithmetic:
one extra tangent pass, the cost of the vector-Jacobian product in the paper, and the same
scalar ``e^T J e``). The estimate is unbiased, so the objective equals the exact-divergence
objective in expectation (``tests/test_ffjord.py``).

Gradients: direct backpropagation through the solver's steps (discretise-then-optimise),
not the adjoint method. On tabular data the paths take tens of steps, so storing them costs
little memory, and the gradient is the exact gradient of the computed loss; the adjoint
would solve a second, backward ODE (about twice the function evaluations again) and give the
loss's gradient only to the solver's tolerance. Step sizes are held constant in the
backward pass (they are control, not model).

Optional RNODE regularisers (Finlay et al., "How to train your neural ODE", 2020) keep the
dynamics easy to solve: ``kinetic_energy * int |v|^2 dt`` and ``jacobian_norm * int
|(dv/dx) e|^2 dt`` (an unbiased estimate of the Jacobian's squared Frobenius norm with the
same probe), both integrated as extra state of the same solve.
"""

from __future__ import annotations

import torch
from torch import Tensor

from artifact.manifest import Defaults
from numerics.likelihood import standard_normal_log_prob
from numerics.solvers import integrate
from training.config import ModelConfig
from training.flow_matching import FlowMatchingModel
from training.nets import TimeMLP, conditioned, given

__all__ = ["FFJORD", "build_ffjord", "rademacher"]


def rademacher(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None,
               like: Tensor) -> Tensor:
    """Signs in ``{-1, +1}`` of ``shape``, drawn from ``generator``, as ``like``'s dtype."""
    bits = torch.randint(0, 2, tuple(shape), generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


class FFJORD(FlowMatchingModel):
    """A velocity MLP trained by maximum likelihood through the ODE (module docstring).

    Arguments:
        dim: data dimension.
        net: the velocity network (:class:`training.nets.TimeMLP`).
        rtol, atol: tolerances of the adaptive solver it trains through.
        kinetic_energy, jacobian_norm: RNODE weights (0: off).

    Example:
        >>> model = build_ffjord(2, ModelConfig(hidden_features=8, hidden_layers=1))
        >>> model.training_loss(torch.randn(16, 2)).shape
        torch.Size([])
    """

    def __init__(self, dim: int, net: TimeMLP, *, rtol: float = 1e-3, atol: float = 1e-3,
                 kinetic_energy: float = 0.0, jacobian_norm: float = 0.0) -> None:
        super().__init__("ffjord", dim, net, matcher=None)  # type: ignore[arg-type]
        self.rtol, self.atol = rtol, atol
        self.kinetic_energy, self.jacobian_norm = kinetic_energy, jacobian_norm

    def nll_terms(self, x: Tensor, probe: Tensor | None, *, solver: str = "dopri5",
                  steps: int | None = None, context: Tensor | None = None,
                  ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row ``(-log p(x), int |v|^2 dt, int |(dv/dx) e|^2 dt)``, each ``(batch,)``
        (``-log p(x | context)`` given a conditional model's ``context: (batch, C)``).

        ``probe: (batch, dim)`` is Hutchinson's trace estimate with that probe; ``None`` is
        the exact trace (forward-mode, ``dim`` tangents). Differentiable (direct backprop).
        """
        d, c = self.dim, given(context)

        def augmented(state: Tensor, t: Tensor) -> Tensor:
            h = state[:, :d]
            if probe is None:
                v, div = self.net.divergence(h, t, *c)
                jac = torch.zeros_like(div)
            else:
                v, jv = self.net.jvp(h, t, probe, *c)
                div, jac = (probe * jv).sum(-1), jv.square().sum(-1)
            kinetic = v.square().sum(-1)
            return torch.cat([v, torch.stack([div, kinetic, jac], -1)], -1)

        state = torch.cat([x, x.new_zeros(len(x), 3)], -1)
        end = integrate(augmented, state, 0.0, 1.0, method=solver, steps=steps,
                        rtol=self.rtol, atol=self.atol, differentiable=True).x
        nll = -(standard_normal_log_prob(end[:, :d]) + end[:, d])
        return nll, end[:, d + 1], end[:, d + 2]

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None,
                      context: Tensor | None = None) -> Tensor:
        """Mean NLL with one Rademacher probe per row, plus the RNODE terms; a conditional
        model's ``context`` is dropped to the null token with probability ``cfg_dropout``
        (so that one network also gives the marginal density, and guidance)."""
        probe = rademacher(x.shape, generator, x)
        nll, kinetic, jacobian = self.nll_terms(x, probe,
                                                context=self.dropped(context, generator))
        loss = nll.mean()
        if self.kinetic_energy:
            loss = loss + self.kinetic_energy * kinetic.mean()
        if self.jacobian_norm:
            loss = loss + self.jacobian_norm * jacobian.mean()
        return loss

    def validation_loss(self, x: Tensor, generator: torch.Generator | None = None,
                        context: Tensor | None = None) -> Tensor:
        """Mean NLL with the exact trace at the training tolerances (no regularisers)."""
        return self.nll_terms(x, None, context=context)[0].mean()

    def serving_defaults(self) -> Defaults:
        """Adaptive ``dopri5`` sampling (the solver it was trained with), exact likelihood."""
        return Defaults(solver="dopri5", method=self.likelihood_method)

    def sample(self, n: int, generator: torch.Generator | None = None,
               steps: int | None = None, solver: str = "dopri5",
               context: Tensor | None = None, guidance: float | None = None) -> Tensor:
        """``(n, dim)`` samples: the ODE from ``z ~ N(0, I)`` at ``t = 1`` to ``t = 0`` (given
        ``context: (n, C)``, guided with weight ``guidance``)."""
        return self.transport(self.noise(n, generator), steps=steps, solver=solver,
                              context=context, guidance=guidance)


def build_ffjord(dim: int, cfg: ModelConfig) -> FFJORD:
    """Untrained FFJORD with the flow-matching velocity MLP and ``cfg``'s solver settings."""
    net = TimeMLP(dim, cfg.hidden_features, cfg.hidden_layers, cfg.time_embedding,
                  cfg.context_features)
    return conditioned(FFJORD(dim, net, rtol=cfg.ode_rtol, atol=cfg.ode_atol,
                              kinetic_energy=cfg.kinetic_energy,
                              jacobian_norm=cfg.jacobian_norm), cfg)
