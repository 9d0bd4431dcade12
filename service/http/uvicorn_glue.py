"""Connection-level guards for BentoML's HTTP workers: the one module that touches uvicorn.

BentoML's worker builds its ``uvicorn.Config`` itself (no ``http=``), and uvicorn's
httptools protocol, which it then uses, has no deadline for a request's headers, no bound on
their size and no bound on open connections. :func:`install` registers
:class:`GuardedHttpToolsProtocol` in its place, which adds, per worker:

* headers (request line included) that do not arrive within ``GENSERVE_HEADER_TIMEOUT_S``
  of a connection's opening or of a request's first byte: 408 and close (a connection that
  sent nothing is closed without an answer);
* more than ``GENSERVE_MAX_HEADER_BYTES`` of them: 431 and close;
* at most ``GENSERVE_MAX_CONNECTIONS`` open connections: one more closes the longest-idle
  connection without a request in progress, or if every one has a request in progress, its
  own request is answered 503 with ``Retry-After`` and the connection closed;
* a body still arriving after its request was answered (uvicorn discards it) is given
  ``GENSERVE_LINGER_S``, then the connection is closed; once it has ended, the keep-alive
  timer runs again (uvicorn stops it at each byte and rearms it only at an answer);
* a request that is not valid HTTP/1.1 is answered 400 with a JSON error, as every other
  error is (uvicorn's own answer is plain text).

Everything else (body deadlines, lingering over unread bodies) is ASGI, in
``service.http.exchange``. What each touch of uvicorn buys (``TOUCHES``) is checked by
:func:`missing` and by a test that names the touch when an upgrade removes it; with one
missing, :func:`install` leaves uvicorn as it is and logs which.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import sys
import time
from typing import Any

from uvicorn.config import HTTP_PROTOCOLS, Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.http.exchange import Exchange
from service.settings import Settings

__all__ = ["TOUCHES", "GuardedHttpToolsProtocol", "install", "missing"]

log = logging.getLogger("genserve")
PROTOCOL = f"{__name__}:GuardedHttpToolsProtocol"

# what of uvicorn is touched -> what touching it buys
TOUCHES = {
    "uvicorn.config.HTTP_PROTOCOLS['auto']": "BentoML's workers (http='auto') get the guards",
    "uvicorn.config.HTTP_PROTOCOLS['httptools']": "so does a worker configured for httptools",
    "HttpToolsProtocol.connection_made": "the connection bound and the first header deadline",
    "HttpToolsProtocol.connection_lost": "the deadline timer is cancelled with the connection",
    "HttpToolsProtocol.data_received": "header bytes counted, discarded bodies timed",
    "HttpToolsProtocol.on_message_begin": "the header deadline of a keep-alive request",
    "HttpToolsProtocol.on_url": "the request line counts toward the header size",
    "HttpToolsProtocol.on_header": "each header counts toward the header size",
    "HttpToolsProtocol.on_headers_complete": "the header deadline ends there",
    "HttpToolsProtocol.on_message_complete": "the keep-alive timer rearmed after a discarded body",
    "HttpToolsProtocol.send_400_response": "uvicorn's parser-error answer, as JSON",
    "HttpToolsProtocol._unset_keepalive_if_required": "the keep-alive timer stopped to rearm it",
    "HttpToolsProtocol.timeout_keep_alive_handler": "the keep-alive timer's callback",
    "HttpToolsProtocol().cycle": "whether a request is in progress (response_complete)",
    "HttpToolsProtocol().connections": "the worker's open connections, for the bound",
    "HttpToolsProtocol().transport": "refusals are written and the connection closed",
    "HttpToolsProtocol().loop": "the timers",
    "HttpToolsProtocol().app": "a connection over the bound gets the 503 app",
    "HttpToolsProtocol().timeout_keep_alive": "the keep-alive delay to rearm",
    "HttpToolsProtocol().timeout_keep_alive_task": "the keep-alive timer to rearm",
}


def missing() -> list[str]:
    """The touches of ``TOUCHES`` that the installed uvicorn lacks (empty: all there)."""
    loop = asyncio.new_event_loop()
    try:
        config = Config(app=_over_capacity, log_config=None)
        instance = HttpToolsProtocol(config, ServerState(), {}, _loop=loop)
    finally:
        loop.close()
    gone = []
    for touch in TOUCHES:
        if touch.startswith("uvicorn.config.HTTP_PROTOCOLS"):
            found = touch.split("'")[1] in HTTP_PROTOCOLS
        elif touch.startswith("HttpToolsProtocol()."):
            found = hasattr(instance, touch.split(".", 1)[1])
        else:
            found = hasattr(HttpToolsProtocol, touch.split(".", 1)[1])
        if not found:
            gone.append(touch)
    return gone


def install(settings: Settings) -> bool:
    """Make BentoML's workers use :class:`GuardedHttpToolsProtocol` with ``settings``;
    False (uvicorn left as it is, a warning logged) if a touch is missing."""
    gone = missing()
    if gone:
        log.warning("connection guards not installed: uvicorn lacks %s", ", ".join(gone))
        return False
    GuardedHttpToolsProtocol.settings = settings
    HTTP_PROTOCOLS["auto"] = HTTP_PROTOCOLS["httptools"] = PROTOCOL
    return True


def _response(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    phrase = http.HTTPStatus(status).phrase
    return (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


async def _over_capacity(scope: dict, receive: Any, send: Any) -> None:
    """The answer to a request on a connection opened over the bound, all others busy."""
    s = GuardedHttpToolsProtocol.settings or Settings()
    await Exchange(scope, receive, send, s).answer(
        503, {"error": f"this worker holds its limit of {s.max_connections} connections, each "
                       f"with a request in progress; retry after {s.retry_after_s} s"},
        [(b"retry-after", str(s.retry_after_s).encode())], close=True)


class _Refused(Exception):
    """Raised in a parser callback to stop the parser; uvicorn then calls
    ``send_400_response``, which sends the pending refusal."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the guards listed in ``service.http.uvicorn_glue``."""

    settings: Settings | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None  # the one client-phase timer
        self._in_message = False  # from a request's first byte to its end
        self._in_headers = True  # waiting for (the rest of) a request's headers
        self._header_bytes = 0  # of the chunks that arrived while in the headers
        self._header_exact = 0  # of the request line and headers parsed so far
        self._pending: tuple[int, str] | None = None  # a refusal decided inside the parser
        self._refused = False  # answered; the connection is closing
        self._last_rx = time.monotonic()

    # -- the connection ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        s = self.settings
        if len(self.connections) > s.max_connections and not self._evict_idle():
            self.app = _over_capacity
        self._arm(s.header_timeout_s, self._headers_late)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._last_rx = time.monotonic()
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return
        if self._in_headers and self._header_bytes > self.settings.max_header_bytes:
            self._refuse(431, self._too_large())
        elif (self._in_message and not self._in_headers and self.cycle is not None
              and self.cycle.response_complete and self._deadline is None):
            # answered before its body ended: uvicorn discards the rest, for so long
            self._arm(self.settings.linger_s, self.transport.close)

    # -- parser callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = self._in_headers = True
        self._header_exact = 0
        if self._deadline is None:
            self._arm(self.settings.header_timeout_s, self._headers_late)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._header_bytes = 0
        self._disarm()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        discarded = self.cycle is not None and self.cycle.response_complete
        super().on_message_complete()
        self._in_message, self._in_headers = False, True
        if discarded:  # answered first: uvicorn's keep-alive timer was stopped by the body
            self._disarm()
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def send_400_response(self, msg: str) -> None:
        if self._pending is not None:
            return self._refuse(*self._pending)
        error = sys.exc_info()[1]  # uvicorn calls this while handling the parser's error
        detail = str(error.__context__ or error) if error is not None else msg
        self._refuse(400, f"the request is not valid HTTP/1.1 ({detail[:100]}); send a "
                     "request line, headers and a body as RFC 9112 describes")

    # -- the guards -------------------------------------------------------------------------
    def _count(self, size: int) -> None:
        self._header_exact += size
        if self._header_exact > self.settings.max_header_bytes:
            self._pending = (431, self._too_large())
            raise _Refused

    def _too_large(self) -> str:
        return (f"the request line and headers exceed {self.settings.max_header_bytes} bytes; "
                "send smaller headers")

    def _headers_late(self) -> None:
        self._deadline = None
        if not self._in_message:  # opened, and nothing sent since
            self.transport.close()
        else:
            self._refuse(408, f"the request headers did not arrive within "
                         f"{self.settings.header_timeout_s:g} s")

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` and close. With a request in progress (these headers are a
        pipelined request's), that request's answer is the last one instead."""
        self._refused = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif not self.transport.is_closing():
            self.transport.write(_response(status, message))
            self.transport.close()

    def _evict_idle(self) -> bool:
        """Close the connection idle the longest among those without a request in progress."""
        idle = [c for c in self.connections if c is not self
                and isinstance(c, GuardedHttpToolsProtocol) and not c.transport.is_closing()
                and (c.cycle is None or c.cycle.response_complete)]
        if not idle:
            return False
        min(idle, key=lambda c: c._last_rx).transport.close()
        return True

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
