"""Riemannian manifolds of Riemannian flow matching, for numpy arrays and torch tensors.

Two manifolds (Chen & Lipman, "Flow matching on general geometries", 2024), both with closed
form geodesics, so the conditional paths are geodesic interpolants:

* :class:`Sphere` ``S^(d-1)``: rows are unit vectors in ``R^d``; the tangent space at ``x`` is
  ``{v : x . v = 0}`` with projection ``P_x v = v - (x . v) x``; the exponential map is
  ``exp_x(v) = cos|v| x + sin|v| v / |v|``.
* :class:`Torus` ``T^d``, flat: rows are ``d`` angles in ``[-pi, pi)``; the tangent space is
  ``R^d``, geodesics are straight lines wrapped modulo ``2 pi``.

Every method is array arithmetic on ``(batch, d)`` arrays (``numerics.arrays``); the same code
serves training (torch) and serving (numpy over the exported graphs). ``retract`` puts a point
back on the manifold after an ODE step (normalise on the sphere, wrap on the torus), which
:func:`numerics.solvers.integrate` applies after every step.

Example:
    >>> import numpy as np
    >>> s = Sphere()
    >>> x = np.array([[1.0, 0.0, 0.0]]); z = np.array([[0.0, 1.0, 0.0]])
    >>> x_t, u_t = s.geodesic(x, z, np.array([0.5]))
    >>> bool(np.allclose(x_t, [[2 ** -0.5, 2 ** -0.5, 0.0]])), bool(np.allclose(u_t @ x_t.T, 0))
    (True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from numerics.arrays import Array, array_namespace

__all__ = ["MANIFOLDS", "Manifold", "Sphere", "Torus", "manifold"]


class Manifold:
    """What a manifold provides to the flow-matching model, its solver and its service."""

    name: ClassVar[str]
    tolerance: float
    """How far a served row may lie from the manifold (see :meth:`off_manifold`)."""

    def retract(self, x: Array) -> Array:
        """The nearest point of the manifold (a retraction after an ODE step)."""
        raise NotImplementedError

    def to_tangent(self, x: Array, v: Array) -> Array:
        """``v`` projected onto the tangent space at ``x``."""
        raise NotImplementedError

    def geodesic(self, x0: Array, x1: Array, t: Array) -> tuple[Array, Array]:
        """``(x_t, d/dt x_t)`` on the geodesic from ``x0`` (``t = 0``) to ``x1`` (``t = 1``);
        ``t: (batch,)``."""
        raise NotImplementedError

    def log_volume(self, dim: int) -> float:
        """``log vol(M)`` of the manifold whose rows have ``dim`` values: the uniform base's
        log-density is its negative."""
        raise NotImplementedError

    def uniform_from_normal(self, z: Array) -> Array:
        """Uniform points from standard normal rows ``z: (batch, dim)`` (seeded outside)."""
        raise NotImplementedError

    def off_manifold(self, x: np.ndarray) -> np.ndarray:
        """``(batch,)`` how far each row is from the manifold, in the units of the
        tolerance."""
        raise NotImplementedError

    def describe(self, dim: int) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Sphere(Manifold):
    """The unit sphere ``S^(d-1)`` in ``R^d``; a row must have norm ``1 +- tolerance``."""

    name: ClassVar[str] = "sphere"
    tolerance: float = 1e-4

    def retract(self, x: Array) -> Array:
        xp = array_namespace(x)
        return x / xp.sqrt((x * x).sum(-1, keepdims=True))

    def to_tangent(self, x: Array, v: Array) -> Array:
        return v - (x * v).sum(-1, keepdims=True) * x

    def geodesic(self, x0: Array, x1: Array, t: Array) -> tuple[Array, Array]:
        """Spherical interpolation ``x_t = (sin((1-t) th) x0 + sin(t th) x1) / sin th``,
        ``th = arccos(x0 . x1)``; antipodal pairs (measure zero) fall back to a tiny angle's
        limit, which the caller never meets with continuous data."""
        xp = array_namespace(x0)
        cos = (x0 * x1).sum(-1, keepdims=True).clip(-1.0 + 1e-7, 1.0 - 1e-7)
        theta = xp.arccos(cos)
        s = t[:, None]
        sin = xp.sin(theta)
        x_t = (xp.sin((1 - s) * theta) * x0 + xp.sin(s * theta) * x1) / sin
        u_t = theta * (xp.cos(s * theta) * x1 - xp.cos((1 - s) * theta) * x0) / sin
        return x_t, u_t

    def log_volume(self, dim: int) -> float:
        """``log(2 pi^(d/2) / Gamma(d/2))`` for ``S^(d-1)`` in ``R^d`` (``4 pi`` for S^2)."""
        return math.log(2.0) + 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim)

    def uniform_from_normal(self, z: Array) -> Array:
        return self.retract(z)

    def off_manifold(self, x: np.ndarray) -> np.ndarray:
        return np.abs(np.sqrt((x * x).sum(-1)) - 1.0)

    def describe(self, dim: int) -> str:
        return f"the sphere S^{dim - 1}: unit norm within {self.tolerance:g}"


@dataclass(frozen=True)
class Torus(Manifold):
    """The flat torus ``T^d``: rows of ``d`` angles in ``[-pi, pi]`` (``+- tolerance``)."""

    name: ClassVar[str] = "torus"
    tolerance: float = 1e-4

    def retract(self, x: Array) -> Array:
        """Angles wrapped into ``[-pi, pi)``."""
        return (x + math.pi) % (2 * math.pi) - math.pi

    def to_tangent(self, x: Array, v: Array) -> Array:
        return v

    def geodesic(self, x0: Array, x1: Array, t: Array) -> tuple[Array, Array]:
        """The shortest wrapped line: ``x_t = wrap(x0 + t wrap(x1 - x0))``, speed constant."""
        u = self.retract(x1 - x0)
        return self.retract(x0 + t[:, None] * u), u

    def log_volume(self, dim: int) -> float:
        return dim * math.log(2 * math.pi)

    def uniform_from_normal(self, z: Array) -> Array:
        """``2 pi Phi(z) - pi`` per coordinate: uniform angles from normal draws."""
        xp = array_namespace(z)
        erf = getattr(xp, "erf", None)
        if erf is None:  # numpy has no erf: the math module's, elementwise
            erf = np.vectorize(math.erf)
        return math.pi * erf(z / math.sqrt(2.0))

    def off_manifold(self, x: np.ndarray) -> np.ndarray:
        return (np.abs(x) - math.pi).clip(min=0.0).max(-1)

    def describe(self, dim: int) -> str:
        return f"the torus T^{dim}: angles in [-pi, pi] within {self.tolerance:g}"


MANIFOLDS: dict[str, type[Manifold]] = {"sphere": Sphere, "torus": Torus}


def manifold(name: str, tolerance: float = 1e-4) -> Manifold:
    """The manifold ``name`` (``"sphere"`` or ``"torus"``) with a served-row tolerance."""
    if name not in MANIFOLDS:
        raise ValueError(f"unknown manifold {name!r}; choose one of {', '.join(MANIFOLDS)}")
    return MANIFOLDS[name](tolerance=tolerance)
