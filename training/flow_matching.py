r"""Flow matching: regress a velocity field onto conditional flows along a probability path.

Time convention (project-wide): ``t = 0`` is data, ``t = 1`` is noise ``z ~ N(0, I)``. A
*matcher* has one job, ``sample_location_and_flow(x, z, generator) -> (t, x_t, u_t)``; the
model, its network, the solver and the training loop stay outside it (the torchcfm design).
Variants are composition plus one override:

* :class:`ConditionalFlowMatcher` (``"cfm"``): independent pairs, linear path (Lipman et al.,
  "Flow matching for generative modeling", 2023; Liu et al., "Flow straight and fast", 2023)
  ``x_t = (1 - t) x + (sigma_min + (1 - sigma_min) t) z``, ``u_t = (1 - sigma_min) z - x``.
  This is Lipman's eq. 20-23 with time reversed: ``x_1 = z`` exactly, so the base at
  ``t = 1`` is ``N(0, I)``, and ``x_0 = x + sigma_min z`` is the data blurred by
  ``sigma_min``. (The other placement, ``x_t = (1 - (1 - sigma_min) t) x + t z``, leaves
  ``x_1 = z + sigma_min x``, which is not standard normal, so likelihoods with a standard
  normal base would be biased.)
* :class:`ExactOptimalTransportMatcher` (``"otcfm"``): overrides ``pair``; pairs re-drawn
  by exact OT within the minibatch (Tong et al., "Improving and generalizing flow-based
  generative models with minibatch optimal transport", 2023; Pooladian et al., 2023). A
  conditional model's rows are paired within each group of equal condition, so that the
  noise a class's rows start from stays ``N(0, I)`` (OT across classes would hand each class
  the noise nearest to it, and sampling from ``N(0, I)`` given that class would be wrong):
  per class for labels; a context vector that no two rows share leaves pairs independent.
* :class:`StochasticInterpolantMatcher` (``"si"``): overrides ``interpolate`` (Albergo &
  Vanden-Eijnden, "Building normalizing flows with stochastic interpolants", 2023).
* :class:`ReflowMatcher`: overrides ``pair`` with a fixed bank of (noise, sample) pairs
  made by a trained model (Liu et al. 2023, "reflow").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from artifact.manifest import Defaults
from training.config import ModelConfig
from training.nets import TimeMLP, VelocityModel, conditioned, given

__all__ = [
    "ConditionalFlowMatcher",
    "ExactOptimalTransportMatcher",
    "FlowMatchingModel",
    "ReflowMatcher",
    "StochasticInterpolantMatcher",
    "build_cfm",
    "build_otcfm",
    "build_si",
    "exact_ot_permutation",
]


class ConditionalFlowMatcher:
    """Independent pairs on the linear path (module docstring); ``sigma_min`` in ``[0, 1)``.

    Example:
        >>> matcher = ConditionalFlowMatcher()
        >>> t, x_t, u_t = matcher.sample_location_and_flow(torch.randn(8, 2), torch.randn(8, 2))
        >>> t.shape, x_t.shape, u_t.shape
        (torch.Size([8]), torch.Size([8, 2]), torch.Size([8, 2]))
    """

    def __init__(self, sigma_min: float = 0.0) -> None:
        self.sigma_min = sigma_min

    def pair(
        self, x: Tensor, z: Tensor, generator: torch.Generator | None = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Coupling of data ``x: (batch, dim)`` and noise ``z: (batch, dim)``: independent
        (``context: (batch, C)``, each row's condition, for couplings that respect it)."""
        return x, z

    def interpolate(
        self, x: Tensor, z: Tensor, t: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Point ``x_t`` on the conditional path and its velocity ``u_t``; ``t: (batch,)``."""
        s = t[:, None]
        x_t = (1 - s) * x + (self.sigma_min + (1 - self.sigma_min) * s) * z
        return x_t, (1 - self.sigma_min) * z - x

    def path(self, t: float) -> tuple[float, float, float]:
        """The marginal noise of the path at ``t``: ``(a, s, ds/dt)`` with ``x_t = a x + s
        eps`` in distribution (``a = 1 - t``)."""
        m = self.sigma_min
        return 1.0 - t, m + (1.0 - m) * t, 1.0 - m

    def sample_location_and_flow(
        self, x: Tensor, z: Tensor, generator: torch.Generator | None = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``t ~ U(0, 1)``: ``(batch,)``; ``x_t`` and target ``u_t``: ``(batch, dim)``
        (``context``: each row's condition, before any label dropout)."""
        x, z = self.pair(x, z, generator, context)
        t = self.sample_time(len(x), generator, x)
        x_t, u_t = self.interpolate(x, z, t, generator)
        return t, x_t, u_t

    def sample_time(self, n: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
        """Training times ``(n,)``: uniform on ``[0, 1]``."""
        return torch.rand(n, generator=generator, dtype=like.dtype, device=like.device)


def exact_ot_permutation(x: Tensor, z: Tensor) -> Tensor:
    """Indices ``p: (batch,)`` minimising ``sum_i |x_i - z_{p_i}|^2`` (exact assignment).

    Solved with ``scipy.optimize.linear_sum_assignment`` (Hungarian / LAPJV, ``O(batch^3)``).
    Raises ``ValueError`` on unequal batch sizes or non-finite costs instead of pairing
    silently wrong.
    """
    from scipy.optimize import linear_sum_assignment

    if x.shape != z.shape:
        raise ValueError(
            f"OT pairing needs equal shapes, got data {tuple(x.shape)} and noise {tuple(z.shape)}"
        )
    cost = torch.cdist(x.detach().double(), z.detach().double()).square()
    if not torch.isfinite(cost).all():
        raise ValueError(
            "OT pairing got non-finite distances: the batch holds NaN or inf; "
            "check the data and preprocessing"
        )
    # A square cost matrix gives rows == arange(batch), so the columns are the permutation.
    _, cols = linear_sum_assignment(cost.cpu().numpy())
    return torch.as_tensor(cols, device=x.device)


class ExactOptimalTransportMatcher(ConditionalFlowMatcher):
    """OT-CFM: like :class:`ConditionalFlowMatcher` but the noise is re-paired by exact OT.

    Batches longer than ``block`` rows are paired block by block (OT within each block of
    ``block`` consecutive rows), so a large validation chunk costs ``O(batch block^2)``
    rather than ``O(batch^3)`` and is paired like the training minibatches.
    """

    def __init__(self, sigma_min: float = 0.0, block: int = 512) -> None:
        super().__init__(sigma_min)
        self.block = block

    def pair(
        self, x: Tensor, z: Tensor, generator: torch.Generator | None = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        if context is None:
            return x, z[self._permutation(x, z)]
        _, group = torch.unique(context, dim=0, return_inverse=True)
        order = torch.arange(len(x), device=x.device)
        for g in range(int(group.max()) + 1 if len(group) else 0):
            rows = torch.nonzero(group == g).flatten()
            order[rows] = rows[self._permutation(x[rows], z[rows])]
        return x, z[order]

    def _permutation(self, x: Tensor, z: Tensor) -> Tensor:
        """The exact OT permutation of ``z`` onto ``x``, block by block."""
        perms = [
            start
            + exact_ot_permutation(x[start : start + self.block], z[start : start + self.block])
            for start in range(0, len(x), self.block)
        ]
        return torch.cat(perms) if perms else torch.zeros(0, dtype=torch.long, device=x.device)


class StochasticInterpolantMatcher(ConditionalFlowMatcher):
    r"""Stochastic interpolant ``x_t = (1 - t) x + t z + gamma t (1 - t) xi``, ``xi ~ N(0, I)``.

    Albergo & Vanden-Eijnden (2023), with latent noise ``gamma(t) = gamma t (1 - t)``. The
    ODE drift is ``b(t, x) = E[d/dt I_t + gamma'(t) xi | x_t = x]`` (their thm. 2.6), so the
    regression target is ``u_t = z - x + gamma (1 - 2 t) xi``. We pick ``t (1 - t)`` rather
    than ``sqrt(t (1 - t))`` because its derivative stays bounded, so the target has finite
    variance at the endpoints. ``x_1 = z`` exactly: the ``t = 1`` marginal is ``N(0, I)``.
    """

    def __init__(self, gamma: float = 0.5) -> None:
        super().__init__(sigma_min=0.0)
        self.gamma = gamma

    def path(self, t: float) -> tuple[float, float, float]:
        """``t z + gamma t (1 - t) xi`` is Gaussian: ``s^2 = t^2 + gamma^2 t^2 (1 - t)^2``."""
        g2 = self.gamma ** 2
        s = math.sqrt(t * t + g2 * t * t * (1 - t) ** 2)
        return 1.0 - t, s, (t + g2 * t * (1 - t) * (1 - 2 * t)) / s

    def interpolate(
        self, x: Tensor, z: Tensor, t: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        xi = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        s = t[:, None]
        x_t = (1 - s) * x + s * z + self.gamma * s * (1 - s) * xi
        return x_t, z - x + self.gamma * (1 - 2 * s) * xi


class ReflowMatcher(ConditionalFlowMatcher):
    """Rectified-flow "reflow": straight paths between fixed pairs ``(z_i, x_i)``.

    ``z, x: (pairs, dim)`` come from :func:`make_reflow_pairs`. ``pair`` ignores the batch
    it is given except for its size, and draws that many bank entries by index (with
    replacement) from ``generator``; so the one training loop can keep passing data batches.

    With ``u_shape > 0`` the training times follow the U-shaped density
    ``p(t) ∝ cosh(u_shape (2 t - 1))`` instead of ``U(0, 1)`` (Lee, Lin & Fanti, "Improving
    the training of rectified flows", 2024): more weight at the ends, where one- and two-step
    Euler samplers read the field (at ``t = 1`` the target ``z - x(z)`` is exactly the
    one-step map). The minimiser at each ``t`` is unchanged; only the emphasis moves.
    """

    def __init__(self, z: Tensor, x: Tensor, u_shape: float = 0.0) -> None:
        super().__init__(sigma_min=0.0)
        if z.shape != x.shape:
            raise ValueError(f"reflow pairs need equal shapes, got {z.shape} and {x.shape}")
        if not u_shape >= 0:
            raise ValueError(f"u_shape must be >= 0 (0 = uniform times), got {u_shape}")
        self.z, self.x = z.detach(), x.detach()
        self.u_shape = float(u_shape)

    def sample_time(self, n: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
        """Uniform, or U-shaped by inverting the CDF ``(sinh(a (2t-1)) + sinh a) / 2 sinh a``."""
        a = self.u_shape
        if a == 0:
            return super().sample_time(n, generator, like)
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=like.device)
        sinh_a = torch.sinh(torch.tensor(a, dtype=torch.float64))
        t = (torch.asinh((2 * u - 1) * sinh_a) / a + 1) / 2
        return t.to(dtype=like.dtype, device=like.device)

    def pair(
        self, x: Tensor, z: Tensor, generator: torch.Generator | None = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        # drawn where the generator lives (the training device), the bank stays on the CPU
        idx = torch.randint(len(self.x), (len(x),), generator=generator, device=x.device)
        idx = idx.to(self.x.device)
        return self.x[idx].to(x), self.z[idx].to(x)


class FlowMatchingModel(VelocityModel):
    """A velocity network ``v(x, t)`` trained by a matcher; family ``"flow_matching"``.

    Arguments:
        kind: registry name (``"cfm"``, ``"otcfm"``, ``"si"``).
        dim: data dimension.
        net: the velocity network, ``(batch, dim), (batch,) -> (batch, dim)``, with ``jvp``
            and ``divergence`` (see :class:`training.nets.TimeMLP`).
        matcher: draws ``(t, x_t, u_t)``; not a module, so it is not in the state dict.

    Example:
        >>> model = build_cfm(2, ModelConfig(hidden_features=16))
        >>> model.sample(4, steps=4, solver="euler").shape
        torch.Size([4, 2])
    """

    family = "flow_matching"

    def __init__(self, kind: str, dim: int, net: TimeMLP, matcher: ConditionalFlowMatcher) -> None:
        super().__init__()
        self.kind, self.dim, self.t_min = kind, dim, 0.0
        self.net, self.matcher = net, matcher

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None,
                      context: Tensor | None = None) -> Tensor:
        """Conditional flow matching loss ``E |v(x_t, t) - u_t|^2`` (mean over batch, dims);
        a conditional model's field sees each row's ``context`` (dropped to the null token
        with probability ``cfg_dropout``)."""
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        t, x_t, u_t = self.matcher.sample_location_and_flow(x, z, generator, context)
        return (self.net(x_t, t, *given(self.dropped(context, generator))) - u_t).square().mean()

    def velocity(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        """``dx/dt``: ``(batch, dim), (batch,) -> (batch, dim)`` (given ``context``)."""
        return self.net(x, t, *given(context))

    def velocity_div(self, x: Tensor, t: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v, div v)``: ``(batch, dim)``, ``(batch,)``; exact, forward-mode."""
        return self.net.divergence(x, t, *given(context))

    def velocity_jvp(self, x: Tensor, t: Tensor, e: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v, (dv/dx) e)``, both ``(batch, dim)``."""
        return self.net.jvp(x, t, e, *given(context))

    def path(self, t: float) -> tuple[float, float, float, float]:
        """The matcher's path; ``a' = -1`` (``a = 1 - t``)."""
        a, s, ds = self.matcher.path(t)
        return a, s, -1.0, ds

    def serving_defaults(self) -> Defaults:
        return Defaults(solver="rk4", steps=16, method=self.likelihood_method)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        steps: int | None = 32,
        solver: str = "euler",
        context: Tensor | None = None,
        guidance: float | None = None,
    ) -> Tensor:
        """``(n, dim)`` samples: ODE from ``z ~ N(0, I)`` at ``t = 1`` to ``t = 0`` (given
        ``context: (n, C)``, guided with weight ``guidance``)."""
        return self.transport(self.noise(n, generator), steps=steps, solver=solver,
                              context=context, guidance=guidance)


def build_cfm(dim: int, cfg: ModelConfig) -> FlowMatchingModel:
    """Untrained conditional flow matching (linear path, ``cfg.sigma_min``) with an MLP."""
    return conditioned(FlowMatchingModel("cfm", dim, _time_mlp(dim, cfg),
                                          ConditionalFlowMatcher(cfg.sigma_min)), cfg)


def build_otcfm(dim: int, cfg: ModelConfig) -> FlowMatchingModel:
    """Untrained OT-CFM: pairs drawn by minibatch exact optimal transport (within each group
    of equal condition for a conditional model)."""
    return conditioned(FlowMatchingModel("otcfm", dim, _time_mlp(dim, cfg),
                                          ExactOptimalTransportMatcher(cfg.sigma_min)), cfg)


def build_si(dim: int, cfg: ModelConfig) -> FlowMatchingModel:
    """Untrained stochastic interpolant (noise level ``cfg.gamma``)."""
    return conditioned(FlowMatchingModel("si", dim, _time_mlp(dim, cfg),
                                          StochasticInterpolantMatcher(cfg.gamma)), cfg)


def _time_mlp(dim: int, cfg: ModelConfig) -> TimeMLP:
    return TimeMLP(dim, cfg.hidden_features, cfg.hidden_layers, cfg.time_embedding,
                   cfg.context_features)
