"""Overload protection: a bound on queued verb requests per worker, answered with a fast 503.

Adaptive batching queues requests until their batch runs; without a bound, a burst larger
than the workers can serve in ``GENSERVE_TIMEOUT_S`` waits and then times out (504) after
holding memory and sockets the whole time. This ASGI middleware counts the verb requests each
worker holds (queued or running) and answers at once, before reading the body, when a new one
would exceed ``GENSERVE_MAX_QUEUE``::

    503 {"error": "the server is at capacity: ...; retry after 1 s"}   Retry-After: 1

It also adds a ``Retry-After`` header to the other "try again" answers that BentoML itself
produces (503 when a batch's ``max_latency_ms`` is overrun), so a
client can treat every overload the same way. The gRPC side maps 503 to UNAVAILABLE and passes
the hint on as ``retry-after`` trailing metadata (docs/GRPC.md).
"""

from __future__ import annotations

from typing import Any

from service.boundary import VERB_PATHS, send_json
from service.metrics import OVERLOAD
from service.settings import Settings, load_settings

__all__ = ["OverloadMiddleware"]

RETRY_STATUSES = frozenset({503})


class OverloadMiddleware:
    """Reject verb requests beyond ``settings.max_queue`` in flight in this worker."""

    def __init__(self, app: Any, settings: Settings | None = None) -> None:
        self.app = app
        self.settings = settings or load_settings()
        self.in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") not in VERB_PATHS:
            return await self.app(scope, receive, send)
        verb = VERB_PATHS[scope["path"]]
        limit = self.settings.max_queue
        retry = str(self.settings.retry_after_s).encode()
        if self.in_flight >= limit:
            OVERLOAD.labels(verb=verb).inc()
            return await send_json(send, 503, {
                "error": f"the server is at capacity: {limit} requests are already queued on "
                         f"this worker (GENSERVE_MAX_QUEUE); retry after "
                         f"{self.settings.retry_after_s} s"}, [(b"retry-after", retry)])

        async def send_with_hint(message: dict) -> None:
            if message["type"] == "http.response.start" and message["status"] in RETRY_STATUSES:
                headers = list(message.get("headers") or [])
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", retry))
                message = dict(message, headers=headers)
            await send(message)

        self.in_flight += 1
        try:
            return await self.app(scope, receive, send_with_hint)
        finally:
            self.in_flight -= 1
