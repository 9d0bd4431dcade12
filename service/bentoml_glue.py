"""Every use of BentoML's private internals (and of the prometheus_client internals behind
BentoML's ``/metrics``), in one place.

genserve relies on BentoML 1.4's public service API and on six private pieces, each listed
in :data:`PATCHES` with what it buys; ``tests/test_bentoml_glue.py`` fails by name when the
installed BentoML no longer has what a piece touches.

* ``row-containers``: our requests are flat Pydantic objects, and BentoML's batcher counts a
  batch's size through a "data container" registered per type. Ours count rows (``n`` for
  sampling, ``len(x)`` otherwise), hand the API one ``Parts`` list per batch, split one
  request in two at a row boundary, and merge the two halves' answers
  (``service.batching`` holds the logic).
* ``batch-wait-cap``: BentoML's adaptive dispatcher learns how long to hold a request back
  to wait for company from the queueing time of recent batches, which includes time spent
  behind a running batch; after a burst of slow requests a lone request is held for
  hundreds of milliseconds. The cap keeps that wait at ``GENSERVE_MAX_BATCH_WAIT_MS``.
* ``bind-api-once``: BentoML's HTTP app rebuilds the bound API wrapper (running
  ``inspect.signature``) on every request; the first one is kept.
* ``app-factory``: the boundary hands an already validated request to the API's batcher (or,
  batching off, to its worker-thread call) and reads the served model set from the service
  instance, both reached through the object that owns BentoML's routes (:class:`AppFactory`).
* ``metrics-unsized-files``: BentoML's ``/metrics`` merges every process's prometheus_client
  multiprocess file. A process creates its file empty and sizes it a moment later; a scrape
  that reads it in between raised ``struct.error`` and answered 500 (seen while a worker
  starts or loads a model version). Such a file holds no samples yet, so it is read as
  empty (:func:`skip_unsized_metric_files`).
* ``timeout-timers``: BentoML's ``TimeoutMiddleware`` schedules a timer per request for
  ``traffic.timeout`` (60 s) and never cancels it, so under load the event loop holds
  rate x 60 s live timers, futures and contexts (150 000 at 2 500 requests/s). The heap
  grows with the load and every full garbage collection walks it: pauses grew to 350 ms and
  set the p99. The timer is now cancelled as soon as the answer starts
  (:func:`cancel_timeout_timers`); what the middleware answers is unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from _bentoml_sdk.method import APIMethod
from bentoml._internal.marshal.dispatcher import Optimizer
from bentoml._internal.runner.container import DataContainer, DataContainerRegistry
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from prometheus_client.mmap_dict import MmapedDict

from service.batching import Answers, Parts, merge_answers, rows_of, split_request

__all__ = ["PATCHES", "AppFactory", "Patch", "bind_api_once", "cap_batch_wait",
           "cancel_timeout_timers", "register_containers", "skip_unsized_metric_files"]


@dataclass(frozen=True)
class Patch:
    """One private piece of BentoML genserve depends on, and a check that it is there."""

    name: str
    purpose: str
    present: Callable[[], bool]


def _has(module: str, *path: str) -> Callable[[], bool]:
    def present() -> bool:
        try:
            obj: Any = __import__(module, fromlist=["_"])
        except ImportError:
            return False
        for attr in path:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True

    return present


# --- row-containers ----------------------------------------------------------------------


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
        return split_request(batch, int(indices[1]))


class _AnswerContainer(DataContainer[Any, Answers]):
    @classmethod
    def get_batch_size(cls, batch: Any, batch_dim: int) -> int:
        return len(batch) if isinstance(batch, Answers) else 1

    @classmethod
    def batches_to_batch(cls, batches: Sequence[Any], batch_dim: int = 0) -> tuple[Any, list[int]]:
        merged = batches[0]
        for other in batches[1:]:
            merged = merge_answers(merged, other)
        return merged, list(range(len(batches) + 1))

    @classmethod
    def batch_to_batches(cls, batch: Any, indices: Sequence[int], batch_dim: int = 0) -> list[Any]:
        if not isinstance(batch, Answers) or len(batch) != len(indices) - 1:
            raise TypeError("one answer per request part is expected")
        return list(batch)


def register_containers(request_types: Sequence[type], answer_types: Sequence[type]) -> None:
    """Teach BentoML's batcher our request and answer types (idempotent)."""
    for cls in request_types:
        DataContainerRegistry.register_container(cls, cls, _RequestContainer)
    for cls in (*answer_types, Answers):
        DataContainerRegistry.register_container(cls, cls, _AnswerContainer)


# --- batch-wait-cap ----------------------------------------------------------------------


def cap_batch_wait(max_wait_s: float) -> None:
    """Cap the wait BentoML's adaptive dispatcher learns (one dispatcher serves every model
    of a verb, so one model's burst would slow the others). Idempotent; the latest cap wins.
    Requests still gather while a batch runs, so batching under load is kept."""
    refresh = Optimizer.trigger_refresh
    if not getattr(refresh, "_genserve_capped", False):

        def trigger_refresh(self: Any) -> None:
            refresh(self)
            self.wait = min(self.wait, Optimizer._genserve_wait_cap)

        trigger_refresh._genserve_capped = True  # type: ignore[attr-defined]
        Optimizer.trigger_refresh = trigger_refresh
    Optimizer._genserve_wait_cap = max(0.0, float(max_wait_s))


# --- bind-api-once -----------------------------------------------------------------------


def bind_api_once() -> None:
    """Bind each API method to the service instance once, not on every request. The wrapper
    depends only on the method and the instance, so the first one is kept. Idempotent."""
    original = APIMethod._local_call
    if getattr(original, "_genserve_once", False):
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


# --- app-factory -------------------------------------------------------------------------

_FACTORY_ATTRS = ("batch_infer", "_to_thread", "_service_instance", "service")


class AppFactory:
    """The object behind BentoML 1.4's routes: it owns each API's adaptive batcher and the
    service instance. :meth:`find` returns None when the app has another shape, and the
    boundary then sends requests through BentoML's own HTTP route."""

    def __init__(self, factory: Any) -> None:
        self._factory = factory
        self.service_name: str = factory.service.name

    @classmethod
    def find(cls, app: Any, paths: Sequence[str]) -> AppFactory | None:
        """The factory of the BentoML app behind ``app`` (the ASGI app inside our
        middleware), whose routes include ``paths``."""
        for _ in range(32):  # middleware chain down to Starlette's router
            if app is None or hasattr(app, "routes"):
                break
            app = getattr(app, "app", None)
        for route in getattr(app, "routes", None) or ():
            if getattr(route, "path", None) not in paths:
                continue
            factory = getattr(getattr(getattr(route, "endpoint", None), "func", None),
                              "__self__", None)
            if factory is None or not all(hasattr(factory, a) for a in _FACTORY_ATTRS):
                return None
            return cls(factory)
        return None

    @property
    def instance(self) -> Any:
        """The service instance (``GenServe``), made by BentoML at start-up."""
        return self._factory._service_instance

    def input_type(self, api: str) -> type:
        """BentoML's input type of an API: a request validated into it joins the batcher."""
        return self._factory.service.apis[api].input_spec

    def batchable(self, api: str) -> bool:
        return bool(self._factory.service.apis[api].batchable)

    async def batch_infer(self, api: str, request: Any) -> Any:
        """Queue ``request`` in the API's adaptive batcher; its answer when the batch ran."""
        return await self._factory.batch_infer(api, (request,), {})

    async def call_unbatched(self, api: str, request: Any) -> Any:
        """The API method on BentoML's worker threads (batching off)."""
        func = getattr(self._factory._service_instance, api).local
        return await self._factory._to_thread(func, request)


# --- metrics-unsized-files ---------------------------------------------------------------


def skip_unsized_metric_files() -> None:
    """Read a multiprocess metrics file shorter than its 4-byte header as holding no samples.
    prometheus_client opens a process's file (creating it empty) before it truncates it to
    its initial size, and its reader unpacks the header unchecked. Idempotent."""
    original = MmapedDict.read_all_values_from_file
    if getattr(original, "_genserve_unsized", False):
        return

    def read_all_values_from_file(filename: str) -> Any:
        try:
            return original(filename)
        except struct.error:  # only the header unpack runs eagerly: the file is unsized
            return iter(())

    read_all_values_from_file._genserve_unsized = True  # type: ignore[attr-defined]
    MmapedDict.read_all_values_from_file = staticmethod(read_all_values_from_file)


# --- timeout-timers ----------------------------------------------------------------------


def cancel_timeout_timers() -> None:
    """BentoML's ``TimeoutMiddleware.__call__``, with its timer cancelled once the answer has
    started (the timer's only job, answering 504 before that, is over). Idempotent."""
    if getattr(TimeoutMiddleware.__call__, "_genserve_cancels", False):
        return
    from starlette.responses import JSONResponse

    async def call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

        async def _send(message: Any) -> None:
            if not waiter.done():
                waiter.set_result(None)
                timer.cancel()
            await send(message)

        fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
        try:
            await waiter
        except TimeoutError:
            if fut.cancel():
                resp = JSONResponse({"error": f"Not able to process the request in "
                                              f"{self.timeout} seconds"}, status_code=504)
                await resp(scope, receive, send)
        else:
            await fut
        finally:
            timer.cancel()

    call._genserve_cancels = True  # type: ignore[attr-defined]
    TimeoutMiddleware.__call__ = call


PATCHES: tuple[Patch, ...] = (
    Patch("row-containers", "batches counted in rows; one request split at a row boundary",
          _has("bentoml._internal.runner.container", "DataContainerRegistry",
               "register_container")),
    Patch("batch-wait-cap", "a lone request is not held back after a burst of slow ones",
          _has("bentoml._internal.marshal.dispatcher", "Optimizer", "trigger_refresh")),
    Patch("bind-api-once", "no inspect.signature per request",
          _has("_bentoml_sdk.method", "APIMethod", "_local_call")),
    Patch("app-factory", "validated requests go straight to the batcher; the model set is "
          "read from the service instance", _has("_bentoml_impl.server.app",
                                                  "ServiceAppFactory", "batch_infer")),
    Patch("timeout-timers", "no timer per request left alive for traffic.timeout; the heap "
          "and garbage-collection pauses stay flat under load",
          _has("bentoml._internal.server.http.traffic", "TimeoutMiddleware", "_set_timer_out")),
    Patch("metrics-unsized-files", "a scrape while a process creates its metrics file "
          "answers 200, not 500", _has("prometheus_client.mmap_dict", "MmapedDict",
                                      "read_all_values_from_file")),
)
