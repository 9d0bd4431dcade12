"""ODE models (flow matching, diffusion, EDM): a velocity field integrated by the shared solvers.

Sampling integrates ``dx/dt = v(x, t)`` from noise at ``t_max`` (``noise_std`` times standard
normal) to data at ``t_min``; the log-likelihood integrates the probability-flow ODE with the
exact divergence (``velocity_div``) or Hutchinson's estimate (``velocity_jvp``)
(``numerics.likelihood``) against that base. Fixed-step solvers step on the manifest's
``rho`` grid where it has one (EDM's sigma steps). Diffusion adds the DDPM / DDIM /
DPM-Solver++ samplers over the eps prediction recovered from the exported velocity and the
manifest's noise schedule; EDM adds its stochastic sampler over the same velocity. The
``denoise`` and ``dte`` anomaly scores are a few velocity calls at the manifest's noise levels
(``numerics.denoise``), the denoising noise keyed by each row's seed and index.

The ODE solvers' state lives where the graphs run (``ModelRuntime.stage``: a torch tensor on
the GPU for TorchScript on CUDA), so a PF-ODE solve copies its rows to the device once and its
answer back once, not at every step. The diffusion samplers draw their noise per request on
the host and keep their state there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from artifact.manifest import Manifest
from numerics.arrays import Array, array_namespace, asarray_like, to_numpy
from numerics.denoise import denoise_features, diffusion_time_estimate, keyed_normal
from numerics.guidance import guided
from numerics.likelihood import log_likelihood_exact, log_likelihood_hutchinson, normal_log_prob
from numerics.manifolds import manifold
from numerics.samplers import EDM_SAMPLERS, SAMPLERS, diffusion_sample, edm_stochastic_sample
from numerics.schedules import make_schedule, pf_ode_eps
from numerics.solvers import integrate
from service.runtime.base import ModelRuntime, SeededRows, SegmentedNoise, register_runtime

__all__ = ["DiffusionRuntime", "EdmRuntime", "FlowMatchingRuntime", "OdeRuntime",
           "RiemannianRuntime"]


class OdeRuntime(ModelRuntime):
    """A velocity field ``v(x, t)`` with ``t = t_min`` data and ``t = t_max`` normal noise.

    A conditional model's graphs take each row's ``context`` last; sampling with
    ``guidance`` runs each step's conditional and null-token rows in one graph call and
    follows the guided field (``numerics.guidance``)."""

    def _generate(self, z: np.ndarray, requests: Sequence[SeededRows], solver: str,
                  steps: int | None, cond: np.ndarray | None = None,
                  guidance: float | None = None) -> np.ndarray:
        d, t = self.manifest.defaults, self.manifest.time
        return to_numpy(integrate(self._field(cond, guidance), self.stage(z) * t.noise_std,
                                  t.t_max, t.t_min, method=solver, steps=steps, rtol=d.rtol,
                                  atol=d.atol, rho=t.rho).x)

    def _field(self, cond: np.ndarray | None,
               guidance: float | None) -> Callable[[Array, Array], Array]:
        """The sampling field ``(x, t) -> v``: unconditional, given ``cond: (rows, C)``, or
        guided with weight ``guidance`` against the null token (the all-zero row)."""
        if cond is None:
            return self._velocity
        if guidance is None:
            c = self.stage(cond)
            return lambda x, t: self._velocity(x, t, c)
        both = self.stage(np.concatenate([cond, np.zeros_like(cond)]))

        def field(x: Array, t: Array) -> Array:
            xp = array_namespace(x)
            v = self._velocity(xp.concatenate([x, x]), xp.concatenate([t, t]), both)
            return guided(v[:len(x)], v[len(x):], guidance)

        return field

    def _log_prob(self, u: np.ndarray, method: str, steps: int | None, solver: str | None,
                  probes: int | None, seeds: np.ndarray, rows: np.ndarray,
                  cond: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray | None, int]:
        d, t = self.manifest.defaults, self.manifest.time
        common = {"t0": t.t_min, "t1": t.t_max, "steps": steps, "rtol": d.rtol, "atol": d.atol,
                  "method": solver or ("dopri5" if steps is None else "rk4"), "rho": t.rho,
                  "base_log_prob": self._base_log_prob()}
        x = self.stage(u)  # the state stays on the graphs' device until the answer
        probes = probes or d.probes
        if method == "exact":
            c = () if cond is None else (self.stage(cond),)
            res = log_likelihood_exact(lambda y, t: self._velocity_div(y, t, *c), x, **common)
        else:  # the probes' replicas are probe-major: so is each row's context
            c = () if cond is None else (self.stage(np.tile(cond, (probes, 1))),)
            res = log_likelihood_hutchinson(lambda y, t, e: self._velocity_jvp(y, t, e, *c), x,
                                            probes=probes, seed=seeds, rows=rows, **common)
        se = None if res.std_error is None else to_numpy(res.std_error)
        return to_numpy(res.log_prob), se, int(res.nfe)

    def _kind_score(self, kind: str, u: np.ndarray, seeds: np.ndarray,
                    rows: np.ndarray) -> np.ndarray:
        spec = self.manifest.anomaly
        levels = spec.noise_levels()
        if kind == "dte":
            return diffusion_time_estimate(self._velocity, u, levels)
        noise = keyed_normal(seeds, rows, len(levels) * spec.draws, self.dim)
        return spec.combine(denoise_features(self._velocity, u, levels, noise))

    def _base_log_prob(self) -> Callable[[Array], Array]:
        """The base's log-density at ``t_max``: ``N(0, noise_std^2 I)``."""
        return normal_log_prob(self.manifest.time.noise_std)

    # The velocity callables take and return the solver's arrays (numpy, or torch tensors on
    # the graphs' device); graphs compute in float32, the solvers in float64.
    # ``context``: a conditional model's rows' context input (none for another model).
    def _velocity(self, x: Array, t: Array, *context: Array) -> Array:
        (v,) = self.call("velocity", x, t, *context)
        return asarray_like(v, x)

    def _velocity_div(self, x: Array, t: Array, *context: Array) -> tuple[Array, Array]:
        v, div = self.call("velocity_div", x, t, *context)
        return asarray_like(v, x), asarray_like(div, x)

    def _velocity_jvp(self, x: Array, t: Array, e: Array,
                      *context: Array) -> tuple[Array, Array]:
        v, jvp = self.call("velocity_jvp", x, t, e, *context)
        return asarray_like(v, x), asarray_like(jvp, x)


@register_runtime("flow_matching")
class FlowMatchingRuntime(OdeRuntime):
    pass


@register_runtime("diffusion")
class DiffusionRuntime(OdeRuntime):
    """VP-SDE diffusion: the ODE solvers on the PF-ODE, and its samplers over eps."""

    def __init__(self, directory: str | Path, manifest: Manifest, **options: Any) -> None:
        super().__init__(directory, manifest, **options)
        t = manifest.time
        self.schedule = make_schedule(t.schedule, beta_min=t.beta_min, beta_max=t.beta_max)

    def _generate(self, z: np.ndarray, requests: Sequence[SeededRows], solver: str,
                  steps: int | None, cond: np.ndarray | None = None,
                  guidance: float | None = None) -> np.ndarray:
        if solver not in SAMPLERS:
            return super()._generate(z, requests, solver, steps, cond, guidance)
        field = self._field(cond, guidance)

        def eps(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            return pf_ode_eps(x, field(x, t), t, self.schedule)

        x, _ = diffusion_sample(solver, eps, z, self.schedule, steps,
                                SegmentedNoise(requests), self.manifest.time.t_min)
        return x


@register_runtime("edm")
class EdmRuntime(OdeRuntime):
    """EDM: time is sigma, the ODE solvers step on its rho grid (``heun`` is EDM's
    deterministic sampler), and ``edm_stochastic`` is its stochastic sampler, whose churn
    noise is drawn per request from each row's seed."""

    def _generate(self, z: np.ndarray, requests: Sequence[SeededRows], solver: str,
                  steps: int | None, cond: np.ndarray | None = None,
                  guidance: float | None = None) -> np.ndarray:
        if solver not in EDM_SAMPLERS:
            return super()._generate(z, requests, solver, steps, cond, guidance)
        t = self.manifest.time
        x, _ = edm_stochastic_sample(
            self._field(cond, guidance), z * t.noise_std, t.t_max, t.t_min, steps,
            SegmentedNoise(requests),
            rho=t.rho, s_churn=t.s_churn, s_tmin=t.s_tmin,
            s_tmax=float("inf") if t.s_tmax is None else t.s_tmax, s_noise=t.s_noise)
        return x


@register_runtime("rfm")
class RiemannianRuntime(OdeRuntime):
    """Riemannian flow matching: uniform noise on the manifold, a retraction after every ODE
    step, and the uniform base's ``-log vol`` in the likelihood."""

    def __init__(self, directory: str | Path, manifest: Manifest, **options: Any) -> None:
        super().__init__(directory, manifest, **options)
        self.manifold = manifold(manifest.manifold.name, manifest.manifold.tolerance)

    def _generate(self, z: np.ndarray, requests: Sequence[SeededRows], solver: str,
                  steps: int | None, cond: np.ndarray | None = None,
                  guidance: float | None = None) -> np.ndarray:
        d, t = self.manifest.defaults, self.manifest.time
        return integrate(self._field(cond, guidance), self.manifold.uniform_from_normal(z),
                         t.t_max, t.t_min, method=solver, steps=steps, rtol=d.rtol,
                         atol=d.atol, retract=self.manifold.retract).x

    def _base_log_prob(self) -> Callable[[Array], Array]:
        log_vol = self.manifold.log_volume(self.dim)
        return lambda z: asarray_like(np.full(len(z), -log_vol), z)
