"""ODE solvers over a velocity callable, written once for numpy arrays and torch tensors.

A solver knows only ``velocity(x, t) -> v`` with ``x: (batch, dim)``, ``t: (batch,)`` (one
time per row, even when all rows share it) and ``v: (batch, dim)``. It never sees a network,
a probability path or a noise schedule. Time convention of the project: ``t = 0`` is data,
``t = 1`` is noise; integrating ``t0 > t1`` (noise -> data) uses negative steps.

The same code runs on ``numpy.ndarray`` (the service, over ONNX graphs) and on
``torch.Tensor`` (training): functions come from :func:`numerics.arrays.array_namespace`,
which never imports torch itself. With torch tensors the solvers run under
``torch.no_grad()`` unless ``integrate(..., differentiable=True)`` (maximum-likelihood
training through the ODE).

Batch independence: a row's result never depends on the other rows of the batch. Fixed-step
methods get this for free; :func:`integrate` with ``method="dopri5"`` keeps a time, a step
size, an error norm and an accept/reject decision per row (masks as arithmetic), so each
row takes exactly the steps it would take alone.

Example:
    >>> import numpy as np
    >>> x0 = np.ones((4, 2))
    >>> sol = integrate(lambda x, t: -x, x0, 0.0, 1.0, method="dopri5", rtol=1e-8, atol=1e-8)
    >>> bool(np.allclose(sol.x, np.exp(-1.0), atol=1e-6))
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from numerics.arrays import Array, array_namespace, no_grad, to_numpy
from numerics.schedules import rho_grid

__all__ = [
    "DEFAULT_STEPS",
    "SOLVERS",
    "Solution",
    "Trajectory",
    "Velocity",
    "integrate",
    "trajectory",
]

Velocity = Callable[[Array, Array], Array]
"""``velocity(x: (batch, dim), t: (batch,)) -> (batch, dim)``."""

SOLVERS: tuple[str, ...] = ("euler", "heun", "midpoint", "rk4", "dopri5")
DEFAULT_STEPS = 100
"""Steps taken by a fixed-step method when ``steps`` is not given."""


@dataclass(frozen=True)
class Solution:
    """Result of :func:`integrate`.

    Attributes:
        x: final state ``(batch, dim)``, same array type as the input.
        nfe: number of velocity calls (each call evaluates the whole batch).
        steps: accepted steps per row ``(batch,)`` (int) for ``dopri5``; ``None`` for
            fixed-step methods, which take exactly ``steps`` steps on every row.
    """

    x: Array
    nfe: int
    steps: np.ndarray | None


@dataclass(frozen=True)
class Trajectory:
    """Result of :func:`trajectory`.

    Attributes:
        times: ``(T,)`` the requested output times (numpy, float).
        states: ``(T, batch, dim)`` the state at each output time; ``states[0]`` is ``x``.
        nfe: number of velocity calls over the whole trajectory.
        steps: accepted steps per row ``(batch,)`` for ``dopri5``, else ``None``.
    """

    times: np.ndarray
    states: Array
    nfe: int
    steps: np.ndarray | None


def _rows(x: Array, value: float) -> Array:
    """A ``(batch,)`` array filled with ``value``, matching ``x``'s type, dtype, device."""
    return array_namespace(x).zeros_like(x[:, 0]) + value


# --- fixed-step methods: x_{n+1} = step(f, x_n, t_n, h) with t_n: (batch,), h: float --------


def _euler(f: Velocity, x: Array, t: Array, h: float) -> Array:
    return x + h * f(x, t)


def _midpoint(f: Velocity, x: Array, t: Array, h: float) -> Array:
    k1 = f(x, t)
    return x + h * f(x + 0.5 * h * k1, t + 0.5 * h)


def _heun(f: Velocity, x: Array, t: Array, h: float) -> Array:
    k1 = f(x, t)
    k2 = f(x + h * k1, t + h)
    return x + 0.5 * h * (k1 + k2)


def _rk4(f: Velocity, x: Array, t: Array, h: float) -> Array:
    k1 = f(x, t)
    k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = f(x + h * k3, t + h)
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


_FIXED: dict[str, tuple[Callable[[Velocity, Array, Array, float], Array], int]] = {
    "euler": (_euler, 1),
    "midpoint": (_midpoint, 2),
    "heun": (_heun, 2),
    "rk4": (_rk4, 4),
}


def _fixed_solve(method: str, f: Velocity, x: Array, grid: np.ndarray,
                 retract: Callable[[Array], Array] | None = None) -> tuple[Array, int]:
    step, calls = _FIXED[method]
    for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
        x = step(f, x, _rows(x, float(t_now)), float(t_next - t_now))
        if retract is not None:
            x = retract(x)
    return x, calls * (len(grid) - 1)


# --- Dormand-Prince 5(4) (Dormand & Prince 1980; Hairer, Norsett & Wanner, Solving ODEs I,
# section II.5, table 5.2), first-same-as-last, per-row step size control -------------------

_DP_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_DP_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),  # = 5th-order weights
)
# 5th-order weights minus the embedded 4th-order weights: the local error estimate.
_DP_E = (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40)
_SAFETY, _FAC_MIN, _FAC_MAX = 0.9, 0.2, 10.0


def _combine(x: Array, h: Array, weights: Sequence[float], ks: Sequence[Array]) -> Array:
    """``x + h * sum_j w_j k_j`` with per-row ``h: (batch,)``; zero weights skipped."""
    acc = sum(w * k for w, k in zip(weights, ks, strict=False) if w != 0.0)
    return x + h[:, None] * acc


def _rms(a: Array) -> Array:
    """Root-mean-square over the last axis: ``(batch, dim) -> (batch,)``."""
    return array_namespace(a).sqrt((a * a).mean(-1))


def _dopri5_step(f: Velocity, x: Array, t: Array, h: Array, k1: Array) -> tuple[Array, ...]:
    """One attempted step of signed per-row size ``h``; returns (x5, k7, error estimate)."""
    ks = [k1]
    for c, a in zip(_DP_C[1:], _DP_A[1:], strict=True):
        ks.append(f(_combine(x, h, a, ks), t + c * h))
    x5 = _combine(x, h, _DP_A[-1], ks)  # the last stage is evaluated at x5 (FSAL)
    err = h[:, None] * sum(e * k for e, k in zip(_DP_E, ks, strict=True) if e != 0.0)
    return x5, ks[-1], err


def _constant(a: Array) -> Array:
    """``a`` cut from autograd (tensors) or as it is (numpy): step sizes are control, not
    part of the differentiated computation (direct backprop differentiates the steps taken)."""
    return a.detach() if hasattr(a, "detach") else a


def _initial_step(
    f: Velocity,
    x: Array,
    t: Array,
    k1: Array,
    direction: float,
    span: float,
    rtol: float,
    atol: float,
) -> Array:
    """Per-row starting step magnitude (Hairer, Norsett & Wanner I, section II.4); 1 call."""
    xp = array_namespace(x)
    scale = atol + rtol * xp.abs(x)
    d0, d1 = _rms(x / scale), _rms(k1 / scale)
    h0 = xp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1.clip(min=1e-5))
    h0 = h0.clip(max=span)
    f1 = f(x + (direction * h0)[:, None] * k1, t + direction * h0)
    d2 = _rms((f1 - k1) / scale) / h0
    d12 = xp.maximum(d1, d2)
    h1 = xp.where(d12 <= 1e-15, (h0 * 1e-3).clip(min=1e-6), (0.01 / d12.clip(min=1e-15)) ** 0.2)
    return xp.minimum(100.0 * h0, h1).clip(max=span)


def _dopri5_solve(
    f: Velocity,
    x: Array,
    t0: float,
    t1: float,
    rtol: float,
    atol: float,
    max_steps: int,
    first_step: float | None,
    retract: Callable[[Array], Array] | None = None,
) -> tuple[Array, int, np.ndarray]:
    xp = array_namespace(x)
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    t = _rows(x, t0)
    k1 = f(x, t)
    nfe = 1
    if first_step is None:
        h = _constant(_initial_step(f, x, t, k1, direction, span, rtol, atol))
        nfe += 1
    else:
        h = _rows(x, min(abs(first_step), span))
    accepted = xp.zeros_like(t)
    done = t != t  # all False, right type and device
    tiny = 16 * np.finfo(np.float64).eps * max(abs(t0), abs(t1), 1.0)
    for _ in range(max_steps):
        remaining = direction * (t1 - t)
        last = h + tiny >= remaining  # finish now rather than leave a sliver for later
        h_abs = xp.where(done, 0.0, xp.where(last, remaining, h))
        if bool(((h < tiny) & ~done).any()):
            raise RuntimeError(
                f"dopri5 step size underflow near t={to_numpy(t[~done])[0]:.6g}: the velocity "
                "is non-finite or too stiff there; check the model or use a fixed-step method"
            )
        x5, k7, err = _dopri5_step(f, x, t, direction * h_abs, k1)
        nfe += 6
        if retract is not None:  # err is measured before: the retraction is not the step's
            x5 = retract(x5)
        scale = atol + rtol * xp.maximum(xp.abs(x), xp.abs(x5))
        err_norm = _rms(err / scale)
        accept = (err_norm <= 1.0) & ~done
        x = xp.where(accept[:, None], x5, x)
        k1 = xp.where(accept[:, None], k7, k1)
        t = xp.where(accept & last, t1, xp.where(accept, t + direction * h_abs, t))
        accepted = accepted + accept
        done = done | (accept & last)
        if bool(done.all()):
            return x, nfe, to_numpy(accepted).astype(np.int64)
        factor = (_SAFETY * _constant(err_norm).clip(min=1e-10) ** -0.2).clip(_FAC_MIN,
                                                                            _FAC_MAX)
        factor = xp.where(xp.isfinite(factor), factor, _FAC_MIN)  # non-finite error: shrink
        h = xp.where(done, h, h_abs * factor)
    raise RuntimeError(
        f"dopri5 did not reach t1={t1} within max_steps={max_steps} attempted steps "
        f"({int(to_numpy(~done).sum())} of {x.shape[0]} rows unfinished); loosen rtol/atol "
        "or raise max_steps"
    )


def _check(method: str, steps: int | None) -> int:
    if method not in SOLVERS:
        raise ValueError(f"unknown solver {method!r}; choose one of {', '.join(SOLVERS)}")
    n = DEFAULT_STEPS if steps is None else steps
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return int(n)


def integrate(
    velocity: Velocity,
    x: Array,
    t0: float,
    t1: float,
    *,
    method: str = "rk4",
    steps: int | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10000,
    differentiable: bool = False,
    rho: float | None = None,
    retract: Callable[[Array], Array] | None = None,
) -> Solution:
    """Solve ``dx/dt = velocity(x, t)`` from ``t0`` to ``t1`` (either direction).

    Args:
        velocity: ``velocity(x: (batch, dim), t: (batch,)) -> (batch, dim)``; must treat
            rows independently.
        x: initial state ``(batch, dim)`` at ``t0``, numpy array or torch tensor.
        t0, t1: start and end times; ``t0 > t1`` integrates backwards (noise -> data).
        method: one of :data:`SOLVERS`. ``euler`` (order 1, 1 call/step), ``midpoint`` and
            ``heun`` (order 2, 2 calls/step), ``rk4`` (order 4, 4 calls/step), ``dopri5``
            (adaptive Dormand-Prince 5(4), 6 calls/step with first-same-as-last).
        steps: number of uniform steps for fixed-step methods (default
            :data:`DEFAULT_STEPS`); for ``dopri5`` a hint: the first step is
            ``|t1 - t0| / steps`` (otherwise chosen per row at the cost of one extra call).
        rtol, atol: ``dopri5`` tolerances; a step is accepted on a row when the RMS over
            ``dim`` of ``err / (atol + rtol * max(|x|, |x_new|))`` is at most 1.
        max_steps: ``dopri5`` gives up (``RuntimeError``) after this many attempted steps.
        differentiable: keep autograd on (torch tensors): the result is differentiable
            through the steps taken (direct backprop; step sizes are held constant), for
            training by maximum likelihood through the ODE (FFJORD). Off: no graph is built.
        rho: fixed-step methods step on :func:`numerics.schedules.rho_grid` (uniform in
            ``t^(1/rho)``, EDM's sigma steps; ``t0`` and ``t1`` positive) instead of a
            uniform grid; ``dopri5`` ignores it.
        retract: ``x -> x`` applied after every (accepted) step: puts the state back on a
            manifold (``numerics.manifolds``), whose velocity is tangent.

    Returns:
        :class:`Solution` with the final state ``(batch, dim)``, the number of velocity
        calls and, for ``dopri5``, the accepted steps per row.

    Raises:
        ValueError: unknown ``method`` or non-positive ``steps``.
        RuntimeError: ``dopri5`` exceeded ``max_steps`` or its step size underflowed.
    """
    n = _check(method, steps)
    t0, t1 = float(t0), float(t1)
    if t0 == t1:
        return Solution(x, 0, None if method != "dopri5" else np.zeros(x.shape[0], np.int64))
    with contextlib.nullcontext() if differentiable else no_grad(x):
        if method == "dopri5":
            hint = None if steps is None else (t1 - t0) / n
            x_end, nfe, accepted = _dopri5_solve(velocity, x, t0, t1, rtol, atol, max_steps, hint,
                                                 retract)
            return Solution(x_end, nfe, accepted)
        grid = np.linspace(t0, t1, n + 1) if rho is None else rho_grid(t0, t1, n, rho)
        x_end, nfe = _fixed_solve(method, velocity, x, grid, retract)
        return Solution(x_end, nfe, None)


def trajectory(
    velocity: Velocity,
    x: Array,
    times: Sequence[float] | np.ndarray,
    *,
    method: str = "rk4",
    substeps: int = 1,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 10000,
) -> Trajectory:
    """Like :func:`integrate`, but return the state at every time in ``times`` (for plots).

    Each interval ``[times[i], times[i+1]]`` is solved by :func:`integrate`: with
    ``substeps`` uniform steps for fixed-step methods (so ``times = np.linspace(t0, t1,
    n + 1)`` with ``substeps=1`` reproduces ``integrate(..., steps=n)`` exactly), or
    adaptively for ``dopri5`` (``substeps`` ignored; each interval restarts step control).

    Args:
        velocity: as in :func:`integrate`.
        x: state ``(batch, dim)`` at ``times[0]``.
        times: ``(T,)`` monotone output times, ``T >= 2``.
        method, rtol, atol, max_steps: as in :func:`integrate` (``max_steps`` per interval).
        substeps: fixed-step steps per interval.

    Returns:
        :class:`Trajectory` with ``states: (T, batch, dim)``.
    """
    _check(method, substeps)
    grid = np.asarray(times, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2:
        raise ValueError(f"times must be a 1-d sequence of at least 2 times, got {times!r}")
    gaps = np.diff(grid)
    if not (np.all(gaps > 0) or np.all(gaps < 0)):
        raise ValueError("times must be strictly increasing or strictly decreasing")
    xp = array_namespace(x)
    states, nfe, accepted = [x], 0, None
    for t_now, t_next in zip(grid[:-1], grid[1:], strict=True):
        sol = integrate(
            velocity,
            states[-1],
            float(t_now),
            float(t_next),
            method=method,
            steps=None if method == "dopri5" else substeps,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
        )
        states.append(sol.x)
        nfe += sol.nfe
        if sol.steps is not None:
            accepted = sol.steps if accepted is None else accepted + sol.steps
    return Trajectory(grid, xp.stack(states, 0), nfe, accepted)
