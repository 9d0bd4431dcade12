"""The HTTP edge: an ASGI middleware in front of BentoML that converts HTTP to the data plane.

A verb request goes through the data plane's checks (``service.dataplane``: token, rate,
queue bound) before its body is read, then content type, body size, the body's arrival in
time (408, ``service.http.exchange``), JSON nesting depth, number length, syntax and
duplicate keys (``service.http.json_guard``) and the request itself (``service.validation``),
each answered with ``{"error": ...}``, so a bad request never joins a batch. An answer given
before the body is read lingers over the body, so clients that send the whole body first
still read it. A valid request, validated into BentoML's input type, goes to the data plane,
which hands it to BentoML's batcher; with ``GENSERVE_FAST_PATH=false`` it goes through
BentoML's own HTTP route instead (the body is replayed). Any other exception is answered 500
``{"error": "internal error", "request_id": ...}`` and logged with its traceback under that
id: no request ends without an answer. Every verb request leaves one access log line,
refused ones too.

``/livez``, ``/readyz`` and ``/models`` stay open, and so do genserve's pages (``/``, ``/docs``
and their files under ``/page/``, ``service.http.pages``); ``/metrics`` asks for its own token
when ``GENSERVE_METRICS_TOKEN_FILE`` is set. The repository API, ``POST /models/{name}/load``
and ``POST /models/{name}/unload`` (optional body ``{"version": N}``), asks for that token too
(the admin token), and answers 400 for a name that is not a folder of the models directory
(no path traversal). ``/docs.json`` is BentoML's OpenAPI document completed with these answers
(``service.http.openapi``). The middleware also sees the worker's ASGI
lifespan: once BentoML has made the service instance it starts the worker's gRPC edge
(``service.grpc.server``), and it stops that edge, draining its calls, when the worker stops.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from typing import Any

from pydantic import ValidationError

from service.access_log import rows_in
from service.bentoml_glue import AppFactory
from service.dataplane import DataPlane, Outcome, being_cancelled, unauthorized
from service.grpc.server import GrpcEdge
from service.http.exchange import Exchange
from service.http.json_guard import JsonLimits, parse_json
from service.http.openapi import complete
from service.http.pages import Pages
from service.schemas import VERBS, ModelInfo, RepositoryRequest
from service.settings import Settings, load_settings
from service.validation import RequestError, pydantic_message, validate_verb

__all__ = ["VERB_PATHS", "BoundaryMiddleware", "parse_and_validate"]

log = logging.getLogger("genserve")

VERB_PATHS = {f"/{verb}": verb for verb in VERBS}
# the repository API: anything between /models/ and the action is the name, checked later
REPOSITORY_PATH = re.compile(r"^/models/(?P<name>.+)/(?P<action>load|unload)$", re.S)
REPOSITORY_BODY_BYTES = 4096


def parse_and_validate(verb: str, body: bytes, cards: dict[str, ModelInfo], settings: Settings,
                       types: dict[str, type] | None = None,
                       limits: JsonLimits | None = None) -> tuple[Any, Any]:
    """``(JSON payload, validated request)`` of a verb request's body; RequestError (4xx)
    is the only exception it raises for any bytes (fuzzed with atheris, bench/fuzz.py)."""
    limits = limits or JsonLimits(settings.max_json_depth, settings.max_number_chars)
    payload = parse_json(body, limits)
    return payload, validate_verb(verb, payload, cards, settings, types)


async def _send_body(send: Any, status: int, headers: list[tuple[bytes, bytes]],
                     body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BoundaryMiddleware:
    def __init__(self, app: Any, settings: Settings | None = None) -> None:
        self.app = app
        self.settings = settings or load_settings()
        self._plane: DataPlane | None = None
        self._docs_body: bytes | None = None  # the completed document, encoded once
        self.json_limits = JsonLimits(self.settings.max_json_depth,
                                      self.settings.max_number_chars)
        self.grpc: GrpcEdge | None = None
        self._pages: Pages | None = None

    @property
    def plane(self) -> DataPlane:
        """The worker's data plane (made at the first use)."""
        if self._plane is None:
            self._plane = DataPlane(lambda: AppFactory.find(self.app, VERB_PATHS),
                                    self.settings)
            log.info("verb requests go %s", "straight to BentoML's batcher (fast path)"
                     if self.settings.fast_path else "through BentoML's HTTP route")
        return self._plane

    @property
    def pages(self) -> Pages:
        """genserve's pages (read at the first page request)."""
        if self._pages is None:
            self._pages = Pages(self.settings, auth=self.plane.keys.enabled)
        return self._pages

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, self._lifespan_receive(receive),
                                  self._lifespan_send(send))
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

    # -- the worker's lifespan: the gRPC edge starts after BentoML's instance exists ---------
    def _lifespan_send(self, send: Any) -> Any:
        async def sent(message: dict) -> None:
            if message["type"] == "lifespan.startup.complete" and self.settings.grpc:
                try:
                    self.grpc = await GrpcEdge.start(self.plane, self.settings)
                except Exception as err:  # the port taken, bad TLS files: the worker fails
                    log.exception("the gRPC edge did not start")
                    message = {"type": "lifespan.startup.failed", "message": str(err)}
            await send(message)

        return sent

    def _lifespan_receive(self, receive: Any) -> Any:
        async def received() -> dict:
            message = await receive()
            if message["type"] == "lifespan.shutdown" and self.grpc is not None:
                await self.grpc.stop()  # drains gRPC calls in flight
                self.grpc = None
            return message

        return received

    # -- everything but the verbs --------------------------------------------------------
    async def _route(self, path: str, scope: dict, exchange: Exchange) -> None:
        """``/metrics``'s token, ``GET /models``, the repository API, ``/docs.json``, the
        pages, and BentoML's own routes."""
        receive, send = exchange.receive, exchange.send
        admin = self.plane.admin_keys
        if path == "/metrics" and admin.enabled:
            if admin.authenticate(_header(scope, b"authorization")) is None:
                err = unauthorized()
                return await exchange.answer(401, {"error": err.message}, err.headers)
        if (found := REPOSITORY_PATH.match(path)) is not None:
            return await self._repository(found["action"], found["name"], scope, exchange)
        if path == "/models" and scope.get("method") == "GET":
            return await self._get_models(scope, receive, send)
        if path == "/docs.json" and scope.get("method") == "GET":
            return await self._docs(scope, receive, send)
        if Pages.serves(path):
            return await self._page(path, scope, exchange)
        return await self.app(scope, receive, send)

    async def _page(self, path: str, scope: dict, exchange: Exchange) -> None:
        method = scope.get("method")
        if method not in ("GET", "HEAD"):
            return await exchange.answer(405, {"error": f"use GET for {path[:64]}"},
                                         [(b"allow", b"GET, HEAD")])
        asset = self.pages.find(path)
        if asset is None:
            return await exchange.answer(404, {"error": f"no page file {path[:64]!r}"})
        body = asset.body if method == "GET" else b""
        await exchange.send({"type": "http.response.start", "status": 200,
                             "headers": [*asset.headers(),
                                         (b"content-length", str(len(asset.body)).encode())]})
        await exchange.send({"type": "http.response.body", "body": body})

    # -- the verbs -----------------------------------------------------------------------
    async def _verb(self, verb: str, scope: dict, exchange: Exchange) -> None:
        started = time.perf_counter()
        seen: dict[str, Any] = {"key": None, "model": "unknown", "version": None, "rows": None,
                                "status": 500}
        admitted = False
        plane: DataPlane | None = None
        try:
            plane = self.plane
            key = plane.authenticate(_header(scope, b"authorization"))
            seen["key"] = key.name if key else None
            plane.limit(key)
            plane.admit(verb)
            admitted = True
            body, payload, request = await self._checked_body(scope, exchange, verb, plane)
            seen["model"], seen["version"] = request.model, request.version
            seen["rows"] = rows_in(verb, payload)
            if not self.settings.fast_path:
                await self.app(scope, _replay(body, exchange.receive),
                               self._watch(exchange.send, seen, plane))
            else:
                outcome = await plane.infer(verb, request)
                seen["status"] = outcome.status
                await _send_body(exchange.send, outcome.status,
                                 plane.hinted(outcome.status, self._headers(plane)),
                                 _encode(outcome))
        except RequestError as err:
            seen["status"] = err.status
            if plane is not None:
                plane.refused(verb, err)
            extra = getattr(err, "extra", {})
            await exchange.answer(err.status, {"error": err.message, **extra},
                                  getattr(err, "headers", []))
        except Exception:
            seen["status"] = 500
            await _internal_error(exchange, f"/{verb}")
        finally:
            if admitted:
                plane.release()
            if being_cancelled():
                # BentoML's timeout cancelled the request and answered 504 itself (whatever
                # the batcher made of the cancellation): log and count what the client got
                seen["status"] = 504
            if plane is not None:
                plane.record(protocol="http", verb=verb, key=seen["key"], model=seen["model"],
                             version=seen["version"], rows=seen["rows"],
                             status=seen["status"], started=started)

    def _headers(self, plane: DataPlane) -> list[tuple[bytes, bytes]]:
        server = f"BentoML Service/{plane.factory.service_name}".encode()
        return [(b"content-type", b"application/json"), (b"server", server)]

    def _watch(self, send: Any, seen: dict[str, Any], plane: DataPlane) -> Any:
        """BentoML's route's ``send``: notes the status for the access log and adds the
        ``Retry-After`` hint to a 503."""

        async def watched(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                headers = list(message.get("headers") or [])
                hinted = plane.hinted(seen["status"], headers)
                if hinted is not headers:
                    message = dict(message, headers=hinted)
            await send(message)

        return watched

    async def _checked_body(self, scope: dict, exchange: Exchange, verb: str,
                            plane: DataPlane) -> tuple[bytes, Any, Any]:
        """The body, its JSON and the validated request (BentoML's input type)."""
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
        payload = parse_json(body, self.json_limits)
        return body, payload, plane.validate(verb, payload)

    async def _repository(self, action: str, name: str, scope: dict,
                          exchange: Exchange) -> None:
        """``POST /models/{name}/load`` or ``/unload``: the admin token, the optional body
        ``{"version": N}``, then the model set's answer (``RepositoryAnswer``)."""
        try:
            if scope.get("method") != "POST":
                raise RequestError(405, f"use POST for /models/{{name}}/{action}")
            self.plane.authorize_admin(_header(scope, b"authorization"))
            body = await exchange.read_body(REPOSITORY_BODY_BYTES)
            try:
                request = RepositoryRequest.model_validate(
                    parse_json(body, self.json_limits) if body.strip() else {})
            except ValidationError as err:
                raise RequestError(400, pydantic_message(err)) from None
            answer = await self.plane.repository(action, name, request.version)
        except RequestError as err:
            return await exchange.answer(err.status, {"error": err.message},
                                         getattr(err, "headers", []))
        log.info("repository: %s %r%s: now serving version %s", action, name[:64],
                 "" if request.version is None else f" version {request.version}",
                 answer.version)
        await _send_body(exchange.send, 200, [(b"content-type", b"application/json")],
                         answer.model_dump_json().encode())

    async def _docs(self, scope: dict, receive: Any, send: Any) -> None:
        """BentoML's OpenAPI document, completed with our answers (``service.http.openapi``)."""
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


def _encode(outcome: Outcome) -> bytes:
    if outcome.answer is not None:
        return outcome.answer.model_dump_json().encode()
    return json.dumps(outcome.error).encode()


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
