r"""Riemannian flow matching on the sphere and the flat torus; family ``"rfm"``.

Chen & Lipman, "Flow matching on general geometries" (ICLR 2024). The conditional path from a
data point ``x_0`` (``t = 0``) to a uniform draw ``z`` of the manifold (``t = 1``) is the
geodesic between them (``numerics.manifolds``), and the Riemannian CFM loss regresses a
tangent field onto its velocity, ``E |v(x_t, t) - d/dt x_t|^2`` (their eq. 9 with the
geodesic premetric; the metric of both manifolds is the Euclidean one of their embedding).

The field is tangent by construction and written so that its ambient divergence is its
Riemannian divergence, which the shared likelihood integrates:

* sphere: ``V(y) = P_u f(u, t)`` at ``u = y / |y|``, ``f`` an MLP on ``R^d``. ``V`` is
  constant along rays, so on the sphere ``tr J_V = tr(P J_f P)``, the Riemannian divergence.
* torus: ``v_j = -sin(th_j) a_j + cos(th_j) b_j`` with ``(a, b) = f(cos th, sin th, t)``: an
  ambient field on the product of circles projected onto each circle's tangent, in angle
  coordinates (periodic, and any smooth periodic field has this form); the torus is flat, so
  ``div v = sum_j dv_j / dth_j``.

Both derivatives are pushed forward by hand (``TimeMLP.forward_mode``), so the exported
``velocity_div`` / ``velocity_jvp`` graphs need no autograd. Sampling integrates from the
uniform base at ``t = 1`` to ``t = 0`` with a retraction after every step; the log-likelihood
is ``-log vol(M) + int_0^1 div v dt`` (the uniform base's log-volume counted).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from artifact.manifest import Defaults, ManifoldSpec
from numerics.manifolds import Manifold, Sphere, manifold
from training.config import ModelConfig
from training.nets import TimeMLP, VelocityModel, conditioned, given

__all__ = ["RiemannianFlowMatching", "build_rfm"]


class RiemannianFlowMatching(VelocityModel):
    """A tangent field on ``manifold`` trained by Riemannian conditional flow matching.

    Arguments:
        dim: values per row (``d`` for ``S^(d-1)`` in ``R^d``; ``d`` angles for ``T^d``).
        net: a :class:`training.nets.TimeMLP` on ``R^d`` (sphere) or ``R^(2d)`` (torus).
        manifold: a ``numerics.manifolds`` manifold.

    Example:
        >>> model = build_rfm(3, ModelConfig(hidden_features=16, manifold="sphere"))
        >>> x = model.sample(4, steps=4)
        >>> bool(torch.allclose(x.norm(dim=1), torch.ones(4), atol=1e-6))
        True
    """

    family = "rfm"
    ode_name = "Riemannian flow-matching ODE"

    def __init__(self, dim: int, net: TimeMLP, manifold: Manifold) -> None:
        super().__init__()
        self.kind, self.dim, self.t_min = "rfm", dim, 0.0
        self.net, self.manifold = net, manifold

    # -- the field and its forward-mode derivatives ----------------------------------------
    def _field(self, x: Tensor, t: Tensor, tangents: Tensor | None,
               context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``v: (batch, D)`` and the pushed-forward ``tangents: (batch or 1, K, D)`` ->
        ``(batch, K, D)`` (empty, and the network run once, when ``tangents`` is None); a
        conditional model's network also sees each row's ``context: (batch, C)``."""
        c = given(context)
        if isinstance(self.manifold, Sphere):
            r = x.norm(dim=-1, keepdim=True)
            u = x / r
            if tangents is None:
                f = self.net(u, t, *c)
                return f - (u * f).sum(-1, keepdim=True) * u, f[:, None, :0]
            du = (tangents - (tangents * u[:, None]).sum(-1, keepdim=True) * u[:, None]) \
                / r[:, None]
            f, df = self.net.forward_mode(u, t, du, *c)
            uf = (u * f).sum(-1, keepdim=True)
            v = f - uf * u
            dv = df - du * uf[:, None] - u[:, None] * ((du * f[:, None]).sum(-1, keepdim=True)
                                                      + (u[:, None] * df).sum(-1, keepdim=True))
            return v, dv
        cos, sin = torch.cos(x), torch.sin(x)
        if tangents is None:
            out = self.net(torch.cat([cos, sin], -1), t, *c)
            v = -sin * out[:, : self.dim] + cos * out[:, self.dim:]
            return v, v[:, None, :0]
        tangent_in = torch.cat([-sin[:, None] * tangents, cos[:, None] * tangents], -1)
        out, dout = self.net.forward_mode(torch.cat([cos, sin], -1), t, tangent_in, *c)
        a, b = out[:, : self.dim], out[:, self.dim:]
        da, db = dout[..., : self.dim], dout[..., self.dim:]
        v = -sin * a + cos * b
        dv = (-cos[:, None] * tangents * a[:, None] - sin[:, None] * da
              - sin[:, None] * tangents * b[:, None] + cos[:, None] * db)
        return v, dv

    def velocity(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        """The tangent field ``(batch, D)`` at ``x: (batch, D)``, ``t: (batch,)`` (given
        ``context``)."""
        return self._field(x, t, None, context)[0]

    def velocity_div(self, x: Tensor, t: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v, div v)``; the Riemannian divergence on the manifold, exact, forward-mode."""
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        v, jac = self._field(x, t, eye[None], context)
        return v, (jac * eye).sum(dim=(-2, -1))

    def velocity_jvp(self, x: Tensor, t: Tensor, e: Tensor,
                     context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(v, (dv/dx) e)``, both ``(batch, D)``."""
        v, jv = self._field(x, t, e[:, None, :], context)
        return v, jv[:, 0, :]

    # -- training ------------------------------------------------------------------------------
    def training_loss(self, x: Tensor, generator: torch.Generator | None = None,
                      context: Tensor | None = None) -> Tensor:
        """Riemannian CFM: ``E |v(x_t, t) - u_t|^2`` on geodesics from data to uniform noise
        (a conditional model's ``context`` dropped to the null token with probability
        ``cfg_dropout``). A guided field stays tangent: it combines two tangent vectors."""
        z = self.manifold.uniform_from_normal(
            torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device))
        t = torch.rand(len(x), generator=generator, dtype=x.dtype, device=x.device)
        x_t, u_t = self.manifold.geodesic(self.manifold.retract(x), z, t)
        v = self.velocity(x_t, t, self.dropped(context, generator))
        return (v - u_t).square().mean()

    # -- sampling and likelihood ------------------------------------------------------------
    def noise(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``(n, D)`` uniform draws of the manifold, the base at ``t = 1``."""
        return self.manifold.uniform_from_normal(super().noise(n, generator))

    def retraction(self) -> Callable[[Tensor], Tensor]:
        return self.manifold.retract

    def base_log_prob(self) -> Callable[[Tensor], Tensor]:
        """The uniform base: ``-log vol(M)`` for every row."""
        log_vol = self.manifold.log_volume(self.dim)
        return lambda z: z.new_full(z.shape[:1], -log_vol)

    def manifold_spec(self) -> ManifoldSpec:
        return ManifoldSpec(name=self.manifold.name, tolerance=self.manifold.tolerance)

    def serving_defaults(self) -> Defaults:
        return Defaults(solver="rk4", steps=16, method=self.likelihood_method)

    def sample(self, n: int, generator: torch.Generator | None = None, steps: int | None = 32,
               solver: str = "rk4", context: Tensor | None = None,
               guidance: float | None = None) -> Tensor:
        """``(n, D)`` points of the manifold: the ODE from uniform noise at ``t = 1`` (given
        ``context: (n, C)``, guided with weight ``guidance``)."""
        return self.transport(self.noise(n, generator), steps=steps, solver=solver,
                              context=context, guidance=guidance)


def build_rfm(dim: int, cfg: ModelConfig) -> RiemannianFlowMatching:
    """Untrained RFM on ``cfg.manifold`` (``sphere``: rows in ``R^dim`` of unit norm; ``torus``:
    ``dim`` angles) with an MLP; ``cfg.manifold_tolerance`` is the served rows' tolerance."""
    if cfg.manifold is None:
        raise ValueError("rfm needs --manifold sphere or --manifold torus")
    m = manifold(cfg.manifold, cfg.manifold_tolerance)
    if isinstance(m, Sphere) and dim < 2:
        raise ValueError(f"a sphere needs rows of at least 2 values, got dim={dim}")
    width = dim if isinstance(m, Sphere) else 2 * dim
    net = TimeMLP(width, cfg.hidden_features, cfg.hidden_layers, cfg.time_embedding,
                  cfg.context_features)
    return conditioned(RiemannianFlowMatching(dim, net, m), cfg)
