r"""Residual flows: invertible ResNets ``y = x + g(x)`` with ``Lip(g) < 1``.

Behrmann et al., "Invertible residual networks", 2019 (i-ResNet); Chen et al., "Residual
flows for invertible generative modeling", 2019.

* ``g`` is an MLP of :class:`SpectralLinear` layers (spectral normalisation by power
  iteration: each weight is divided by ``max(1, sigma / c)``, ``c`` the Lipschitz
  coefficient ``ModelConfig.lipschitz < 1``) and :class:`LipSwish` activations
  (``x sigmoid(beta x) / 1.1``, 1-Lipschitz), so ``Lip(g) <= c^layers < 1`` and ``x + g(x)``
  is a bijection; ActNorm sits between blocks.
* Training log-det: the power series ``log det(I + J) = sum_k (-1)^(k+1) tr(J^k) / k`` cut
  by the Russian-roulette estimator (unbiased: term ``k`` divided by ``P(N >= k)``, ``N = 2
  + Geometric(1/2)``) with Hutchinson's trace (one Gaussian probe per row, vector-Jacobian
  products), and its gradient by the Neumann series ``d log det(I + J) = tr((I + J)^-1 dJ)
  = sum_k (-1)^k tr(J^k dJ)`` with the same probe and the same roulette (Chen et al. 2019,
  sec. 3.2): one differentiable vector-Jacobian product instead of backpropagating through
  every term.
* Evaluated log-det, and served for ``dim <= 64`` (:data:`EXACT_MAX_DIM`): exact,
  ``log det(I + J)`` from the full Jacobian built by ``D`` forward-mode Jacobian-vector
  products (explicit arithmetic through the layers, so the exported graph holds no autograd)
  and ONNX ``Det``; ``det(I + J) > 0`` because ``I + sJ`` stays invertible for ``s`` in
  ``[0, 1]``.
* Served above 64 dims, where ``D`` JVPs and a ``D x D`` Det per block grow the graph and
  its cost as ``D^2``: the power series cut after ``ModelConfig.series_terms`` terms, each
  trace by Hutchinson's ``e^T J^k e`` with the probe ``e`` an input of the ``log_prob``
  graph (one forward-mode product per term). The service feeds it each row's seeded
  Rademacher probes and answers their mean and standard error (method ``hutchinson``); the
  manifest's ``log_det`` section holds the terms and the cut's bound ``D L^(n+1) / ((n + 1)
  (1 - L))`` per block, ``L`` the block's Lipschitz bound from its layers' exact spectral
  norms (``|tr(J^k)| <= D L^k``).
* Inverse: the fixed-point iteration ``x <- y - g(x)`` (a contraction of rate ``Lip(g)``).
  Eager code iterates to a tolerance; the exported ``sample`` graph unrolls
  ``ModelConfig.fixed_point_iterations`` iterations, and ``genserve evaluate`` reports the
  residual ``|f(x) - z|`` it reached.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from artifact.manifest import Defaults, LogDetSpec
from numerics.likelihood import standard_normal_log_prob
from training.config import ModelConfig
from training.flows.base import Flow, Transform
from training.flows.linear import ActNorm
from training.graphs import ExportGraph, ProbeLogProbGraph, SampleGraph, spec

__all__ = ["EXACT_MAX_DIM", "LipSwish", "ResidualBlock", "ResidualFlow", "SpectralLinear",
           "build_resflow", "series_truncation_bound"]

EXACT_MAX_DIM = 64
"""Largest dimension whose served log-det is exact (``D`` JVPs and a ``D x D`` Det); above
it the served log-det is the truncated series with Hutchinson's traces."""
SPECTRAL_RTOL = 1e-4
"""Relative change of a power-iteration estimate at which a training step's iteration stops."""
SPECTRAL_MAX_ITERATIONS = 200
ROULETTE_EXACT_TERMS = 2
"""Power-series terms always computed; later ones survive the roulette with prob. 1/2 each."""


class SpectralLinear(nn.Linear):
    """``nn.Linear`` whose weight is ``W / max(1, sigma(W) / coeff)``.

    ``sigma`` is the power-iteration estimate ``u^T W v`` with ``u``, ``v`` buffers updated
    by :meth:`power_iteration` (called once per training step, never by ``forward``, so a
    forward pass is a pure function of the state dict). ``u^T W v`` never exceeds the
    largest singular value, so an estimate that lags a fast-moving weight lets the
    normalised weight's norm pass ``coeff``: each step iterates until the estimate settles.
    """

    def __init__(self, a: int, b: int, coeff: float) -> None:
        super().__init__(a, b)
        self.coeff = coeff
        gen = torch.Generator().manual_seed(a * 7919 + b)
        self.register_buffer("u", nn.functional.normalize(torch.randn(b, generator=gen), dim=0))
        self.register_buffer("v", nn.functional.normalize(torch.randn(a, generator=gen), dim=0))

    @torch.no_grad()
    def power_iteration(self, n: int | None = None) -> None:
        """``n`` iterations; ``None``: until the estimate changes by at most
        :data:`SPECTRAL_RTOL` of itself (at most :data:`SPECTRAL_MAX_ITERATIONS`)."""
        previous = float(self.u @ self.weight @ self.v) if n is None else 0.0
        for _ in range(SPECTRAL_MAX_ITERATIONS if n is None else n):
            # a zero weight (the last layer at initialisation) maps the vectors to zero;
            # they are kept as they are then, so the estimate recovers once it grows
            for out, mat, vec in ((self.v, self.weight.T, self.u), (self.u, self.weight, self.v)):
                step = mat @ vec
                norm = step.norm()
                if norm > 1e-12:
                    out.copy_(step / norm)
            if n is None:
                sigma = float(self.u @ self.weight @ self.v)
                if abs(sigma - previous) <= SPECTRAL_RTOL * abs(sigma):
                    return
                previous = sigma

    @torch.no_grad()
    def settle(self) -> None:
        """Set ``u``, ``v`` to the weight's exact top singular vectors (an SVD), so that the
        normalised weight's spectral norm is at most ``coeff`` to rounding."""
        left, _, right = torch.linalg.svd(self.weight.double(), full_matrices=False)
        u, v = left[:, 0], right[0]
        self.u.copy_(u.to(self.u.dtype))
        self.v.copy_(v.to(self.v.dtype))

    def train(self, mode: bool = True) -> SpectralLinear:
        """Switching to eval mode first settles the spectral norm exactly on the weight as it
        is now (:meth:`settle`: the last step's update came after its power iteration, which
        converges slowly when the top singular values are close), so a layer that is
        evaluated, kept as the best state or exported, wherever it sits, holds its norm at
        most ``coeff``."""
        if not mode:
            self.settle()
        return super().train(mode)

    def normalized_weight(self) -> Tensor:
        sigma = self.u @ self.weight @ self.v
        return self.weight / torch.clamp(sigma.abs() / self.coeff, min=1.0)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.normalized_weight(), self.bias)


class LipSwish(nn.Module):
    """``x sigmoid(beta x) / 1.1`` with ``beta = softplus(p) > 0``: 1-Lipschitz (Chen et al.
    2019, sec. 4), smooth, with its derivative for forward-mode products."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_beta = nn.Parameter(torch.tensor(0.5413))  # softplus(0.5413) = 1

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(nn.functional.softplus(self.raw_beta) * x) / 1.1

    def derivative(self, x: Tensor) -> Tensor:
        beta = nn.functional.softplus(self.raw_beta)
        s = torch.sigmoid(beta * x)
        return (s + beta * x * s * (1 - s)) / 1.1


class ResidualBlock(Transform):
    """``y = x + g(x)``, ``Lip(g) <= coeff^(hidden_layers + 1)`` (module docstring).

    Args:
        dim: features ``D``.
        hidden: width of ``g``'s hidden layers.
        layers: hidden layers of ``g``.
        coeff: the Lipschitz coefficient of each layer, in ``(0, 1)``.
        iterations: fixed-point iterations of the exported inverse.
        context_features: a conditional block's context width: ``U c`` (an unconstrained
            linear map) joins the first layer's pre-activation, so ``g(x, c)`` stays
            ``coeff^(layers + 1)``-Lipschitz in ``x`` for every ``c`` (0: unconditional).
    """

    def __init__(self, dim: int, hidden: int, layers: int, coeff: float,
                 iterations: int, context_features: int = 0) -> None:
        super().__init__()
        widths = [dim] + [hidden] * layers + [dim]
        self.linears = nn.ModuleList(SpectralLinear(a, b, coeff)
                                     for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.conditional = context_features > 0
        self.context_in = nn.Linear(context_features, widths[1]) if context_features else None
        self.activations = nn.ModuleList(LipSwish() for _ in range(layers))
        nn.init.zeros_(self.linears[-1].weight)  # g = 0: the block starts as the identity
        nn.init.zeros_(self.linears[-1].bias)
        self.iterations = iterations
        self.fixed_iterations = False  # True in the export copy: no data-dependent loop

    def _shift(self, layer: int, context: Tensor | None) -> Tensor | float:
        """What the context adds to layer ``layer``'s pre-activation (the first layer only)."""
        if layer or self.context_in is None:
            return 0.0
        if context is None:
            raise ValueError("this residual block is conditional: it needs a context")
        return self.context_in(context)

    def g(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        for i, (linear, act) in enumerate(zip(self.linears[:-1], self.activations,
                                              strict=True)):
            x = act(linear(x) + self._shift(i, context))
        return self.linears[-1](x)

    def jacobian(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``g(x): (batch, D)`` and ``J[b, i, j] = d g_j / d x_i`` by ``D`` forward-mode JVPs
        (basis tangents pushed through every layer together, explicit arithmetic)."""
        d = x.shape[-1]
        tangent = torch.eye(d, dtype=x.dtype, device=x.device)[None]  # (1, D, D)
        h = x
        for i, (linear, act) in enumerate(zip(self.linears[:-1], self.activations,
                                              strict=True)):
            w = linear.normalized_weight()
            pre = nn.functional.linear(h, w, linear.bias) + self._shift(i, context)
            tangent = act.derivative(pre)[:, None, :] * (tangent @ w.T)
            h = act(pre)
        last = self.linears[-1]
        w = last.normalized_weight()
        return nn.functional.linear(h, w, last.bias), tangent @ w.T

    def series_log_det(self, x: Tensor, probe: Tensor, terms: int,
                       context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(g(x), sum_{k <= terms} (-1)^(k+1) e^T J^k e / k)``: the cut power series of
        ``log det(I + J)`` with Hutchinson's traces, ``x, probe: (batch, D)`` -> ``(batch,
        D), (batch,)``. ``J^k e`` by ``terms`` forward-mode products (explicit arithmetic:
        the layers' slopes at ``x`` reused by every product)."""
        slopes, weights, h = [], [], x
        for i, (linear, act) in enumerate(zip(self.linears[:-1], self.activations,
                                              strict=True)):
            w = linear.normalized_weight()
            pre = nn.functional.linear(h, w, linear.bias) + self._shift(i, context)
            slopes.append(act.derivative(pre))
            weights.append(w)
            h = act(pre)
        last = self.linears[-1]
        w_last = last.normalized_weight()
        estimate, tangent = x.new_zeros(x.shape[0]), probe
        for k in range(1, terms + 1):
            for slope, w in zip(slopes, weights, strict=True):
                tangent = slope * (tangent @ w.T)
            tangent = tangent @ w_last.T  # J^k e
            estimate = estimate + ((-1) ** (k + 1) / k) * (tangent * probe).sum(-1)
        return nn.functional.linear(h, w_last, last.bias), estimate

    def lipschitz_bound(self) -> float:
        """``prod_l ||W_l||_2`` of the normalised weights (LipSwish is 1-Lipschitz): an upper
        bound on ``Lip(g)`` from exact spectral norms, not the power-iteration estimates."""
        bound = 1.0
        with torch.no_grad():
            for linear in self.linears:
                w = linear.normalized_weight().double()
                bound *= float(torch.linalg.matrix_norm(w, 2))
        return bound

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        gx, jac = self.jacobian(x, context)
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        return x + gx, torch.log(torch.linalg.det(eye + jac))

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        x = y - self.g(y, context)
        if self.fixed_iterations:
            for _ in range(self.iterations - 1):
                x = y - self.g(x, context)
            return x
        # to a few units in the last place (a contraction converges there; rounding may
        # leave it oscillating within that band, hence the iteration cap)
        tol = 4 * torch.finfo(y.dtype).eps * max(1.0, float(y.detach().abs().max()))
        for _ in range(max(10 * self.iterations, 1000)):
            step = y - self.g(x, context)
            change = float((step - x).detach().abs().max())
            x = step
            if change <= tol:
                break
        return x

    def frozen(self) -> ResidualBlock:
        """The export copy: the same weights (and spectral-norm estimates, so its log-det is
        the eager one), and an inverse of exactly ``iterations`` unrolled steps."""
        frozen = copy.deepcopy(self)
        frozen.fixed_iterations = True
        return frozen

    def power_iteration(self) -> None:
        for linear in self.linears:
            linear.power_iteration()

    def log_det_estimate(self, x: Tensor, probe: Tensor, terms: int,
                         survival: Tensor, context: Tensor | None = None,
                         ) -> tuple[Tensor, Tensor]:
        """``(g(x), estimate of log det(I + J))`` by the roulette power series (value) and the
        Neumann gradient series (gradient); ``probe: (batch, D)``, ``survival[k - 1] =
        P(N >= k)`` for ``k = 1 .. terms``."""
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            gx = self.g(x, context)
            powers, r = [], probe  # r_k = e^T J^k, by vector-Jacobian products
            for _ in range(terms):
                r = torch.autograd.grad(gx, x, r, retain_graph=True)[0].detach()
                powers.append(r)
        value = sum(((-1) ** (k + 1) / k / survival[k - 1]) * (r * probe).sum(-1)
                    for k, r in enumerate(powers, start=1))
        neumann = probe + sum(((-1) ** k / survival[k]) * r
                              for k, r in enumerate(powers[:-1], start=1)) \
            if terms > 1 else probe
        vjp = torch.autograd.grad(gx, x, neumann.detach(), create_graph=True)[0]
        surrogate = (vjp * probe).sum(-1)
        return gx, value.detach() + surrogate - surrogate.detach()


class ResidualFlow(Flow):
    """Residual blocks with ActNorm between them over a standard normal base.

    ``log_prob`` is exact (``D`` JVPs + Det per block); ``training_loss`` uses the unbiased
    Russian-roulette log-det with the Neumann gradient series, and runs one power iteration
    per spectral norm first. Above :data:`EXACT_MAX_DIM` dimensions the exported
    ``log_prob`` is :meth:`series_log_prob` (module docstring).

    Args:
        dim: features ``D``.
        transforms: the steps, in the data -> noise order.
        series_terms: power-series terms of the served log-det above ``EXACT_MAX_DIM``.

    Example:
        >>> flow = build_resflow(80, ModelConfig(transforms=1, hidden_features=16))
        >>> u, e = torch.randn(4, 80), torch.randn(4, 80)
        >>> flow.series_log_prob(u, e).shape
        torch.Size([4])
    """

    def __init__(self, dim: int, transforms: Iterable[Transform], series_terms: int,
                 context_features: int = 0) -> None:
        super().__init__(dim, transforms, context_features)
        self.series_terms = series_terms

    @property
    def serves_exact_log_det(self) -> bool:
        return self.dim <= EXACT_MAX_DIM

    def series_log_prob(self, u: Tensor, probe: Tensor) -> Tensor:
        """One probe's estimate of ``log p(u)``: the cut series per residual block with the
        same probe ``e`` in every block (each block's estimate is unbiased for its cut series
        whatever the others draw). ``u, probe: (batch, D)`` -> ``(batch,)``."""
        ladj = u.new_zeros(u.shape[0])
        for transform in self.transforms:
            if isinstance(transform, ResidualBlock):
                gx, step = transform.series_log_det(u, probe, self.series_terms)
                u = u + gx
            else:
                u, step = transform(u)
            ladj = ladj + step
        return standard_normal_log_prob(u) + ladj

    def export_graphs(self) -> dict[str, ExportGraph]:
        """Exact dims: the flow's ``log_prob(u)`` and ``sample(z)``; above, ``log_prob(u,
        probe)`` answers one probe's estimate per row (the service replicates each row once
        per probe)."""
        if self.serves_exact_log_det:
            return super().export_graphs()
        frozen, u = self.frozen(), spec("u", self.dim)
        return {"log_prob": ExportGraph(ProbeLogProbGraph(frozen), [u, spec("probe", self.dim)],
                                        [spec("log_prob", None)]),
                "sample": ExportGraph(SampleGraph(frozen), [spec("z", self.dim)], [u])}

    def serving_defaults(self) -> Defaults:
        return Defaults(method="exact" if self.serves_exact_log_det else "hutchinson")

    def log_det_spec(self) -> LogDetSpec | None:
        """The served series' terms, Lipschitz bounds and truncation bound (none: exact)."""
        if self.serves_exact_log_det:
            return None
        bounds = [t.lipschitz_bound() for t in self.transforms if isinstance(t, ResidualBlock)]
        return LogDetSpec(terms=self.series_terms, lipschitz=bounds, truncation_bound=sum(
            series_truncation_bound(self.dim, b, self.series_terms) for b in bounds))

    def _roulette(self, generator: torch.Generator | None, like: Tensor) -> tuple[int, Tensor]:
        extra = 0
        while float(torch.rand((), generator=generator)) < 0.5:
            extra += 1
        terms = ROULETTE_EXACT_TERMS + extra
        k = torch.arange(1, terms + 1, dtype=like.dtype, device=like.device)
        return terms, 0.5 ** (k - ROULETTE_EXACT_TERMS).clamp(min=0)

    def estimated_log_prob(self, x: Tensor, generator: torch.Generator | None = None,
                           context: Tensor | None = None) -> Tensor:
        """Unbiased ``log p(x)`` (``| context``) estimate: roulette log-det per residual
        block."""
        ladj = x.new_zeros(len(x))
        for transform in self.transforms:
            if isinstance(transform, ResidualBlock):
                probe = torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                    device=x.device)
                terms, survival = self._roulette(generator, x)
                gx, step = transform.log_det_estimate(x, probe, terms, survival, context)
                x = x + gx
            else:
                x, step = transform(x)
            ladj = ladj + step
        return standard_normal_log_prob(x) + ladj

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None,
                      context: Tensor | None = None) -> Tensor:
        if self.training:
            for transform in self.transforms:
                if isinstance(transform, ResidualBlock):
                    transform.power_iteration()
        return -self.estimated_log_prob(x, generator, context).mean()

    def inversion_residual(self, z: Tensor, context: Tensor | None = None) -> float:
        """``max |f(f^-1(z)) - z|`` of the export copy (fixed iterations), ``z: (n, dim)``
        (given ``context: (n, C)`` for a conditional flow)."""
        frozen, given = self.frozen(), {} if context is None else {"context": context}
        with torch.no_grad():
            return float((frozen(frozen.inverse(z, **given), **given)[0] - z).abs().max())


def series_truncation_bound(dim: int, lipschitz: float, terms: int) -> float:
    """``D L^(n+1) / ((n+1) (1 - L))`` nats, ``n = terms``: at least ``|sum_{k > n} (-1)^(k+1)
    tr(J^k) / k|`` when ``||J|| <= L < 1`` (``|tr(J^k)| <= D L^k``, the tail bounded by a
    geometric series)."""
    if not 0 <= lipschitz < 1:
        raise ValueError(f"the series converges for a Lipschitz bound in [0, 1); got "
                         f"{lipschitz}")
    return dim * lipschitz ** (terms + 1) / ((terms + 1) * (1 - lipschitz))


def build_resflow(dim: int, cfg: ModelConfig) -> ResidualFlow:
    """``cfg.transforms`` residual blocks (``cfg.hidden_layers`` hidden layers of
    ``cfg.hidden_features``, Lipschitz coefficient ``cfg.lipschitz``), ActNorm before each;
    ``cfg.series_terms`` terms of the served log-det above ``EXACT_MAX_DIM``."""
    if cfg.context_features and dim > EXACT_MAX_DIM:
        raise ValueError(f"a conditional resflow serves its exact log-det, so up to "
                         f"{EXACT_MAX_DIM} dims; got dim={dim}")
    steps: list[Transform] = []
    for _ in range(cfg.transforms):
        steps += [ActNorm(dim), ResidualBlock(dim, cfg.hidden_features, cfg.hidden_layers,
                                              cfg.lipschitz, cfg.fixed_point_iterations,
                                              cfg.context_features)]
    return ResidualFlow(dim, steps, cfg.series_terms, cfg.context_features)
