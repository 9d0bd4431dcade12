"""The three verbs over a group of validated requests for one model: one graph call each.

Each function takes requests that share a model version and options (a group of a batch
that may hold requests of every transport) and returns one response per request, in order,
each naming the version that answered, its arrays numpy (JSON lists over HTTP, tensor bytes
over gRPC).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.runtime import ModelRuntime, SeededRows
from service.schemas import (
    AnomalyScoreRequest,
    AnomalyScoreResponse,
    LogLikelihoodRequest,
    LogLikelihoodResponse,
    SampleRequest,
    SampleResponse,
)

__all__ = ["GROUP_KEYS", "run_anomaly_score", "run_log_likelihood", "run_sample"]


def _stack(parts: Sequence[LogLikelihoodRequest | AnomalyScoreRequest]) -> tuple[np.ndarray, list]:
    arrays = [np.asarray(p.x, dtype=np.float64) for p in parts]
    bounds = np.cumsum([0] + [len(a) for a in arrays]).tolist()
    return np.concatenate(arrays, axis=0), list(zip(bounds[:-1], bounds[1:], strict=True))


def _row_keys(parts: Sequence[LogLikelihoodRequest | AnomalyScoreRequest],
              ) -> dict[str, np.ndarray]:
    """Each row's seed and index within its client's request: what its Hutchinson probes
    are drawn from, so its answer is the same alone, batched or split."""
    seeds = [np.full(len(p.x), getattr(p, "seed", None) or 0, dtype=np.uint64) for p in parts]
    rows = [p._offset + np.arange(len(p.x)) for p in parts]
    return {"seed": np.concatenate(seeds), "rows": np.concatenate(rows)}


def _conditions(parts: Sequence[SampleRequest | LogLikelihoodRequest | AnomalyScoreRequest],
                ) -> dict[str, np.ndarray]:
    """The rows' labels or contexts, in row order (validation made them one per row): rows of
    every label share the group's one graph call."""
    out = {}
    for field, key in (("y", "labels"), ("context", "context")):
        if getattr(parts[0], field) is not None:
            out[key] = np.concatenate([getattr(p, field) for p in parts])
    return out


def run_sample(rt: ModelRuntime, parts: Sequence[SampleRequest]) -> list[SampleResponse]:
    first = parts[0]
    solver, steps = rt.resolve_solver(first.solver, first.steps)
    out = rt.sample_many([SeededRows(p.n, p.seed, p._offset) for p in parts],
                         steps=steps, solver=solver, guidance=first.guidance,
                         **_conditions(parts))
    return [
        SampleResponse(model=rt.name, version=rt.version, samples=block, seed=p.seed,
                       steps=steps, solver=solver, nfe=out.nfe)
        for p, block in zip(parts, out.blocks, strict=True)
    ]


def run_log_likelihood(rt: ModelRuntime,
                       parts: Sequence[LogLikelihoodRequest]) -> list[LogLikelihoodResponse]:
    first = parts[0]
    x, spans = _stack(parts)
    out = rt.log_likelihood(x, method=first.method, steps=first.steps, solver=first.solver,
                            probes=first.probes, marginal=first.marginal, **_row_keys(parts),
                            **_conditions(parts))
    return [
        LogLikelihoodResponse(
            model=rt.name,
            version=rt.version,
            log_likelihood=out.log_prob[a:b],
            bits_per_dim=out.bits_per_dim[a:b],
            method=out.method,
            std_error=[] if out.std_error is None else out.std_error[a:b],
            nfe=out.nfe,
        )
        for a, b in spans
    ]


def run_anomaly_score(rt: ModelRuntime,
                      parts: Sequence[AnomalyScoreRequest]) -> list[AnomalyScoreResponse]:
    x, spans = _stack(parts)
    out = rt.anomaly_score(x, target_fpr=parts[0].target_fpr, **_row_keys(parts),
                           **_conditions(parts))
    return [
        AnomalyScoreResponse(
            model=rt.name,
            version=rt.version,
            scores=out.scores[a:b],
            score=rt.score_kind,
            threshold=out.threshold,
            thresholds=[] if out.thresholds is None else out.thresholds[a:b],
            is_anomaly=out.is_anomaly[a:b],
            percentile=out.percentile[a:b],
        )
        for a, b in spans
    ]


# Requests that agree on these fields run as one graph call (``version``: the one each
# request was given when it was validated; two versions never share a graph call).
GROUP_KEYS = {
    "sample": ("model", "version", "steps", "solver", "guidance"),
    "log_likelihood": ("model", "version", "method", "steps", "solver", "probes", "marginal"),
    "anomaly_score": ("model", "version", "target_fpr"),
}
RUNNERS = {
    "sample": run_sample,
    "log_likelihood": run_log_likelihood,
    "anomaly_score": run_anomaly_score,
}
