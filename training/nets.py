"""Time-conditioned networks with explicit forward-mode derivatives.

Diffusion and flow-matching models export ``velocity_div`` and ``velocity_jvp`` graphs, and
ONNX holds no autograd: the Jacobian-vector product and the exact divergence are therefore
written here as plain arithmetic that pushes tangents through every layer (forward-mode
differentiation by hand; Griewank & Walther, *Evaluating Derivatives*, 2008, ch. 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from artifact.manifest import Defaults, TimeSpec
from artifact.scores import NoiseLevel
from numerics import likelihood
from numerics.guidance import guided
from numerics.likelihood import LikelihoodResult
from numerics.schedules import rho_grid
from numerics.solvers import Trajectory, integrate, trajectory
from training.config import ModelConfig
from training.graphs import ExportGraph, velocity_graphs

__all__ = ["TimeMLP", "VelocityModel", "conditioned", "given", "silu_derivative"]


def silu_derivative(h: Tensor) -> Tensor:
    """Derivative of ``silu(h) = h * sigmoid(h)``: ``sigmoid(h) * (1 + h * (1 - sigmoid(h)))``.

    Elfwing et al., "Sigmoid-weighted linear units", 2018.
    """
    s = torch.sigmoid(h)
    return s * (1 + h * (1 - s))


class TimeMLP(nn.Module):
    r"""MLP ``f(x, t)`` with Fourier time features and hand-written forward-mode derivatives.

    The input layer sees ``[x, phi(t)]`` where ``phi_k(t) = cos(pi * (k // 2 + 1) * t -
    (k % 2) * pi / 2)`` alternates cosines and sines of fixed frequencies (a buffer, not a
    parameter; Tancik et al., "Fourier features", 2020). Hidden layers use SiLU, which is
    smooth, so the divergence used by likelihood integration is continuous in ``x``.

    Arguments:
        dim: data dimension ``D``; input ``x`` and output are ``(batch, D)``.
        hidden_features: width ``H`` of each hidden layer.
        hidden_layers: number of hidden layers.
        time_embedding: number of Fourier features of ``t``.
        context_features: ``C`` context columns the input layer also sees (a label's one-hot
            row or a standardized context: conditional models; 0: none). Like ``t`` they carry
            no tangent: derivatives are in ``x`` only.

    Example:
        >>> net = TimeMLP(2, 32, 2, 8)
        >>> x, t = torch.randn(5, 2), torch.rand(5)
        >>> out, div = net.divergence(x, t)
        >>> out.shape, div.shape
        (torch.Size([5, 2]), torch.Size([5]))
    """

    def __init__(
        self,
        dim: int,
        hidden_features: int = 64,
        hidden_layers: int = 2,
        time_embedding: int = 16,
        context_features: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.context_features = context_features
        k = torch.arange(time_embedding)
        self.register_buffer("frequencies", math.pi * (k // 2 + 1).to(torch.get_default_dtype()))
        self.register_buffer("phases", (k % 2).to(torch.get_default_dtype()) * (math.pi / 2))
        widths = [dim + time_embedding + context_features] + [hidden_features] * hidden_layers
        self.hidden = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.output = nn.Linear(hidden_features, dim)

    def embed_time(self, t: Tensor) -> Tensor:
        """Fourier features: ``t: (batch,)`` -> ``(batch, time_embedding)``."""
        return torch.cos(t[:, None] * self.frequencies - self.phases)

    def _inputs(self, x: Tensor, t: Tensor, context: Tensor | None) -> Tensor:
        """The input layer's ``[x, phi(t), context]``."""
        parts = [x, self.embed_time(t)] + ([] if context is None else [context])
        return torch.cat(parts, dim=-1)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        """``x: (batch, D)``, ``t: (batch,)`` (``context: (batch, C)``) -> ``(batch, D)``."""
        h = self._inputs(x, t, context)
        for layer in self.hidden:
            h = nn.functional.silu(layer(h))
        return self.output(h)

    def _forward_mode(self, x: Tensor, t: Tensor, tangents: Tensor,
                      context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Output and ``K`` tangents pushed forward together.

        ``tangents: (batch or 1, K, D)`` are directions in ``x`` (``t`` has tangent zero);
        returns ``(batch, D)`` and ``(batch, K, D)`` with ``out_tangent[b, k] = J_b
        tangents[b, k]`` where ``J_b = d f(x_b, t_b) / d x_b``.
        """
        first = self.hidden[0]
        h = first(self._inputs(x, t, context))
        # Only the x-columns of the first weight see the tangent; biases never do.
        tangent = tangents @ first.weight[:, : self.dim].T
        for i, layer in enumerate(self.hidden):
            if i > 0:
                h = layer(h)
                tangent = tangent @ layer.weight.T
            tangent = silu_derivative(h)[:, None, :] * tangent
            h = nn.functional.silu(h)
        return self.output(h), tangent @ self.output.weight.T

    def forward_mode(self, x: Tensor, t: Tensor, tangents: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Output ``(batch, D)`` and ``tangents: (batch or 1, K, D)`` pushed forward,
        ``(batch, K, D)``: for models that compose the network with maps of their own."""
        return self._forward_mode(x, t, tangents, context)

    def jvp(self, x: Tensor, t: Tensor, e: Tensor,
            context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Output and Jacobian-vector product ``(d f / d x) e``; all ``(batch, D)``."""
        out, tangent = self._forward_mode(x, t, e[:, None, :], context)
        return out, tangent[:, 0, :]

    def divergence(self, x: Tensor, t: Tensor,
                   context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Output ``(batch, D)`` and exact divergence ``tr(d f / d x)``: ``(batch,)``.

        All ``D`` basis tangents travel at once, as a ``(batch, D, H)`` tensor; cost is
        ``D`` times a forward pass, which is what exact likelihood of a CNF costs anyway.
        """
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        out, jacobian = self._forward_mode(x, t, eye[None], context)
        # jacobian[b, i, j] = d f_j / d x_i; masking with eye keeps the graph ONNX-friendly.
        return out, (jacobian * eye).sum(dim=(-2, -1))


class VelocityModel(nn.Module):
    """Plumbing shared by the continuous-time families (diffusion, flow matching).

    A subclass supplies ``training_loss``, ``velocity``, ``velocity_div`` and
    ``velocity_jvp`` (the field ``dx/dt`` with ``t = 0`` data, ``t = 1`` noise); this class
    turns them into ODE sampling and likelihood through ``numerics.solvers`` and
    ``numerics.likelihood``, which only ever see those callables (the solver knows no model).
    Attributes ``dim`` and ``t_min`` (likelihood integrates ``t_min -> t_max``, sampling
    ``t_max -> t_min``) are set by the subclass; ``t_max``, ``noise_std`` (the base at
    ``t_max`` is ``N(0, noise_std^2 I)``) and ``rho`` (fixed-step solvers step uniformly in
    ``t^(1/rho)``) keep their defaults but in EDM, whose time is sigma.
    """

    dim: int
    t_min: float
    t_max: float = 1.0
    noise_std: float = 1.0
    rho: float | None = None
    likelihood_method: str = "exact"
    """Served and evaluated by default: ``"hutchinson"`` where an exact trace costs too many
    network passes (images)."""
    ode_name: str = "ODE"
    """How the sampling ODE is called (diffusion: the probability-flow ODE)."""
    amp_safe: bool = True
    """``TrainConfig.amp="auto"`` trains it under bfloat16 autocast on CUDA: the loss is a
    mean squared error of one network output, which bfloat16 matmuls and convolutions keep
    (the loss itself is reduced in float32)."""
    context_features: int = 0
    """Conditional models: the width of the ``context`` every field method takes (0: none)."""
    cfg_dropout: float = 0.0
    """The probability that training drops a row's label to the null token (the all-zero
    context row), so one network learns the conditional and the unconditional field
    (classifier-free guidance)."""

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None,
                      context: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def velocity(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def velocity_div(self, x: Tensor, t: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def velocity_jvp(self, x: Tensor, t: Tensor, e: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def dropped(self, context: Tensor | None, generator: torch.Generator | None) -> Tensor | None:
        """Training's context with label dropout (:func:`drop_context`)."""
        return drop_context(context, self.cfg_dropout, generator)

    def field(self, context: Tensor | None = None,
              guidance: float | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """The sampling field ``(x, t) -> v``: given ``context: (n, C)`` (``None``:
        unconditional), guided with weight ``guidance`` against the null context."""
        if context is None:
            return self.velocity
        if guidance is None:
            return lambda x, t: self.velocity(x, t, context)
        null = torch.zeros_like(context)
        return lambda x, t: guided(self.velocity(x, t, context), self.velocity(x, t, null),
                                   guidance)

    def path(self, t: float) -> tuple[float, float, float, float]:
        """The Gaussian marginal path ``x_t = a u + s eps`` at ``t``: ``(a, s, da/dt,
        ds/dt)``, which the denoising anomaly scores need (``numerics.denoise``)."""
        raise NotImplementedError

    def noise_levels(self, ts: Sequence[float]) -> list[NoiseLevel]:
        """The manifest's noise levels (``artifact.scores``) at times ``ts``."""
        return [NoiseLevel(t=float(t), **dict(zip(("a", "s", "da", "ds"), self.path(float(t)),
                                                  strict=True))) for t in ts]

    def validation_loss(self, x: Tensor, generator: torch.Generator | None = None,
                        context: Tensor | None = None) -> Tensor:
        """The training loss; the caller fixes ``generator``'s seed so evaluations compare."""
        return self.training_loss(x, generator, **({} if context is None
                                                   else {"context": context}))

    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, dim)`` draws of the base distribution ``N(0, noise_std^2 I)`` at ``t_max``."""
        p = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=p.dtype, device=p.device)
        return z * self.noise_std if self.noise_std != 1.0 else z

    def transport(self, z: Tensor, *, steps: int | None = 32, solver: str = "rk4",
                  context: Tensor | None = None, guidance: float | None = None) -> Tensor:
        """Integrate the ODE from noise ``z: (n, dim)`` at ``t_max`` to ``t = t_min``.

        ``solver`` is any of ``numerics.solvers.SOLVERS``; for ``"dopri5"`` ``steps`` only
        sets the first step (``None``: chosen automatically). ``context``/``guidance``: the
        field of :meth:`field`.
        """
        with torch.no_grad():
            return integrate(self.field(context, guidance), z, self.t_max, self.t_min,
                             method=solver, steps=steps, rho=self.rho,
                             retract=self.retraction()).x

    def log_prob_with_error(
        self,
        x: Tensor,
        method: str | None = None,
        steps: int | None = None,
        solver: str = "dopri5",
        probes: int = 8,
        seed: int = 0,
        context: Tensor | None = None,
        **options: float,
    ) -> LikelihoodResult:
        """Instantaneous change of variables (Chen et al., "Neural ODEs", 2018, thm. 1).

        ``log p_{t_min}(x) = log N(z; 0, noise_std^2 I) + int_{t_min}^{t_max} div v(x_t, t) dt``
        with ``z =
        x_1``; ``method="exact"`` uses the forward-mode trace, ``"hutchinson"`` the
        stochastic trace estimator with ``probes`` seeded probes (Grathwohl et al., FFJORD,
        2019). ``options`` (``rtol``, ``atol``, ``max_steps``) go to the solver.
        ``x: (batch, dim)``; returns ``numerics.likelihood.LikelihoodResult`` (``log_prob:
        (batch,)``, ``std_error: (batch,)`` or ``None`` for exact, ``nfe``, ``z``).
        """
        method = method or self.likelihood_method
        common = dict(t0=self.t_min, t1=self.t_max, method=solver, steps=steps, rho=self.rho,
                      base_log_prob=self.base_log_prob(), **options)
        given = {} if context is None else {"context": context}
        with torch.no_grad():
            if method == "exact":
                return likelihood.log_likelihood_exact(
                    lambda y, t: self.velocity_div(y, t, **given), x, **common)
            if method == "hutchinson":  # the probes' replicas are probe-major: so is context
                tiled = {} if context is None else {"context": context.repeat(probes, 1)}
                return likelihood.log_likelihood_hutchinson(
                    lambda y, t, e: self.velocity_jvp(y, t, e, **tiled), x, probes=probes,
                    seed=seed, **common
                )
        raise ValueError(f"unknown likelihood method {method!r}; choose 'exact' or 'hutchinson'")

    def log_prob(self, x: Tensor, **options: float | int | str) -> Tensor:
        """``log p(x)``: ``(batch, dim)`` -> ``(batch,)``; options as ``log_prob_with_error``."""
        return self.log_prob_with_error(x, **options).log_prob

    def generation(self, z: Tensor, *, frames: int, solver: str = "rk4",
                   steps: int = 32) -> tuple[Trajectory, list[str], str]:
        """Noise ``z: (n, dim)`` at ``t_max`` to ``t_min`` by ``solver`` on a uniform (or
        ``rho``) grid of at least ``steps`` steps, a multiple of ``frames - 1``: the states on
        the grid, a label per state, and what was run."""
        per_frame = math.ceil(steps / (frames - 1))
        n = (frames - 1) * per_frame
        times = (np.linspace(self.t_max, self.t_min, n + 1) if self.rho is None
                 else rho_grid(self.t_max, self.t_min, n, self.rho))
        path = trajectory(self.velocity, z, times, method=solver)
        labels = [f"t = {t:.2f}" for t in times]
        return path, labels, f"{self.ode_name}, {solver}, {len(times) - 1} steps, NFE {path.nfe}"

    def base_log_prob(self) -> Callable[[Tensor], Tensor]:
        """``z -> log p_base(z)`` at ``t_max``: ``N(0, noise_std^2 I)``."""
        return likelihood.normal_log_prob(self.noise_std)

    def retraction(self) -> Callable[[Tensor], Tensor] | None:
        """Applied after every ODE step while sampling (None: the state is in ``R^dim``)."""
        return None

    def export_graphs(self) -> dict[str, ExportGraph]:
        """``velocity``, ``velocity_div`` and ``velocity_jvp`` (with a ``context`` input when
        the model is conditional)."""
        return velocity_graphs(self, self.dim, self.context_features)

    def time_spec(self) -> TimeSpec:
        return TimeSpec(t_min=float(self.t_min))

    def serving_defaults(self) -> Defaults:
        """The solver and steps ``/sample`` uses by default, and the likelihood method."""
        raise NotImplementedError


def conditioned(model: VelocityModel, cfg: ModelConfig) -> VelocityModel:
    """``model`` with the context width and label dropout of ``cfg`` (its network built with
    ``cfg.context_features`` context inputs)."""
    model.context_features, model.cfg_dropout = cfg.context_features, cfg.cfg_dropout
    return model


def drop_context(context: Tensor | None, p: float,
                 generator: torch.Generator | None) -> Tensor | None:
    """Training's context: each row's dropped to the null token (zeros) with probability
    ``p`` (Ho & Salimans 2022, algorithm 1); ``None`` stays ``None``."""
    if context is None or p == 0:
        return context
    keep = torch.rand(len(context), generator=generator, dtype=context.dtype,
                      device=context.device) >= p
    return context * keep[:, None].to(context.dtype)


def given(context: Tensor | None) -> tuple[Tensor, ...]:
    """``(context,)``, or ``()`` without one: networks that are never conditional (the
    tests' analytic oracles) keep their ``(x, t)`` signatures."""
    return () if context is None else (context,)
