"""The one data plane every transport calls (HTTP and gRPC, in the same worker process).

A transport converts its wire format at its edge and calls, in order: :meth:`authenticate`
(the bearer token when access control is on, 401), :meth:`limit` (the key's request rate,
429 with a retry hint), :meth:`admit` (the worker's queue bound, 503 with a retry hint),
:meth:`validate` (the request against the card of the model version it gets, 4xx; a bad
request never joins a batch; a valid one holds that version until it is answered) and
:meth:`infer`, which hands the validated request to BentoML's adaptive batcher for
the verb (or, batching off, its worker-thread call): requests of every transport share the
same batches, runtime and metrics. :meth:`record` counts the answer per API key and writes
the one access log line of the request.

The repository API (``POST /models/{name}/load`` and ``/unload``, gRPC
``RepositoryModelLoad``/``Unload``) goes through :meth:`authorize_admin` (the
metrics/admin token when one is set; refused when API keys are on without one) and
:meth:`repository`, which changes the worker's model set (``service.models``) off the event
loop.

A request whose deadline passes while it is still queued is marked abandoned, and the batch
leaves it out (``genserve_abandoned_total``). Errors keep their statuses: a per-request
error answer from ``GenServe`` as it is, BentoML's exceptions (503 when ``max_latency_ms`` is
overrun) with theirs, anything else 500 with the reason in the server log.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import bentoml
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, ValidationError

from service.access_log import access_logger, log_access
from service.auth import TOKEN_REQUIRED, ApiKey, KeyStore, RateLimiter
from service.batching import ErrorAnswer
from service.bentoml_glue import AppFactory
from service.metrics import REQUESTS
from service.models import Snapshot
from service.overload import Admission
from service.schemas import VERBS, ModelInfo, RepositoryAnswer
from service.settings import Settings
from service.validation import Refused, RequestError, validate_verb

__all__ = ["KEY_REQUESTS", "DataPlane", "Outcome", "being_cancelled", "unauthorized"]

log = logging.getLogger("genserve")

# Key names are operator-configured (bounded); "none" = no valid token, "anonymous" = auth off.
KEY_REQUESTS = bentoml.metrics.Counter(
    name="genserve_key_requests_total",
    documentation="Verb requests by API key name, verb and HTTP status",
    labelnames=["key", "verb", "status"],
)
UNEXPECTED = "An unexpected error has occurred, please check the server log."
ADMIN_OFF = ("the repository API needs the admin token when API keys are on: set "
             "GENSERVE_METRICS_TOKEN_FILE (the /metrics token is the admin token)")
OVERRUN = ("the request waited for a batch longer than GENSERVE_MAX_LATENCY_MS allows: the "
           "server is overloaded; retry later")


def being_cancelled() -> bool:
    """Whether the running task is being cancelled (a timeout cancels it), whatever the code
    it was awaiting made of the ``CancelledError``."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@dataclass
class Outcome:
    """A verb's answer: ``status``, and the response (200) or ``{"error": ...}`` (else)."""

    status: int
    answer: BaseModel | None = None
    error: dict[str, Any] | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def unauthorized() -> Refused:
    return Refused(401, TOKEN_REQUIRED, [(b"www-authenticate", b'Bearer realm="genserve"')])


class DataPlane:
    """One worker's data plane over BentoML's app and the settings.

    ``find_app``: returns BentoML's app factory, looked up at the first use (BentoML builds
    its app after the middleware that makes this data plane).
    """

    def __init__(self, find_app: Callable[[], AppFactory | None], settings: Settings) -> None:
        self._find_app = find_app
        self._factory: AppFactory | None = None
        self._types: dict[str, type] | None = None
        self.settings = settings
        self.keys = KeyStore.from_settings(settings)
        self.admin_keys = KeyStore.for_metrics(settings)  # /metrics and the repository API
        self.limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst,
                                   workers=settings.workers)
        self.admission = Admission(settings)
        self.access = access_logger(settings.access_log)

    @property
    def factory(self) -> AppFactory:
        if self._factory is None:
            self._factory = self._find_app()
            if self._factory is None:
                raise RuntimeError("BentoML's app has a shape service.bentoml_glue does not "
                                   "know; see tests/test_bentoml_glue.py")
        return self._factory

    @property
    def types(self) -> dict[str, type]:
        """BentoML's input type per verb: requests are validated straight into it."""
        if self._types is None:
            self._types = {verb: self.factory.input_type(verb) for verb in VERBS}
        return self._types

    @property
    def snapshot(self) -> Snapshot:
        """What serves now, from the service instance's model set (``service.models``)."""
        return self.factory.instance.model_set.snapshot

    @property
    def cards(self) -> dict[str, ModelInfo]:
        """The served models' cards (each of the version requests naming none get)."""
        return self.snapshot.cards

    @property
    def ready(self) -> bool:
        instance = self.factory.instance
        return instance is not None and bool(instance.model_set.snapshot.cards)

    def authenticate(self, header: str | bytes | None) -> ApiKey | None:
        """The caller's key (None with access control off), or 401."""
        if not self.keys.enabled:
            return None
        key = self.keys.authenticate(header)
        if key is None:
            raise unauthorized()
        return key

    def limit(self, key: ApiKey | None) -> None:
        """Take one request from the key's token bucket, or 429 with a retry hint."""
        wait = self.limiter.acquire(key.name if key else "anonymous", key)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise Refused(429, f"the request rate limit of this API key is reached; retry "
                          f"after {retry} s", [(b"retry-after", str(retry).encode())],
                          retry_after_s=retry)

    def admit(self, verb: str) -> None:
        """Count the request in this worker's queue, or 503 with a retry hint; pair with
        :meth:`release`."""
        self.admission.admit(verb)

    def release(self) -> None:
        self.admission.release()

    def validate(self, verb: str, body: Any) -> Any:
        """The request of ``body`` (a dict), validated against the card of the version it
        gets (its own ``version``, else the model's default), holding that version: both
        from one snapshot, so a swap in between cannot pair one version's card with another's
        graphs."""
        snapshot = self.snapshot
        request = validate_verb(verb, body, snapshot.cards, self.settings, self.types)
        request._served = snapshot.served[(request.model, request.version)]
        return request

    def authorize_admin(self, header: str | bytes | None) -> None:
        """The repository API's check: the admin token (``GENSERVE_METRICS_TOKEN_FILE``) when
        it is set (401), refused (403) when API keys are on without it, open otherwise."""
        if self.admin_keys.enabled:
            if self.admin_keys.authenticate(header) is None:
                raise unauthorized()
        elif self.keys.enabled:
            raise RequestError(403, ADMIN_OFF)

    async def repository(self, action: str, name: str, version: int | None
                         ) -> RepositoryAnswer:
        """``load`` or ``unload`` model folder ``name`` (one ``version``, or all) in this
        worker now, and in the server's other workers at their next refresh."""
        model_set = self.factory.instance.model_set
        call = model_set.load_model if action == "load" else model_set.unload_model
        return await asyncio.to_thread(call, name, version)

    async def infer(self, verb: str, request: Any) -> Outcome:
        """Run a validated request through the verb's batcher (with its peers of every
        transport) and return its own answer."""
        try:
            if self.factory.batchable(verb):
                answer = await self.factory.batch_infer(verb, request)
            else:
                answer = await self.factory.call_unbatched(verb, request)
        except ValidationError as exc:  # validation runs first; same answer as BentoML's
            return Outcome(400, error={"error": f"{exc.error_count()} validation error for "
                                                f"{exc.title}",
                                       "detail": exc.errors(include_context=False,
                                                            include_input=False)})
        except (Exception, asyncio.CancelledError) as exc:
            # A timeout cancels this task; BentoML's batcher turns the cancellation into a
            # 503 error, so look at the task, not at the exception. Marked abandoned, a
            # request still queued is left out of its batch.
            if isinstance(exc, asyncio.CancelledError) or being_cancelled():
                request._ticket.abandoned = True
                raise asyncio.CancelledError from None
            return self._error(verb, exc)
        if isinstance(answer, ErrorAnswer):  # a per-request error answer from GenServe
            return Outcome(answer.status_code, error=answer.payload)
        return Outcome(200, answer=answer)

    def _error(self, verb: str, exc: Exception) -> Outcome:
        if isinstance(exc, BentoMLException):
            status = int(exc.error_code.value)
            log.warning("/%s answered %d: %s", verb, status, exc)
            message = {503: OVERRUN}.get(status, str(exc) if status < 500 else UNEXPECTED)
            return Outcome(status, error={"error": message})
        log.error("/%s failed", verb, exc_info=exc)
        return Outcome(500, error={"error": UNEXPECTED})

    def hinted(self, status: int, headers: list[tuple[bytes, bytes]]
               ) -> list[tuple[bytes, bytes]]:
        """``headers`` with a ``Retry-After`` on a "try again" answer that lacks it."""
        return self.admission.hinted(status, headers)

    def record(self, *, protocol: str, verb: str, key: str | None, model: str,
               version: int | None, rows: int | None, status: int | str,
               started: float) -> None:
        """Count the answer per API key and write the request's access log line."""
        label = key or ("none" if self.keys.enabled else "anonymous")
        KEY_REQUESTS.labels(key=label, verb=verb, status=str(status)).inc()
        log_access(self.access, protocol=protocol, key=key, verb=verb, model=model,
                   version=version, rows=rows, status=status,
                   latency_s=time.perf_counter() - started)

    def refused(self, verb: str, err: RequestError) -> None:
        """Count a request refused before it reached a model."""
        REQUESTS.labels(model="unknown", version="unknown", verb=verb,
                        status=str(err.status)).inc()
