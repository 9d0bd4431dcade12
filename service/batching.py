"""Rows as the unit of BentoML's adaptive batching, for flat JSON requests.

BentoML batches a batchable API's single argument with a "data container" chosen by type.
Its default container counts list items; our requests are flat Pydantic objects, so we
register containers that count a request's *rows* (``n`` for sampling, ``len(x)``
otherwise), hand the API one ``Parts`` list per batch, split one request across two batches
at a row boundary (keeping its row offset, so seeded samples do not change), and merge the
two halves' answers back. The API returns one answer per part, errors included, so a part
that cannot be served fails alone, not its batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from bentoml._internal.runner.container import DataContainer, DataContainerRegistry
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from service.schemas import (
    AnomalyScoreRequest,
    AnomalyScoreResponse,
    LogLikelihoodRequest,
    LogLikelihoodResponse,
    SampleRequest,
    SampleResponse,
)

__all__ = ["Answers", "Parts", "bind_api_once", "cap_batch_wait", "error_answer",
           "register_containers", "rows_of"]

REQUEST_TYPES = (SampleRequest, LogLikelihoodRequest, AnomalyScoreRequest)
RESPONSE_TYPES = (SampleResponse, LogLikelihoodResponse, AnomalyScoreResponse)


class Parts(list):
    """The requests (or parts of requests) in one batch, in arrival order."""


class Answers(list):
    """One answer per part, in the same order: a response model or an error response."""


def rows_of(req: BaseModel) -> int:
    return int(req.n) if isinstance(req, SampleRequest) else len(req.x)


def error_answer(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _split(req: BaseModel, k: int) -> list[BaseModel]:
    """Two parts: rows ``[0, k)`` and ``[k, rows)`` of ``req``."""
    offset = req._offset
    if isinstance(req, SampleRequest):
        first, second = req.model_copy(update={"n": k}), req.model_copy(update={"n": req.n - k})
    else:
        first, second = req.model_copy(update={"x": req.x[:k]}), req.model_copy(
            update={"x": req.x[k:]})
    first._offset, second._offset = offset, offset + k
    return [first, second]


class _RequestContainer(DataContainer[Any, Parts]):
    @classmethod
    def get_batch_size(cls, batch: Any, batch_dim: int) -> int:
        return sum(map(rows_of, batch)) if isinstance(batch, Parts) else rows_of(batch)

    @classmethod
    def batches_to_batch(
        cls, batches: Sequence[Any], batch_dim: int = 0
    ) -> tuple[Parts, list[int]]:
        indices = [0, *itertools.accumulate(rows_of(b) for b in batches)]
        return Parts(batches), indices

    @classmethod
    def batch_to_batches(cls, batch: Any, indices: Sequence[int], batch_dim: int = 0) -> list[Any]:
        if isinstance(batch, Parts) or len(indices) != 3 or indices[0] != 0:
            raise TypeError("genserve requests are split only in two at a row boundary")
        return _split(batch, int(indices[1]))


def _merge(first: Any, second: Any) -> Any:
    """The answer of a request that was split over two batches."""
    if isinstance(first, Response):
        return first
    if isinstance(second, Response):
        return second
    update = {}
    for name, value in first:
        other = getattr(second, name)
        if isinstance(value, list):
            update[name] = value + other
        elif name == "nfe":
            update[name] = max(value, other)
    return first.model_copy(update=update)


class _AnswerContainer(DataContainer[Any, Answers]):
    @classmethod
    def get_batch_size(cls, batch: Any, batch_dim: int) -> int:
        return len(batch) if isinstance(batch, Answers) else 1

    @classmethod
    def batches_to_batch(cls, batches: Sequence[Any], batch_dim: int = 0) -> tuple[Any, list[int]]:
        merged = batches[0]
        for other in batches[1:]:
            merged = _merge(merged, other)
        return merged, list(range(len(batches) + 1))

    @classmethod
    def batch_to_batches(cls, batch: Any, indices: Sequence[int], batch_dim: int = 0) -> list[Any]:
        if not isinstance(batch, Answers) or len(batch) != len(indices) - 1:
            raise TypeError("one answer per request part is expected")
        return list(batch)


def cap_batch_wait(max_wait_s: float) -> None:
    """Bound how long BentoML's adaptive dispatcher holds a request back to wait for company.

    The dispatcher learns that wait as the mean queueing time of the first request of its last
    50 batches, and that mean includes time spent behind a running batch. After a burst of
    slow requests (a PF-ODE likelihood at concurrency 64) it is hundreds of ms; afterwards a
    lone request is held that long before it runs, and since each held batch feeds the same
    mean, it decays only slowly (measured: a 1-row flow request went from 4 ms to 35 ms and
    stayed there). One dispatcher serves every model of a verb, so one model's burst slows
    the others. Capping the learned wait keeps batching under load (requests still gather
    while a batch runs) and a lone request's latency near its compute time.
    Idempotent; the latest cap wins. A BentoML without this optimizer is left alone.
    """
    try:
        from bentoml._internal.marshal.dispatcher import Optimizer
    except ImportError:  # pragma: no cover - depends on the BentoML version
        return
    if not hasattr(Optimizer, "_genserve_wait_cap"):
        refresh = Optimizer.trigger_refresh

        def trigger_refresh(self: Any) -> None:
            refresh(self)
            self.wait = min(self.wait, Optimizer._genserve_wait_cap)

        Optimizer.trigger_refresh = trigger_refresh
    Optimizer._genserve_wait_cap = max(0.0, float(max_wait_s))


def bind_api_once() -> None:
    """Bind each BentoML API method to the service instance once, not on every request.

    BentoML's HTTP app looks the API up on the service instance per request, and
    ``APIMethod.__get__`` rebuilds the bound wrapper each time, running ``inspect.signature``
    on the method: about 9 % of the worker's time per small request (py-spy, 1-row requests
    at concurrency 64). The wrapper depends only on the method and the instance, so the first
    one is kept. Idempotent. A BentoML without ``APIMethod._local_call`` is left alone.
    """
    try:
        from _bentoml_sdk.method import APIMethod
    except ImportError:  # pragma: no cover - depends on the BentoML version
        return
    original = getattr(APIMethod, "_local_call", None)
    if original is None or getattr(original, "_genserve_once", False):
        return
    bound: dict[tuple[int, int], tuple[Any, Any]] = {}

    def local_call(self: Any, instance: Any) -> Any:
        key = (id(self), id(instance))
        hit = bound.get(key)
        if hit is None or hit[0] is not instance:  # the instance is held: ids cannot recur
            hit = bound[key] = (instance, original(self, instance))
        return hit[1]

    local_call._genserve_once = True  # type: ignore[attr-defined]
    APIMethod._local_call = local_call


def register_containers() -> None:
    """Teach BentoML's batcher our types (idempotent; call at service import)."""
    for cls in REQUEST_TYPES:
        DataContainerRegistry.register_container(cls, cls, _RequestContainer)
    for cls in (*RESPONSE_TYPES, Answers, JSONResponse):
        DataContainerRegistry.register_container(cls, cls, _AnswerContainer)
