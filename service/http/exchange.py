"""One HTTP request's exchange with its client, as the boundary sees it over ASGI.

:class:`Exchange` reads the body under a deadline (a client that sends its headers and then
nothing, or a body slower than ``GENSERVE_MIN_BODY_RATE``, is answered 408 and the
connection closed), notes whether an answer has started, and answers errors as JSON. An
answer given before the body was read (401, 405, 413, 415, 429, 503) *lingers*: the answer
goes out first, then up to ``GENSERVE_LINGER_BYTES`` of the body are read and discarded
(for at most ``GENSERVE_LINGER_S``) before the answer is completed. uvicorn closes a
``Connection: close`` request's socket as soon as its answer is complete, and closing a
socket with unread bytes makes the kernel send a reset, which discards the answer at a
client that writes its whole body before reading (Python's ``urllib``). Bodies over the
bound still get the answer where the client reads while it writes; their connection closes.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from service.settings import Settings
from service.validation import RequestError

__all__ = ["Exchange", "TooSlow"]

JSON = (b"content-type", b"application/json")
CLOSE = (b"connection", b"close")


class TooSlow(RequestError):
    """The body did not arrive within its deadline: answered 408, the connection closed."""

    def __init__(self, message: str) -> None:
        super().__init__(408, message)


class Exchange:
    """``receive`` and ``send`` of one request, with what has been read and answered."""

    __slots__ = ("_receive", "_send", "declared", "done", "expects_continue", "gone", "read",
                 "settings", "slow", "started")

    def __init__(self, scope: dict, receive: Any, send: Any, settings: Settings) -> None:
        self._receive, self._send, self.settings = receive, send, settings
        self.declared: int | None = None  # Content-Length, when given
        chunked = False
        self.expects_continue = False  # the client sends the body only once asked to
        for name, value in scope.get("headers") or ():
            if name == b"content-length" and value.isdigit() and len(value) < 19:
                self.declared = int(value)
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"expect":
                self.expects_continue = value.lower() == b"100-continue"
        self.read = 0  # body bytes received so far
        self.done = not chunked and not self.declared  # the whole body has been received
        self.gone = False  # the client disconnected
        self.slow = False  # the body missed its deadline
        self.started = False  # an answer has started

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)

    async def receive(self) -> dict:
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.gone = True
        else:
            self.read += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.done = True
        return message

    async def read_body(self, limit: int) -> bytes:
        """The whole body; 413 past ``limit`` bytes, 408 past its deadline, 400 if the client
        goes away. The deadline: ``body_timeout_s`` plus 1 s per ``min_body_rate`` bytes."""
        s = self.settings
        chunks: list[bytes] = []
        start = time.monotonic()
        while True:
            left = start + s.body_timeout_s + self.read / s.min_body_rate - time.monotonic()
            try:
                async with asyncio.timeout(max(left, 0.0)):
                    message = await self.receive()
            except TimeoutError:
                self.slow = True
                raise TooSlow(f"the request body did not arrive in time ({self.read} bytes in "
                              f"{time.monotonic() - start:.1f} s); send it within "
                              f"{s.body_timeout_s:g} s plus 1 s per {s.min_body_rate} "
                              "bytes") from None
            if self.gone:
                raise RequestError(400, "the client disconnected before the body was complete")
            if self.read > limit:
                raise RequestError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(message.get("body", b""))
            if self.done:
                return b"".join(chunks)

    async def answer(self, status: int, payload: dict,
                     headers: list[tuple[bytes, bytes]] | None = None,
                     close: bool = False) -> None:
        """A JSON answer, lingering over a body not read yet (nothing if an answer has
        started); ``close``: the connection ends after it."""
        if self.started:
            return
        body = json.dumps(payload).encode()
        head = [JSON, *(headers or []), (b"content-length", str(len(body)).encode())]
        unread = not (self.done or self.gone)
        # A client waiting for "100 Continue" sends no body after this answer, and a slow one
        # is not waited for again: neither lingers, and their connections end.
        linger = unread and not (self.slow or self.expects_continue)
        rest = None if self.declared is None else self.declared - self.read
        if close or (unread and not linger) or (
                linger and (rest is None or rest > self.settings.linger_bytes)):
            head.append(CLOSE)  # (the last: more body than will be discarded)
        await self.send({"type": "http.response.start", "status": status, "headers": head})
        await self.send({"type": "http.response.body", "body": body, "more_body": linger})
        if linger:
            await self._discard()
            await self.send({"type": "http.response.body", "body": b""})

    async def _discard(self) -> None:
        """Read and drop the body, up to ``linger_bytes`` and for at most ``linger_s``; best
        effort: a failing ``receive`` (the answer may be the catch-all's) ends it."""
        s = self.settings
        bound = self.read + s.linger_bytes
        try:
            async with asyncio.timeout(s.linger_s):
                while not (self.done or self.gone) and self.read < bound:
                    await self.receive()
        except Exception:  # noqa: BLE001 - TimeoutError, or whatever broke the request
            pass
