"""The HTTP boundary: an ASGI middleware that checks every verb request before BentoML sees it.

Content type, body size, JSON syntax and the request itself (``service.validation``) are
checked here and answered with ``{"error": ...}`` and a 4xx status, so a bad request never
joins a batch. Valid requests pass through untouched (the body is replayed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from service.manifest import ManifestError, read_manifest
from service.metrics import REQUESTS
from service.settings import Settings, load_settings
from service.validation import ModelCard, RequestError, validate_verb

__all__ = ["BoundaryMiddleware", "load_cards"]

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
                                  calibrated=m.calibration is not None)
    return cards


async def _send_json(send: Any, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BoundaryMiddleware:
    def __init__(self, app: Any, settings: Settings | None = None) -> None:
        self.app = app
        self.settings = settings or load_settings()
        self._cards: dict[str, ModelCard] | None = None

    @property
    def cards(self) -> dict[str, ModelCard]:
        if self._cards is None:
            self._cards = load_cards(Path(self.settings.models_dir))
        return self._cards

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path == "/models" and scope.get("method") == "GET":
            return await self._get_models(scope, receive, send)
        verb = VERB_PATHS.get(path)
        if verb is None:
            return await self.app(scope, receive, send)
        try:
            body = await self._checked_body(scope, receive, verb)
        except RequestError as err:
            REQUESTS.labels(model="unknown", verb=verb, status=str(err.status)).inc()
            return await _send_json(send, err.status, {"error": err.message})
        return await self.app(scope, _replay(body, receive), send)

    async def _checked_body(self, scope: dict, receive: Any, verb: str) -> bytes:
        if scope.get("method") != "POST":
            raise RequestError(405, f"use POST for /{verb}")
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"application/json").split(b";")[0].strip()
        if ctype != b"application/json":
            raise RequestError(415, f"content type {ctype.decode(errors='replace')[:64]!r} is "
                               "not supported; send application/json")
        limit = self.settings.max_body_bytes
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"request body is {int(declared)} bytes; the limit is {limit}")
        body = await _read_body(receive, limit)
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = getattr(err, "msg", "not UTF-8")
            raise RequestError(400, f"the body is not valid JSON ({reason})") from None
        validate_verb(verb, payload, self.cards, self.settings)
        return body

    async def _get_models(self, scope: dict, receive: Any, send: Any) -> None:
        # GET /models is answered by the POST API (BentoML's APIs are POST).
        scope = dict(scope, method="POST",
                     headers=[(b"content-type", b"application/json")])
        await self.app(scope, _replay(b"{}", receive), send)


async def _read_body(receive: Any, limit: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestError(400, "the client disconnected before the body was complete")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


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
