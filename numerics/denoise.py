"""Anomaly scores from a velocity field's denoiser: denoising errors and the diffusion time.

A diffusion or flow-matching model with a Gaussian path ``x_t = a(t) x + s(t) eps`` exports
the probability-flow velocity ``v(x_t, t) = a'(t) x_hat + s'(t) eps_hat`` with
``x_hat = E[x | x_t]`` and ``eps_hat = E[eps | x_t]`` (Song et al. 2021, eq. 13, written for
any Gaussian path; Lipman et al. 2023 for the linear one). With ``x_t = a x_hat + s eps_hat``
the two estimates follow from one velocity call (``det = a s' - s a'``):

    eps_hat = (a v - a' x_t) / det,        x_hat = (s' x_t - s v) / det.

* :func:`denoise_features`: per noise level, ``log mean_j (eps_hat - eps)_j^2`` on
  ``x_t = a u + s eps`` with keyed Gaussian ``eps`` (the denoising score-matching loss of the
  row; Mahmood et al. 2021 score many noise scales this way).
* :func:`diffusion_time_estimate`: the diffusion time a row looks like (Livernoche et al.
  2024, "On Diffusion Modeling for Anomaly Detection"), read from the denoiser rather than
  from a parametric fit: at each level the row is taken as a noisy sample ``x_t = a u``; the
  squared distance per dimension between ``u`` and its denoised ``x_hat`` is compared with
  the noise that level would add, ``(s/a)^2``; the estimate is the log noise scale where the
  two agree (interpolated), i.e. ``log sigma`` of a variance-exploding view.

Plain numpy arithmetic around a velocity callable (the served graph, or a torch model
wrapped to take and return numpy); all levels and draws go through one velocity call.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from numerics.arrays import Array
from numerics.likelihood import keyed_uniform

__all__ = ["Levels", "denoise_features", "diffusion_time_estimate", "keyed_normal"]

Velocity = Callable[[Array, Array], Array]
"""``velocity(x: (batch, dim), t: (batch,)) -> (batch, dim)``."""

DENOISE_STREAM = 0x64656E6F  # "deno": keeps the denoise noise apart from other keyed draws
_TINY = 1e-30


class Levels:
    """Noise levels of a Gaussian path: ``t, a, s, da, ds``, each ``(levels,)``."""

    def __init__(self, t: Array, a: Array, s: Array, da: Array, ds: Array) -> None:
        self.t, self.a, self.s = (np.asarray(v, dtype=np.float64) for v in (t, a, s))
        self.da, self.ds = (np.asarray(v, dtype=np.float64) for v in (da, ds))
        self.det = self.a * self.ds - self.s * self.da

    def __len__(self) -> int:
        return len(self.t)


def keyed_normal(seeds: int | np.ndarray, rows: np.ndarray, draws: int, dim: int,
                 stream: int = DENOISE_STREAM) -> np.ndarray:
    """Standard normal ``(draws, batch, dim)`` keyed by each row's seed and index (Box-Muller
    on :func:`numerics.likelihood.keyed_uniform`): the same whatever the batch."""
    u1 = keyed_uniform(seeds, rows, draws, dim, stream)
    u2 = keyed_uniform(seeds, rows, draws, dim, stream + 1)
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _stacked_velocity(velocity: Velocity, xs: list[Array], ts: list[float]) -> list[Array]:
    """One velocity call over every ``(x, t)`` block, split back."""
    n = xs[0].shape[0]
    x = np.concatenate(xs, 0)
    t = np.repeat(np.asarray(ts, dtype=np.float64), n)
    v = velocity(x, t)
    return [v[i * n:(i + 1) * n] for i in range(len(xs))]


def denoise_features(velocity: Velocity, u: np.ndarray, levels: Levels,
                     noise: np.ndarray) -> np.ndarray:
    """``(batch, levels)``: log mean squared noise-estimation error per level.

    Args:
        velocity: the model's velocity in model space.
        u: ``(batch, dim)`` rows in model space.
        levels: the noise levels.
        noise: ``(levels * draws, batch, dim)`` standard normal noise (level-major).
    """
    k = len(levels)
    draws = noise.shape[0] // k
    xs, ts = [], []
    for i in range(k):
        for d in range(draws):
            xs.append(levels.a[i] * u + levels.s[i] * noise[i * draws + d])
            ts.append(float(levels.t[i]))
    vs = _stacked_velocity(velocity, xs, ts)
    out = np.empty((u.shape[0], k))
    for i in range(k):
        err = 0.0
        for d in range(draws):
            j = i * draws + d
            eps_hat = (levels.a[i] * vs[j] - levels.da[i] * xs[j]) / levels.det[i]
            err = err + ((eps_hat - noise[j]) ** 2).mean(-1)
        out[:, i] = np.log(err / draws + _TINY)
    return out


def diffusion_time_estimate(velocity: Velocity, u: np.ndarray, levels: Levels) -> np.ndarray:
    """``(batch,)``: the log noise scale ``log(s/a)`` at which ``u`` looks like a noisy sample.

    At level ``k`` the input is ``a_k u``; with ``x_hat_k`` its denoised estimate,
    ``g_k = log(mean_j (u - x_hat_k)_j^2) - 2 log(s_k / a_k)`` compares the distance
    the denoiser removes with the noise that level adds. ``g`` falls as the level rises; the
    estimate is where it crosses 0 (linear in ``log(s/a)``). Where it never does, it is half
    the log squared distance at the nearest end of the grid (the distance itself).
    """
    xs = [levels.a[i] * u for i in range(len(levels))]
    vs = _stacked_velocity(velocity, xs, [float(t) for t in levels.t])
    log_ve = np.log(levels.s / levels.a)
    log_r2 = np.stack([
        np.log(((u - (levels.ds[i] * xs[i] - levels.s[i] * vs[i]) / levels.det[i]) ** 2)
               .mean(-1) + _TINY) for i in range(len(levels))], 1)
    g = log_r2 - 2.0 * log_ve[None, :]
    below = g <= 0
    first = np.where(below.any(1), below.argmax(1), len(levels))
    out = np.where(first == 0, 0.5 * log_r2[:, 0], 0.5 * log_r2[:, -1])
    inner = (first > 0) & (first < len(levels))
    if inner.any():
        r = np.flatnonzero(inner)
        hi = first[r]
        g0, g1 = g[r, hi - 1], g[r, hi]
        w = g0 / np.maximum(g0 - g1, _TINY)
        out[r] = log_ve[hi - 1] + w * (log_ve[hi] - log_ve[hi - 1])
    return out
