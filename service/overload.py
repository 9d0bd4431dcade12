"""Overload protection: a bound on queued verb requests per worker, answered with a fast 503.

Adaptive batching queues requests until their batch runs; without a bound, a burst larger
than the workers can serve in ``GENSERVE_TIMEOUT_S`` waits and then times out (504) after
holding memory and sockets the whole time. :class:`Admission` counts the verb requests each
worker holds (queued or running, until the answer is sent) and refuses a new one that would
exceed ``GENSERVE_MAX_QUEUE``, before its body is read::

    503 {"error": "the server is at capacity: ...; retry after 1 s"}   Retry-After: 1

The boundary (``service.http.boundary``) admits every verb request once its key and rate are
checked, so a refused request leaves an access log line and its metrics like any other. It
also adds the ``Retry-After`` header to the other "try again" answer, 503 when a batch's
``max_latency_ms`` is overrun, so a client can treat every overload the same way. The gRPC
side maps 503 to UNAVAILABLE and passes the hint on as ``retry-after`` trailing metadata
(docs/GRPC.md).
"""

from __future__ import annotations

from service.metrics import OVERLOAD
from service.settings import Settings
from service.validation import Refused

__all__ = ["RETRY_STATUSES", "Admission"]

RETRY_STATUSES = frozenset({503})


class Admission:
    """Verb requests in flight in this worker, at most ``settings.max_queue``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.in_flight = 0
        self.retry = (b"retry-after", str(settings.retry_after_s).encode())

    def admit(self, verb: str) -> None:
        """Count one more request in, or refuse it (503 with ``Retry-After``)."""
        limit = self.settings.max_queue
        if self.in_flight >= limit:
            OVERLOAD.labels(verb=verb).inc()
            raise Refused(503, f"the server is at capacity: {limit} requests are already "
                          f"queued on this worker (GENSERVE_MAX_QUEUE); retry after "
                          f"{self.settings.retry_after_s} s", [self.retry])
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1

    def hinted(self, status: int, headers: list[tuple[bytes, bytes]]
               ) -> list[tuple[bytes, bytes]]:
        """``headers`` with ``Retry-After`` added to a "try again" answer that lacks it."""
        if status in RETRY_STATUSES and not any(k.lower() == b"retry-after" for k, _ in headers):
            return [*headers, self.retry]
        return headers
