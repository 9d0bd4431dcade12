"""Validated verb requests from the boundary straight to BentoML's batcher.

BentoML's HTTP route for an API would read the body again, parse and validate it again (the
boundary has just done both), pass it through Starlette's router, BentoML's request context
and IO descriptors, and stream the answer back in chunks; the worker is one event loop under
one GIL, so that work sets the served rows/s of small requests.

:class:`Dispatch` hands the request the boundary already holds to the place BentoML's route
hands it: the API's adaptive batcher, or, with batching off, the API method on BentoML's
worker threads (both reached through ``service.http.bentoml_glue.AppFactory``). The request
object is BentoML's own input type for the API (the boundary validates the body straight
into it, so nothing is validated twice), and the answer is the same JSON with a
content-length instead of chunks. A request that times out (BentoML answers 504) while still
queued is marked abandoned, and ``GenServe`` leaves it out of its batch instead of computing
rows nobody will read (``genserve_abandoned_total``). Errors keep their statuses: a
per-request error answer from ``GenServe`` as is, BentoML's exceptions (503 when
``max_latency_ms`` is overrun) with their status, anything else 500 with the reason in the
server log. Where BentoML's app has another shape, the boundary sends requests through
BentoML's route, as it does with ``GENSERVE_FAST_PATH=false`` (the test suite runs every verb
both ways and compares the answers).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Any

from bentoml.exceptions import BentoMLException
from pydantic import ValidationError

from service.http.bentoml_glue import AppFactory

__all__ = ["Dispatch", "being_cancelled"]

log = logging.getLogger("genserve")

_UNEXPECTED = "An unexpected error has occurred, please check the server log."
_OVERRUN = ("the request waited for a batch longer than GENSERVE_MAX_LATENCY_MS allows: the "
            "server is overloaded; retry later")


def being_cancelled() -> bool:
    """Whether the running task is being cancelled (BentoML's timeout cancels it), whatever
    the code it was awaiting made of the ``CancelledError``."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Dispatch:
    """Run one verb request through the API's batcher; returns ``(status, headers, body)``."""

    def __init__(self, factory: AppFactory, verbs: Iterable[str]) -> None:
        self.factory = factory
        self.server = f"BentoML Service/{factory.service_name}".encode()
        # BentoML's input type per verb: the boundary validates straight into it
        self.types = {v: factory.input_type(v) for v in verbs}

    async def __call__(self, verb: str, request: Any) -> tuple[int, list, bytes]:
        """``request``: validated by the boundary, an instance of ``self.types[verb]``."""
        try:
            if self.factory.batchable(verb):
                answer = await self.factory.batch_infer(verb, request)
            else:
                answer = await self.factory.call_unbatched(verb, request)
        except ValidationError as exc:  # the boundary checks first; same answer as BentoML's
            return self._json(400, {"error": f"{exc.error_count()} validation error for "
                                             f"{exc.title}",
                                    "detail": exc.errors(include_context=False,
                                                         include_input=False)})
        except (Exception, asyncio.CancelledError) as exc:
            # BentoML's timeout cancels this task and answers 504 itself; its batcher turns
            # the cancellation into a 503 error, so look at the task, not at the exception.
            # Marked abandoned, a request still queued is left out of its batch.
            if isinstance(exc, asyncio.CancelledError) or being_cancelled():
                request._ticket.abandoned = True
                raise asyncio.CancelledError from None
            return self._error(verb, exc)
        if hasattr(answer, "model_dump_json"):
            return 200, self._headers(), answer.model_dump_json().encode()
        # a per-request error answer (a starlette JSONResponse) from GenServe
        return answer.status_code, self._headers(), bytes(answer.body)

    def _error(self, verb: str, exc: Exception) -> tuple[int, list, bytes]:
        if isinstance(exc, BentoMLException):
            status = int(exc.error_code.value)
            log.warning("/%s answered %d: %s", verb, status, exc)
            message = {503: _OVERRUN}.get(status, str(exc) if status < 500 else _UNEXPECTED)
            return self._json(status, {"error": message})
        log.error("/%s failed", verb, exc_info=exc)
        return self._json(500, {"error": _UNEXPECTED})

    def _headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"content-type", b"application/json"), (b"server", self.server)]

    def _json(self, status: int, payload: dict) -> tuple[int, list, bytes]:
        return status, self._headers(), json.dumps(payload).encode()
