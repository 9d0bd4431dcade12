"""The HTTP boundary: an ASGI middleware that checks every verb request before BentoML sees it.

In order: the bearer token when access control is on (401, ``service.auth``), the key's
request rate (429 with ``Retry-After``), the worker's queue bound (503 with ``Retry-After``,
``service.overload``), then content type, body size, the body's arrival in time (408,
``service.exchange``), JSON nesting depth, number length, syntax and duplicate keys
(``service.json_guard``) and the request itself (``service.validation``), each answered with
``{"error": ...}``, so a bad request never joins a batch. An answer given before the body is
read lingers over the body, so clients that send the whole body first still read it. A valid
request goes, already validated into BentoML's input type, straight to BentoML's batcher
(``service.dispatch``), or with ``GENSERVE_FAST_PATH=false`` through BentoML's own route (the
body is replayed). Any other exception is answered 500 ``{"error": "internal error",
"request_id": ...}`` and logged with its traceback under that id: no request ends without an
answer. Every verb request leaves one access log line (``service.access_log``), refused ones
too.
``/livez``, ``/readyz`` and ``/models`` stay open; ``/metrics`` asks for its own token when
``GENSERVE_METRICS_TOKEN_FILE`` is set. ``/docs.json`` is BentoML's OpenAPI document completed
with these answers (``service.openapi``).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Any

import bentoml

from service.access_log import access_logger, log_access, rows_in
from service.auth import TOKEN_REQUIRED, ApiKey, KeyStore, RateLimiter
from service.dispatch import Dispatch, being_cancelled
from service.exchange import Exchange
from service.json_guard import JsonLimits, parse_json
from service.manifest import ManifestError, read_manifest
from service.metrics import REQUESTS
from service.openapi import complete
from service.overload import Admission
from service.settings import Settings, load_settings
from service.validation import ModelCard, Refused, RequestError, validate_verb

__all__ = ["KEY_REQUESTS", "VERB_PATHS", "BoundaryMiddleware", "load_cards", "parse_and_validate"]

# Key names are operator-configured (bounded); "none" = no valid token, "anonymous" = auth off.
KEY_REQUESTS = bentoml.metrics.Counter(
    name="genserve_key_requests_total",
    documentation="Verb requests by API key name, verb and HTTP status",
    labelnames=["key", "verb", "status"],
)

log = logging.getLogger("genserve")

VERB_PATHS = {"/sample": "sample", "/log_likelihood": "log_likelihood",
              "/anomaly_score": "anomaly_score"}


def load_cards(models_dir: Path) -> dict[str, ModelCard]:
    """Cards of every model folder whose manifest validates (files verified by sha256)."""
    cards: dict[str, ModelCard] = {}
    if not models_dir.is_dir():
        return cards
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir()):
        try:
            m = read_manifest(folder, verify=True)
        except ManifestError:
            continue
        cards[m.name] = ModelCard(name=m.name, family=m.family, dim=m.dim,
                                  calibrated=m.calibration is not None,
                                  shape=tuple(m.event_shape))
    return cards


async def _send_body(send: Any, status: int, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _unauthorized() -> Refused:
    return Refused(401, TOKEN_REQUIRED, [(b"www-authenticate", b'Bearer realm="genserve"')])


def parse_and_validate(verb: str, body: bytes, cards: dict[str, ModelCard], settings: Settings,
                       types: dict[str, type] | None = None,
                       limits: JsonLimits | None = None) -> tuple[Any, Any]:
    """``(JSON payload, validated request)`` of a verb request's body; RequestError (4xx)
    is the only exception it raises for any bytes (fuzzed with atheris, bench/fuzz.py)."""
    limits = limits or JsonLimits(settings.max_json_depth, settings.max_number_chars)
    payload = parse_json(body, limits)
    return payload, validate_verb(verb, payload, cards, settings, types)


class BoundaryMiddleware:
    def __init__(self, app: Any, settings: Settings | None = None) -> None:
        self.app = app
        self.settings = settings or load_settings()
        self._cards: dict[str, ModelCard] | None = None
        self._docs_body: bytes | None = None  # the completed document, encoded once
        self._fast: tuple[Dispatch | None] | None = None
        self.keys = KeyStore.from_settings(self.settings)
        self.metrics_keys = KeyStore.for_metrics(self.settings)
        self.limiter = RateLimiter(self.settings.rate_limit_rps, self.settings.rate_limit_burst,
                                   workers=self.settings.workers)
        self.access = access_logger(self.settings.access_log)
        self.admission = Admission(self.settings)
        self.json_limits = JsonLimits(self.settings.max_json_depth,
                                      self.settings.max_number_chars)

    @property
    def cards(self) -> dict[str, ModelCard]:
        if self._cards is None:
            self._cards = load_cards(Path(self.settings.models_dir))
        return self._cards

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        exchange = Exchange(scope, receive, send, self.settings)
        path = scope.get("path", "")
        verb = VERB_PATHS.get(path)
        if verb is not None:
            return await self._verb(verb, scope, exchange)
        try:
            await self._route(path, scope, exchange)
        except Exception:
            await _internal_error(exchange, path)

    async def _route(self, path: str, scope: dict, exchange: Exchange) -> None:
        """Everything but the verbs: ``/metrics``'s token, ``GET /models``, ``/docs.json``,
        and BentoML's own routes."""
        receive, send = exchange.receive, exchange.send
        if path == "/metrics" and self.metrics_keys.enabled:
            if self.metrics_keys.authenticate(_header(scope, b"authorization")) is None:
                err = _unauthorized()
                return await exchange.answer(401, {"error": err.message}, err.headers)
        if path == "/models" and scope.get("method") == "GET":
            return await self._get_models(scope, receive, send)
        if path == "/docs.json" and scope.get("method") == "GET":
            return await self._docs(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _verb(self, verb: str, scope: dict, exchange: Exchange) -> None:
        started = time.perf_counter()
        seen: dict[str, Any] = {"key": None, "model": "unknown", "rows": None, "status": 500}
        admitted = False
        try:
            key = self._authenticate(scope)
            seen["key"] = key.name if key else None
            self._limit(key)
            self.admission.admit(verb)
            admitted = True
            dispatch = self._dispatch()
            body, payload, request = await self._checked_body(
                scope, exchange, verb, dispatch.types if dispatch else None)
            if isinstance(payload, dict) and payload.get("model") in self.cards:
                seen["model"] = payload["model"]
            seen["rows"] = rows_in(verb, payload)
            if dispatch is None:
                await self.app(scope, _replay(body, exchange.receive),
                               self._watch(exchange.send, seen))
            else:
                seen["status"], headers, answer = await dispatch(verb, request)
                await _send_body(exchange.send, seen["status"],
                                 self.admission.hinted(seen["status"], headers), answer)
        except RequestError as err:
            seen["status"] = err.status
            REQUESTS.labels(model="unknown", verb=verb, status=str(err.status)).inc()
            extra = getattr(err, "extra", {})
            await exchange.answer(err.status, {"error": err.message, **extra},
                                  getattr(err, "headers", []))
        except Exception:
            seen["status"] = 500
            REQUESTS.labels(model="unknown", verb=verb, status="500").inc()
            await _internal_error(exchange, f"/{verb}")
        finally:
            if admitted:
                self.admission.release()
            if being_cancelled():
                # BentoML's timeout cancelled the request and answered 504 itself (whatever
                # the batcher made of the cancellation): log and count what the client got
                seen["status"] = 504
            label = seen["key"] or ("none" if self.keys.enabled else "anonymous")
            KEY_REQUESTS.labels(key=label, verb=verb, status=str(seen["status"])).inc()
            log_access(self.access, protocol="http", key=seen["key"], verb=verb,
                       model=seen["model"], rows=seen["rows"], status=seen["status"],
                       latency_s=time.perf_counter() - started)

    def _dispatch(self) -> Dispatch | None:
        """``service.dispatch`` when on and BentoML's app has the shape it knows (looked up
        once, at the first verb request: BentoML builds its app after the middleware)."""
        if self._fast is None:
            found = Dispatch.find(self.app, VERB_PATHS) if self.settings.fast_path else None
            self._fast = (found,)
            log.info("verb requests go %s", "straight to BentoML's batcher (fast path)"
                     if found else "through BentoML's HTTP route")
        return self._fast[0]

    def _watch(self, send: Any, seen: dict[str, Any]) -> Any:
        """BentoML's route's ``send``: notes the status for the access log and adds the
        ``Retry-After`` hint to a 503."""

        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                headers = list(message.get("headers") or [])
                hinted = self.admission.hinted(seen["status"], headers)
                if hinted is not headers:
                    message = dict(message, headers=hinted)
            await send(message)

        return watched

    def _authenticate(self, scope: dict) -> ApiKey | None:
        """The caller's key (None with access control off), or 401."""
        if not self.keys.enabled:
            return None
        key = self.keys.authenticate(_header(scope, b"authorization"))
        if key is None:
            raise _unauthorized()
        return key

    def _limit(self, key: ApiKey | None) -> None:
        """Take one request from the key's token bucket, or 429 with a retry hint."""
        wait = self.limiter.acquire(key.name if key else "anonymous", key)
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise Refused(429, f"the request rate limit of this API key is reached; retry "
                          f"after {retry} s", [(b"retry-after", str(retry).encode())],
                          retry_after_s=retry)

    async def _checked_body(self, scope: dict, exchange: Exchange, verb: str,
                            types: dict[str, type] | None) -> tuple[bytes, Any, Any]:
        """The body, its JSON and the validated request (built as ``types[verb]``)."""
        if scope.get("method") != "POST":
            raise RequestError(405, f"use POST for /{verb}")
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip()
        if ctype != b"application/json":
            raise RequestError(415, f"content type {ctype.decode(errors='replace')[:64]!r} is "
                               "not supported; send application/json")
        limit = self.settings.max_body_bytes
        if exchange.declared is not None and exchange.declared > limit:
            raise RequestError(413, f"request body is {exchange.declared} bytes; the limit is "
                               f"{limit}")
        body = await exchange.read_body(limit)
        payload, request = parse_and_validate(verb, body, self.cards, self.settings, types,
                                              self.json_limits)
        return body, payload, request

    async def _docs(self, scope: dict, receive: Any, send: Any) -> None:
        """BentoML's OpenAPI document, completed with our own answers (``service.openapi``)."""
        if self._docs_body is None:
            start: dict[str, Any] = {}
            chunks: list[bytes] = []

            async def capture(message: dict) -> None:
                if message["type"] == "http.response.start":
                    start.update(message)
                elif message["type"] == "http.response.body":
                    chunks.append(message.get("body", b""))

            await self.app(scope, receive, capture)
            body = b"".join(chunks)
            if start.get("status") != 200:  # pass BentoML's answer through untouched
                await send(start)
                return await send({"type": "http.response.body", "body": body})
            self._docs_body = json.dumps(complete(json.loads(body), VERB_PATHS)).encode()
        await _send_body(send, 200, [(b"content-type", b"application/json")], self._docs_body)

    async def _get_models(self, scope: dict, receive: Any, send: Any) -> None:
        # GET /models is answered by the POST API (BentoML's APIs are POST).
        scope = dict(scope, method="POST",
                     headers=[(b"content-type", b"application/json")])
        await self.app(scope, _replay(b"{}", receive), send)


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value
    return None


async def _internal_error(exchange: Exchange, path: str) -> None:
    """The catch-all: the traceback goes to the server log under a request id, the client
    gets the id and no detail (nothing if an answer has already started)."""
    request_id = secrets.token_hex(8)
    log.exception("internal error on %r (request_id %s)", path[:64], request_id)
    await exchange.answer(500, {"error": "internal error", "request_id": request_id},
                          close=True)


def _replay(body: bytes, receive: Any = None) -> Any:
    """A ``receive`` that hands over ``body`` once, then waits on the real connection."""
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if receive is None:
            return {"type": "http.disconnect"}
        return await receive()

    return replayed
