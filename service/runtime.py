"""Serve one exported model directory: sample, log-likelihood and anomaly scores in numpy.

Loads ``manifest.json`` (schema + sha256 of every file), opens each graph with ONNX Runtime
or TorchScript, and composes them with the shared array solvers. Imports nothing from
``training/``; with ONNX graphs it needs no torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.graphs import GraphExecutor, open_graph
from service.manifest import Manifest, ManifestError, read_manifest

__all__ = [
    "AnomalyResult",
    "InputError",
    "LOG_LIKELIHOOD_FLOOR",
    "LikelihoodOutput",
    "ModelRuntime",
    "SeededRows",
    "segmented_normal",
]

ODE_SOLVERS = ("euler", "heun", "midpoint", "rk4", "dopri5")
DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpmpp2m")
LOG2 = math.log(2.0)
# log_likelihood's floor (nats per row), reported for rows the model cannot score: outside the
# training support by more than SUPPORT_BOUND standard deviations (after the manifest's
# preprocessing), outside the logit's domain, or whose result is not a finite number. Such rows
# score as anomalies (NLL 1e30 beats every calibrated threshold). docs/API.md documents both.
LOG_LIKELIHOOD_FLOOR = -1e30
SUPPORT_BOUND = 1e6


class InputError(ValueError):
    """A request's input is unusable; the message says what is wrong and what is allowed."""


@dataclass(frozen=True)
class SeededRows:
    """Rows ``offset .. offset + n`` of the sample stream of ``seed`` (one client request, or
    the part of one that the batcher placed in this batch)."""

    n: int
    seed: int
    offset: int = 0


@dataclass
class LikelihoodOutput:
    log_prob: np.ndarray  # (rows,) nats per sample, data units
    bits_per_dim: np.ndarray  # (rows,)
    std_error: np.ndarray | None  # (rows,) Hutchinson only
    method: str
    nfe: int


@dataclass
class AnomalyResult:
    scores: np.ndarray  # (rows,) NLL in nats per sample
    percentile: np.ndarray  # (rows,) in [0, 100] among normal validation rows
    is_anomaly: np.ndarray  # (rows,) bool
    threshold: float


def _rows(gen: np.random.Generator, r: SeededRows, shape: tuple[int, ...]) -> np.ndarray:
    return gen.standard_normal((r.offset + r.n, *shape))[r.offset:]


def segmented_normal(requests: Sequence[SeededRows], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal rows, each request's block from its own seed (batch independent)."""
    blocks = [_rows(np.random.default_rng(r.seed), r, shape) for r in requests]
    return np.concatenate(blocks, axis=0)


class _SegmentedNoise:
    """A ``noise(shape)`` callable for stochastic samplers, one stream per request.

    Call ``k`` draws a request's rows from a generator keyed by ``(seed, stream, k)``, so a
    row's noise depends only on its seed and position, never on its batch neighbours or on
    whether the batcher split its request.
    """

    def __init__(self, requests: Sequence[SeededRows], stream: int = 1) -> None:
        self.requests = list(requests)
        self.stream = stream
        self.calls = 0

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        rest, k = tuple(shape[1:]), self.calls
        self.calls += 1
        return np.concatenate([
            _rows(np.random.default_rng([r.seed, self.stream, k]), r, rest) for r in self.requests
        ])


class ModelRuntime:
    """One served model. ``runtime`` is ``"onnx"``, ``"torchscript"`` or ``"auto"``."""

    def __init__(self, directory: str | Path, *, runtime: str = "auto",
                 threads: int | None = None, device: str | None = None) -> None:
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory, verify=True)
        formats = self.manifest.formats()
        fmt = ("onnx" if "onnx" in formats else "torchscript") if runtime == "auto" else runtime
        if fmt not in formats:
            raise ManifestError(
                f"{self.directory.name}: runtime {fmt!r} requested but the artifact has "
                f"{sorted(formats)}"
            )
        self.format = fmt
        # called as observer(graph, seconds) after every graph call (the service's metrics)
        self.observer: Callable[[str, float], None] | None = None
        self.graphs: dict[str, GraphExecutor] = {
            name: open_graph(self.directory, by_fmt[fmt], threads=threads, device=device)
            for name, by_fmt in self.manifest.graphs.items()
        }
        self._schedule = None
        if self.manifest.family == "diffusion":
            from service.schedules import make_schedule

            t = self.manifest.time
            params = {}
            if t.schedule == "linear":
                params = {"beta_min": t.beta_min, "beta_max": t.beta_max}
            self._schedule = make_schedule(t.schedule, **params)

    # -- properties ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def family(self) -> str:
        return self.manifest.family

    def solvers(self) -> tuple[str, ...]:
        if self.family == "flow":
            return ("exact",)
        return ODE_SOLVERS + (DIFFUSION_SAMPLERS if self.family == "diffusion" else ())

    def call(self, graph: str, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        if self.observer is None:
            return self.graphs[graph](*inputs)
        start = time.perf_counter()
        out = self.graphs[graph](*inputs)
        self.observer(graph, time.perf_counter() - start)
        return out

    # -- validation ----------------------------------------------------------------------
    def check_rows(self, x: object, field: str = "x") -> np.ndarray:
        """``x`` as a finite float64 ``(rows, dim)`` array, or an InputError saying why not."""
        try:
            arr = np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError(f"'{field}' must be a list of rows of numbers (ragged rows or "
                             "non-numbers found)") from None
        if arr.size == 0:
            raise InputError(f"'{field}' is empty; send at least one row")
        if arr.ndim == 1 and self.dim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise InputError(f"'{field}' must be a 2-D list [[...], ...] of rows with {self.dim} "
                             f"numbers each; got {arr.ndim}-D")
        if arr.shape[1] != self.dim:
            raise InputError(f"'{field}' rows have {arr.shape[1]} values but model "
                             f"'{self.name}' expects {self.dim}")
        bad = ~np.isfinite(arr)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise InputError(f"'{field}' has a non-finite value (NaN or Inf) at row {r}, "
                             f"column {c}; all values must be finite")
        huge = np.abs(arr) > np.finfo(np.float32).max
        if huge.any():
            r, c = np.argwhere(huge)[0]
            raise InputError(f"'{field}' has a value beyond float32 range at row {r}, column "
                             f"{c}; values must lie within ±3.403e+38")
        return arr

    def resolve_solver(self, solver: str | None, steps: int | None) -> tuple[str, int | None]:
        solver = solver or self.manifest.defaults.solver or "exact"
        if solver not in self.solvers():
            raise InputError(f"unknown solver {solver!r} for {self.family} model "
                             f"'{self.name}'; choose one of: {', '.join(self.solvers())}")
        if solver in ("exact", "dopri5"):
            return solver, steps
        return solver, steps or self.manifest.defaults.steps or 16

    # -- verbs ---------------------------------------------------------------------------
    def sample(self, n: int, seed: int = 0, steps: int | None = None,
               solver: str | None = None) -> np.ndarray:
        """``n`` samples ``(n, dim)`` in data units, reproducible from ``seed``."""
        return self.sample_many([SeededRows(n, seed)], steps=steps, solver=solver)[0]

    def sample_many(self, requests: Sequence[SeededRows], *, steps: int | None = None,
                    solver: str | None = None) -> list[np.ndarray]:
        """Several requests in one graph call; each block depends only on its own seed."""
        solver, steps = self.resolve_solver(solver, steps)
        z = segmented_normal(requests, (self.dim,))
        u = self._generate(z, requests, solver, steps)
        (x,) = self.call("postprocess", u)
        x = np.asarray(x, dtype=np.float64)
        bounds = np.cumsum([0] + [r.n for r in requests])
        return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _generate(self, z: np.ndarray, requests: Sequence[SeededRows], solver: str,
                  steps: int | None) -> np.ndarray:
        if self.family == "flow":
            (u,) = self.call("sample", z)
            return u
        t_min = self.manifest.time.t_min
        if solver in DIFFUSION_SAMPLERS:
            from service import samplers

            noise = _SegmentedNoise(requests)
            if solver == "ddpm":
                x, _ = samplers.ddpm_sample(self._eps, z, self._schedule, steps, noise, t_min)
            elif solver == "ddim":
                x, _ = samplers.ddim_sample(self._eps, z, self._schedule, steps, 0.0, noise, t_min)
            else:
                x, _ = samplers.dpmpp_2m_sample(self._eps, z, self._schedule, steps, t_min)
            return x
        from service.solvers import integrate

        d = self.manifest.defaults
        sol = integrate(self._velocity, z, 1.0, t_min, method=solver, steps=steps,
                        rtol=d.rtol, atol=d.atol)
        return sol.x

    def _velocity(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        (v,) = self.call("velocity", x, t)
        return v.astype(np.float64)

    def _eps(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Diffusion: recover epsilon from the exported PF-ODE velocity (an affine map)."""
        s = self._schedule
        beta, sigma = s.beta(t)[:, None], s.sigma(t)[:, None]
        return (self._velocity(x, t) + 0.5 * beta * x) * 2.0 * sigma / beta

    def log_likelihood(self, x: np.ndarray, *, method: str | None = None,
                       steps: int | None = None, solver: str | None = None,
                       probes: int | None = None, seed: int | np.ndarray = 0,
                       rows: np.ndarray | None = None) -> LikelihoodOutput:
        """log p(x) in nats per row, in the units of the data; ``x: (rows, dim)``.

        Hutchinson probes are keyed by each row's ``seed`` (an int, or ``(rows,)`` one per
        row) and its index within its own request (``rows``, default ``0 .. rows-1``), so a
        row's answer does not depend on the batch it is computed in.
        """
        x = np.asarray(x, dtype=np.float64)
        seeds = np.broadcast_to(np.asarray(seed, dtype=np.uint64), (len(x),))
        rows = np.arange(len(x)) if rows is None else np.asarray(rows)
        u, ladj = self.call("preprocess", x)
        u, ladj = u.astype(np.float64), ladj.astype(np.float64)
        if self.family == "flow" and method not in (None, "exact"):
            raise InputError(f"model '{self.name}' is a flow: its likelihood is exact; "
                             "method must be 'exact'")
        # Rows far outside the training support (or outside the logit's domain) never reach
        # the graphs: they would overflow float32 or stall an adaptive solver for the whole
        # batch. They, and any row whose result is not finite, get the documented floor.
        inside = np.isfinite(u).all(1) & np.isfinite(ladj) & (np.abs(u).max(1) <= SUPPORT_BOUND)
        lp = np.full(len(x), LOG_LIKELIHOOD_FLOOR)
        se = np.zeros(len(x)) if method == "hutchinson" else None
        nfe = 0
        if inside.any():
            if self.family == "flow":
                method = "exact"
                (got,) = self.call("log_prob", u[inside])
                got, got_se, nfe = got.astype(np.float64), None, 1
            else:
                got, got_se, nfe, method = self._ode_log_prob(
                    u[inside], method, steps, solver, probes, seeds[inside], rows[inside])
            lp[inside] = got + ladj[inside]
            if got_se is not None:
                se = np.zeros(len(x))
                se[inside] = got_se
        elif self.family == "flow":
            method = "exact"
        else:
            method = method or self.manifest.defaults.method
        if method == "hutchinson" and se is None:
            se = np.zeros(len(x))
        log_prob = np.where(np.isfinite(lp), np.maximum(lp, LOG_LIKELIHOOD_FLOOR),
                            LOG_LIKELIHOOD_FLOOR)
        return LikelihoodOutput(log_prob=log_prob, bits_per_dim=-log_prob / (self.dim * LOG2),
                                std_error=se, method=method, nfe=nfe)

    def _ode_log_prob(self, u: np.ndarray, method: str | None, steps: int | None,
                      solver: str | None, probes: int | None, seeds: np.ndarray,
                      rows: np.ndarray) -> tuple:
        from service import likelihood

        d, t = self.manifest.defaults, self.manifest.time
        method = method or d.method
        if method not in ("exact", "hutchinson"):
            raise InputError(f"unknown method {method!r}; choose 'exact' or 'hutchinson'")
        solver = solver or ("dopri5" if steps is None else "rk4")
        if solver not in ODE_SOLVERS:
            raise InputError(f"likelihood needs an ODE solver; choose one of: "
                             f"{', '.join(ODE_SOLVERS)}")
        common = {"t0": t.t_min, "t1": t.t_max, "method": solver, "steps": steps,
                  "rtol": d.rtol, "atol": d.atol}
        if method == "exact":
            res = likelihood.log_likelihood_exact(self._velocity_div, u, **common)
        else:
            res = likelihood.log_likelihood_hutchinson(
                self._velocity_jvp, u, probes=probes or d.probes, seed=seeds, rows=rows,
                **common
            )
        return np.asarray(res.log_prob), res.std_error, int(res.nfe), method

    def _velocity_div(self, x: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v, div = self.call("velocity_div", x, t)
        return v.astype(np.float64), div.astype(np.float64)

    def _velocity_jvp(self, x: np.ndarray, t: np.ndarray,
                      e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v, jvp = self.call("velocity_jvp", x, t, e)
        return v.astype(np.float64), jvp.astype(np.float64)

    def anomaly_score(self, x: np.ndarray, *, target_fpr: float | None = None,
                      **likelihood_options: object) -> AnomalyResult:
        """NLL score, percentile among normal validation rows, and the calibrated flag."""
        cal = self.manifest.calibration
        if cal is None:
            raise InputError(f"model '{self.name}' has no anomaly calibration")
        scores = -self.log_likelihood(x, **likelihood_options).log_prob
        threshold = cal.threshold if target_fpr is None else self.threshold_at(target_fpr)
        percentile = 100.0 * np.interp(scores, cal.quantiles, cal.levels)
        return AnomalyResult(scores=scores, percentile=percentile,
                             is_anomaly=scores > threshold, threshold=float(threshold))

    def threshold_at(self, target_fpr: float) -> float:
        if not 0.0 < target_fpr < 1.0:
            raise InputError(f"target_fpr must be in (0, 1); got {target_fpr}")
        cal = self.manifest.calibration
        return float(np.interp(1.0 - target_fpr, cal.levels, cal.quantiles))
