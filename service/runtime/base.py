"""The served model: one class per family behind one interface, found by family name.

:class:`ModelRuntime` holds what every family shares: the manifest (read and verified once),
its graphs opened with ONNX Runtime or TorchScript, the preprocessing graphs that map data
units to model space and back, seeded noise, the likelihood floor for rows no model can
score, and the anomaly score over the calibration. A family subclass contributes two steps:
``_generate`` (noise -> model space) and ``_log_prob`` (model space -> log-density), the
anomaly score kinds beyond ``nll`` its family serves (``_kind_score``), and registers
itself with :func:`register_runtime` under its family's name
(``artifact.families``). :func:`open_runtime` reads a model folder and builds the runtime of
its family. Imports nothing from ``training``; with ONNX graphs it needs no torch.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from artifact.calibration import Calibration, percentile, threshold_at
from artifact.conditions import context_rows
from artifact.families import FamilySpec, family
from artifact.manifest import Manifest, ManifestError, read_manifest
from numerics.arrays import Array
from service.runtime.graphs import GraphExecutor, Placement, open_graph

__all__ = [
    "RUNTIMES",
    "AnomalyResult",
    "InputError",
    "LOG_LIKELIHOOD_FLOOR",
    "LikelihoodOutput",
    "ModelRuntime",
    "SampleOutput",
    "SeededRows",
    "SegmentedNoise",
    "open_runtime",
    "register_runtime",
    "segmented_normal",
]

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
class SampleOutput:
    blocks: list[np.ndarray]  # one (n, dim) block per request, data units
    nfe: int  # the family's graph calls that made them (pre/postprocessing not counted)


@dataclass
class AnomalyResult:
    scores: np.ndarray  # (rows,) of the model's score kind (NLL: nats per sample)
    percentile: np.ndarray  # (rows,) in [0, 100] among normal validation rows
    is_anomaly: np.ndarray  # (rows,) bool
    threshold: float
    # (rows,) each row's class threshold (a label model calibrated per class), else None
    thresholds: np.ndarray | None = None


def _rows(gen: np.random.Generator, r: SeededRows, shape: tuple[int, ...]) -> np.ndarray:
    return gen.standard_normal((r.offset + r.n, *shape))[r.offset:]


def segmented_normal(requests: Sequence[SeededRows], shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal rows, each request's block from its own seed (batch independent)."""
    blocks = [_rows(np.random.default_rng(r.seed), r, shape) for r in requests]
    return np.concatenate(blocks, axis=0)


class SegmentedNoise:
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
    """One served model of one family (a subclass registered by :func:`register_runtime`).

    Args:
        directory: the model folder.
        manifest: its manifest, already read and verified.
        runtime: ``"onnx"``, ``"torchscript"`` or ``"auto"`` (ONNX when present).
        threads: intra-op threads per graph session (None: the library's default).
        device: ``"cpu"``, ``"cuda"``, ``"auto"``, or a full
            :class:`~service.runtime.graphs.Placement` (device id, memory cap, provider).
    """

    spec: ClassVar[FamilySpec]

    def __init__(self, directory: str | Path, manifest: Manifest, *, runtime: str = "auto",
                 threads: int | None = None, device: str | Placement = "auto") -> None:
        self.directory = Path(directory)
        self.manifest = manifest
        self.version = 1  # the model set sets it from the folder's layout (artifact.repository)
        formats = manifest.formats()
        fmt = ("onnx" if "onnx" in formats else "torchscript") if runtime == "auto" else runtime
        if fmt not in formats:
            raise ManifestError(
                f"{self.directory.name}: runtime {fmt!r} requested but the artifact has "
                f"{sorted(formats)}"
            )
        self.format = fmt
        # called as observer(graph, seconds) after every graph call (the service's metrics)
        self.observer: Callable[[str, float], None] | None = None
        # graph calls made by the current thread: how sample_many counts a batch's NFE (a
        # runtime serves several worker threads at once)
        self._calls = threading.local()
        self.graphs: dict[str, GraphExecutor] = {
            name: open_graph(self.directory, by_fmt[fmt], threads=threads, device=device)
            for name, by_fmt in manifest.graphs.items()
        }
        executors = list(self.graphs.values())
        # one device for every graph (the usual case): solver states live there
        self._stage: Callable[[np.ndarray], Array] = executors[0].stage \
            if len({e.where for e in executors}) == 1 else np.asarray

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def family(self) -> str:
        return self.manifest.family

    def devices(self) -> dict[str, str]:
        """Where each graph runs: ``{graph: "cpu" | "cuda:N"}``."""
        return {name: g.where for name, g in sorted(self.graphs.items())}

    def stage(self, a: np.ndarray) -> Array:
        """``a`` as the graphs' own device array (a torch tensor on their device for
        TorchScript, and for ONNX Runtime on a GPU with torch installed; else ``a``), for
        solver states that stay on the device between graph calls."""
        return self._stage(a)

    def solvers(self) -> tuple[str, ...]:
        """The ``solver`` values ``sample`` accepts."""
        return self.spec.sample_solvers

    def graph_context(self, labels: np.ndarray | None = None,
                      context: np.ndarray | None = None) -> np.ndarray | None:
        """A conditional model's ``context`` graph input ``(rows, width)`` from each row's
        class index (``labels``) or raw ``context`` row; None for an unconditional model.
        InputError when the request's condition does not fit the model (the service has
        checked it at its boundary; this guards direct callers)."""
        cond = self.manifest.condition
        given = labels is not None or context is not None
        if cond is None:
            if given:
                raise InputError(f"model '{self.name}' is unconditional: leave out 'y' and "
                                 "'context'")
            return None
        if cond.kind == "label":
            if labels is None:
                raise InputError(f"model '{self.name}' is conditioned on a label: send 'y', "
                                 f"one of {', '.join(cond.classes)}")
            return context_rows(cond, labels=labels)
        if context is None or np.shape(context)[-1] != cond.width:
            raise InputError(f"model '{self.name}' is conditioned on a context: send "
                             f"'context', {cond.width} numbers per row")
        return context_rows(cond, context=context)

    def check_guidance(self, guidance: float | None) -> None:
        """InputError unless ``guidance`` (None: none) applies to this model: a label model
        of an ODE family trained with label dropout, and a weight >= 0."""
        if guidance is None:
            return
        cond = self.manifest.condition
        why = (f"model '{self.name}' is a {self.family}: guidance applies to diffusion and "
               "flow matching models" if not self.spec.guidance
               else f"model '{self.name}' was trained without label dropout (--cfg-dropout), "
               "so it has no unconditional field to guide against"
               if cond is None or not cond.guided else
               f"'guidance' must be a number >= 0; got {guidance}" if not guidance >= 0
               else None)
        if why is not None:
            raise InputError(why)

    def check(self) -> None:
        """The smoke call a version passes before it serves: every graph once, on one row of
        0.5 (inside every preprocessing's domain, a time inside (0, 1)); RuntimeError naming the
        graph when one fails or answers something that is not finite."""
        for name, graph in self.graphs.items():
            inputs = [np.full([1 if a == "batch" else int(a) for a in spec.shape],
                              0 if spec.dtype == "int64" else 0.5, dtype=spec.dtype)
                      for spec in graph.spec.inputs]
            try:
                outputs = graph(*inputs)
            except Exception as err:  # noqa: BLE001 - any failure refuses the version
                raise RuntimeError(f"graph {name!r} failed its smoke call: "
                                 f"{type(err).__name__}: {str(err)[:200]}") from None
            for spec, out in zip(graph.spec.outputs, outputs, strict=False):
                if not np.isfinite(np.asarray(out, dtype=np.float64)).all():
                    raise RuntimeError(f"graph {name!r} answered a non-finite {spec.name!r} "
                                     "on its smoke call (one row of 0.5)")

    def call(self, graph: str, *inputs: Array) -> tuple[Array, ...]:
        """Run one graph; numpy in, numpy out, or :meth:`stage`'s arrays in and out."""
        self._calls.count = getattr(self._calls, "count", 0) + 1
        if self.observer is None:
            return self.graphs[graph](*inputs)
        start = time.perf_counter()
        out = self.graphs[graph](*inputs)
        self.observer(graph, time.perf_counter() - start)
        return out

    def resolve_solver(self, solver: str | None, steps: int | None) -> tuple[str, int | None]:
        """The sampling solver and steps a request gets: its own, else the model's defaults."""
        solver = solver or self.manifest.defaults.solver or self.solvers()[0]
        if solver not in self.solvers():
            raise InputError(f"unknown solver {solver!r} for {self.family} model "
                             f"'{self.name}'; choose one of: {', '.join(self.solvers())}")
        if solver in ("exact", "dopri5"):
            return solver, steps
        return solver, steps or self.manifest.defaults.steps or 16

    # -- sample ----------------------------------------------------------------------------
    def sample(self, n: int, seed: int = 0, steps: int | None = None,
               solver: str | None = None, labels: np.ndarray | None = None,
               context: np.ndarray | None = None,
               guidance: float | None = None) -> np.ndarray:
        """``n`` samples ``(n, dim)`` in data units, reproducible from ``seed`` (given each
        sample's class index ``labels: (n,)`` or ``context: (n, width)``, conditional; with
        classifier-free ``guidance`` of that weight, a model trained with label dropout)."""
        return self.sample_many([SeededRows(n, seed)], steps=steps, solver=solver,
                                labels=labels, context=context, guidance=guidance).blocks[0]

    def sample_many(self, requests: Sequence[SeededRows], *, steps: int | None = None,
                    solver: str | None = None, labels: np.ndarray | None = None,
                    context: np.ndarray | None = None,
                    guidance: float | None = None) -> SampleOutput:
        """Several requests in one graph call; each block depends only on its own seed (and
        its rows' conditions, given in request order)."""
        solver, steps = self.resolve_solver(solver, steps)
        cond = self.graph_context(labels, context)
        self.check_guidance(guidance)
        z = segmented_normal(requests, (self.dim,))
        before = getattr(self._calls, "count", 0)
        u = self._generate(z, requests, solver, steps, **_conditioned(cond, guidance))
        nfe = self._calls.count - before
        (x,) = self.call("postprocess", u)
        # Token models answer integers (JSON ints, gRPC INT64); the others float64.
        x = (np.rint(x).astype(np.int64) if self.spec.tokens
             else np.asarray(x, dtype=np.float64))
        bounds = np.cumsum([0] + [r.n for r in requests])
        return SampleOutput([x[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)], nfe)

    def _generate(self, z: np.ndarray, requests: Sequence[SeededRows], solver: str,
                  steps: int | None, cond: np.ndarray | None = None) -> np.ndarray:
        """Base noise ``z: (rows, dim)`` -> model space ``(rows, dim)``; a family's step.

        ``requests`` give each row's seed, for samplers that draw noise on the way; ``cond``
        the rows' ``context`` graph input of a conditional model."""
        raise NotImplementedError

    # -- log_likelihood --------------------------------------------------------------------
    def log_likelihood(self, x: np.ndarray, *, method: str | None = None,
                       steps: int | None = None, solver: str | None = None,
                       probes: int | None = None, seed: int | np.ndarray = 0,
                       rows: np.ndarray | None = None, labels: np.ndarray | None = None,
                       context: np.ndarray | None = None,
                       marginal: bool = False) -> LikelihoodOutput:
        """log p(x) in nats per row, in the units of the data; ``x: (rows, dim)``.

        Hutchinson probes are keyed by each row's ``seed`` (an int, or ``(rows,)`` one per
        row) and its index within its own request (``rows``, default ``0 .. rows-1``), so a
        row's answer does not depend on the batch it is computed in.

        A conditional model answers ``log p(x | y)`` given each row's class index
        (``labels: (rows,)``) or ``log p(x | c)`` given ``context: (rows, width)``; with
        ``marginal`` a label model answers ``log p(x) = logsumexp_y log p(x | y) + log p(y)``
        over its classes, with the training data's priors, in one graph call.
        """
        x = np.asarray(x, dtype=np.float64)
        method = method or self.manifest.defaults.method
        served = self.spec.served_methods(self.manifest.defaults.method)
        if method not in served:
            raise InputError(f"unknown method {method!r} for {self.family} model "
                             f"'{self.name}'; choose one of: {', '.join(served)}")
        seeds = np.broadcast_to(np.asarray(seed, dtype=np.uint64), (len(x),))
        rows = np.arange(len(x)) if rows is None else np.asarray(rows)
        cond = None if marginal else self.graph_context(labels, context)
        u, ladj = self.call("preprocess", x)
        u, ladj = u.astype(np.float64), ladj.astype(np.float64)
        # Rows far outside the training support (or outside the logit's domain) never reach
        # the graphs: they would overflow float32 or stall an adaptive solver for the whole
        # batch. They, and any row whose result is not finite, get the documented floor.
        inside = np.isfinite(u).all(1) & np.isfinite(ladj) & (np.abs(u).max(1) <= SUPPORT_BOUND)
        lp = np.full(len(x), LOG_LIKELIHOOD_FLOOR)
        se = None if method == "exact" else np.zeros(len(x))  # Hutchinson's and ELBO's
        nfe = 0
        if inside.any() and marginal:
            got, got_se, nfe = self._marginal_log_prob(u[inside], method, steps, solver, probes,
                                                       seeds[inside], rows[inside])
            lp[inside] = got + ladj[inside]
        elif inside.any():
            got, got_se, nfe = self._log_prob(
                u[inside], method, steps, solver, probes, seeds[inside], rows[inside],
                **_conditioned(None if cond is None else cond[inside]))
            lp[inside] = got + ladj[inside]
            if got_se is not None:
                se[inside] = got_se
        log_prob = np.where(np.isfinite(lp), np.maximum(lp, LOG_LIKELIHOOD_FLOOR),
                            LOG_LIKELIHOOD_FLOOR)
        return LikelihoodOutput(log_prob=log_prob, bits_per_dim=-log_prob / (self.dim * LOG2),
                                std_error=se, method=method, nfe=nfe)

    def _log_prob(self, u: np.ndarray, method: str, steps: int | None, solver: str | None,
                  probes: int | None, seeds: np.ndarray, rows: np.ndarray,
                  cond: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray | None, int]:
        """Model space ``u: (rows, dim)`` -> ``(log p(u): (rows,), std error or None, graph
        calls)``; a family's step. ``seeds``/``rows`` key Hutchinson's probes; ``cond`` is
        the rows' ``context`` graph input of a conditional model."""
        raise NotImplementedError

    def _marginal_log_prob(self, u: np.ndarray, method: str, steps: int | None,
                           solver: str | None, probes: int | None, seeds: np.ndarray,
                           rows: np.ndarray) -> tuple[np.ndarray, None, int]:
        """``log p(u) = logsumexp_k log p(u | k) + log p(k)`` of a label model: every row
        under every class, stacked class-major into one :meth:`_log_prob` call."""
        cond = self.manifest.condition
        if cond is None or cond.kind != "label":
            raise InputError(f"'marginal' applies to a label-conditioned model; model "
                             f"'{self.name}' is " + ("unconditional" if cond is None else
                                                     "conditioned on a context"))
        k, n = cond.width, len(u)
        labels = np.repeat(np.arange(k), n)
        lp, _, nfe = self._log_prob(np.tile(u, (k, 1)), method, steps, solver, probes,
                                    np.tile(seeds, k), np.tile(rows, k),
                                    cond=context_rows(cond, labels=labels))
        joint = lp.reshape(k, n) + np.log(np.asarray(cond.priors))[:, None]
        top = joint.max(0)
        return top + np.log(np.exp(joint - top).sum(0)), None, nfe

    # -- anomaly_score ---------------------------------------------------------------------
    @property
    def score_kind(self) -> str:
        return self.manifest.score_kind

    def score(self, x: np.ndarray, *, seed: int | np.ndarray = 0,
              rows: np.ndarray | None = None, labels: np.ndarray | None = None,
              context: np.ndarray | None = None,
              **likelihood_options: object) -> np.ndarray:
        """The model's anomaly score ``(rows,)`` of its kind (``artifact.scores``): higher is
        more anomalous. Seeded draws (Hutchinson probes, denoising noise) are keyed by each
        row's ``seed`` and ``rows`` index, as in :meth:`log_likelihood`. Rows no model can
        score get ``-LOG_LIKELIHOOD_FLOOR`` (1e30), above every calibrated threshold. A
        conditional model scores each row given its ``labels`` or ``context``."""
        kind = self.score_kind
        if kind == "nll":
            return -self.log_likelihood(x, seed=seed, rows=rows, labels=labels,
                                        context=context, **likelihood_options).log_prob
        if self.manifest.condition is not None:
            raise InputError(f"score kind {kind!r} has no conditional form; a conditional "
                             "model serves 'nll'")
        x = np.asarray(x, dtype=np.float64)
        seeds = np.broadcast_to(np.asarray(seed, dtype=np.uint64), (len(x),))
        rows = np.arange(len(x)) if rows is None else np.asarray(rows)
        u, ladj = self.call("preprocess", x)
        u = u.astype(np.float64)
        inside = np.isfinite(u).all(1) & np.isfinite(ladj) & (np.abs(u).max(1) <= SUPPORT_BOUND)
        out = np.full(len(x), -LOG_LIKELIHOOD_FLOOR)
        if inside.any():
            out[inside] = self._kind_score(kind, u[inside], seeds[inside], rows[inside])
        return np.where(np.isfinite(out), np.minimum(out, -LOG_LIKELIHOOD_FLOOR),
                        -LOG_LIKELIHOOD_FLOOR)

    def _kind_score(self, kind: str, u: np.ndarray, seeds: np.ndarray,
                    rows: np.ndarray) -> np.ndarray:
        """Model space ``u: (rows, dim)`` -> the score of ``kind`` ``(rows,)``; a family's
        step for each kind it lists besides ``nll`` (the manifest allows no other)."""
        raise NotImplementedError(f"{self.family} runtime has no {kind!r} score")

    def anomaly_score(self, x: np.ndarray, *, target_fpr: float | None = None,
                      labels: np.ndarray | None = None, context: np.ndarray | None = None,
                      **score_options: object) -> AnomalyResult:
        """The score, its percentile among normal calibration rows, and the calibrated flag.

        A label model calibrated per class compares each row with its own class's validation
        rows (``thresholds``: each row's class threshold); ``threshold`` stays the model-wide
        one."""
        cal = self.manifest.calibration
        if cal is None:
            raise InputError(f"model '{self.name}' has no anomaly calibration")
        scores = self.score(x, labels=labels, context=context, **score_options)
        threshold = cal.threshold if target_fpr is None else self.threshold_at(target_fpr)
        cond = self.manifest.condition
        if cond is None or not cond.calibrations:
            return AnomalyResult(scores=scores, percentile=percentile(cal, scores),
                                 is_anomaly=scores > threshold, threshold=float(threshold))
        labels = np.asarray(labels, dtype=np.int64)
        per_class = [(c, self._threshold(c, target_fpr)) for c in cond.calibrations]
        thresholds = np.array([t for _, t in per_class])[labels]
        pct = np.empty(len(scores))
        for k, (c, _) in enumerate(per_class):
            mine = labels == k
            pct[mine] = percentile(c, scores[mine])
        return AnomalyResult(scores=scores, percentile=pct, is_anomaly=scores > thresholds,
                             threshold=float(threshold), thresholds=thresholds)

    def _threshold(self, cal: Calibration, target_fpr: float | None) -> float:
        return cal.threshold if target_fpr is None else threshold_at(cal, target_fpr)

    def threshold_at(self, target_fpr: float) -> float:
        if not 0.0 < target_fpr < 1.0:
            raise InputError(f"target_fpr must be in (0, 1); got {target_fpr}")
        return threshold_at(self.manifest.calibration, target_fpr)


def _conditioned(cond: np.ndarray | None, guidance: float | None = None) -> dict[str, object]:
    """``{"cond": cond}`` (and ``guidance``) for a conditional model's family step, ``{}``
    otherwise: a family runtime from outside genserve that serves no conditional model keeps
    its signature."""
    out: dict[str, object] = {} if cond is None else {"cond": cond}
    return out if guidance is None else out | {"guidance": guidance}


RUNTIMES: dict[str, type[ModelRuntime]] = {}


def register_runtime(name: str) -> Callable[[type[ModelRuntime]], type[ModelRuntime]]:
    """Class decorator: serve family ``name`` (registered in ``artifact.families``) with it."""

    def register(cls: type[ModelRuntime]) -> type[ModelRuntime]:
        cls.spec = family(name)
        RUNTIMES[name] = cls
        return cls

    return register


def open_runtime(directory: str | Path, *, manifest: Manifest | None = None,
                 runtime: str = "auto", threads: int | None = None,
                 device: str | Placement = "auto") -> ModelRuntime:
    """The runtime of the model in ``directory`` (its manifest read and verified here unless
    given), of the class registered for its family."""
    manifest = manifest or read_manifest(directory, verify=True)
    cls = RUNTIMES.get(manifest.family)
    if cls is None:
        raise ManifestError(f"{Path(directory).name}: no runtime serves family "
                            f"{manifest.family!r}; served: {', '.join(sorted(RUNTIMES))}")
    return cls(directory, manifest, runtime=runtime, threads=threads, device=device)
