"""Access control: named bearer tokens (API keys) and a token-bucket rate limit per key.

Keys come from ``GENSERVE_API_KEYS`` (inline) and/or ``GENSERVE_API_KEYS_FILE`` (a mounted
secret), in one of two formats::

    {"alice": "token-of-alice", "batch-jobs": {"token": "...", "rps": 50, "burst": 100}}

    # one key per line: name:token (blank lines and # comments are ignored)
    alice:token-of-alice

The file is re-read when it changes (checked every ``api_keys_reload_s`` seconds), so keys
rotate without a restart; a file that fails to parse on reload keeps the previous keys. Only
SHA-256 digests of the tokens are kept, and a presented token is compared against every key
with ``hmac.compare_digest`` (no early exit), so neither the time taken nor the answer tells
which keys exist. Key *names* are operator-chosen and bounded: they appear in logs and metric
labels; tokens never do.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.settings import Settings

__all__ = [
    "TOKEN_REQUIRED",
    "security_config",
    "ApiKey",
    "KeyFileError",
    "KeyStore",
    "RateLimiter",
    "bearer_token",
    "parse_keys",
]

log = logging.getLogger("genserve.auth")
TOKEN_REQUIRED = ("a valid API token is required: send the header "
                  "'Authorization: Bearer <token>'")
MIN_TOKEN_CHARS = 16
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_TOKEN = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces


class KeyFileError(ValueError):
    """Keys that cannot be read or parsed; the message never contains a token."""


@dataclass(frozen=True)
class ApiKey:
    """One named key: the SHA-256 of its token and its own rate limit (None: the default)."""

    name: str
    digest: bytes
    rps: float | None = None
    burst: int | None = None


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _key(name: str, value: object, source: str) -> ApiKey:
    if not isinstance(name, str) or not _NAME.match(name):
        raise KeyFileError(f"{source}: key name {str(name)[:64]!r} must be 1-64 letters, "
                           "digits, '.', '_' or '-' (it is used in logs and metric labels)")
    rps = burst = None
    if isinstance(value, dict):
        unknown = set(value) - {"token", "rps", "burst"}
        if unknown:
            raise KeyFileError(f"{source}: key {name!r} has unknown fields {sorted(unknown)}; "
                               "allowed: token, rps, burst")
        rps, burst, value = value.get("rps"), value.get("burst"), value.get("token")
        if rps is not None and (isinstance(rps, bool) or not isinstance(rps, int | float)
                                or not rps > 0):
            raise KeyFileError(f"{source}: key {name!r}: rps must be a number > 0")
        if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int)
                                  or burst < 1):
            raise KeyFileError(f"{source}: key {name!r}: burst must be an integer >= 1")
    if not isinstance(value, str) or not _TOKEN.match(value):
        raise KeyFileError(f"{source}: key {name!r} needs a token of printable ASCII "
                           "characters without spaces")
    if len(value) < MIN_TOKEN_CHARS:
        raise KeyFileError(f"{source}: the token of key {name!r} has {len(value)} characters; "
                           f"use at least {MIN_TOKEN_CHARS}, e.g. from "
                           "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return ApiKey(name, _digest(value), None if rps is None else float(rps), burst)


def parse_keys(text: str, source: str) -> list[ApiKey]:
    """Keys from JSON ``{"name": token | {"token", "rps", "burst"}}`` or ``name:token`` lines.

    Inline (environment) values may also separate ``name:token`` pairs with commas.
    """
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise KeyFileError(f"{source}: not valid JSON (line {err.lineno}: "
                               f"{err.msg})") from None
        if not isinstance(data, dict):
            raise KeyFileError(f"{source}: expected a JSON object {{\"name\": \"token\"}}")
        pairs = list(data.items())
    else:
        pairs = []
        for number, line in enumerate(re.split(r"[\n,]", text), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, colon, token = line.partition(":")
            if not colon:
                raise KeyFileError(f"{source}: entry {number} is not 'name:token'")
            pairs.append((name.strip(), token.strip()))
    keys = [_key(name, value, source) for name, value in pairs]
    names = [k.name for k in keys]
    if len(set(names)) != len(names):
        raise KeyFileError(f"{source}: a key name appears twice")
    if len({k.digest for k in keys}) != len(keys):
        raise KeyFileError(f"{source}: two keys share one token; give each key its own")
    return keys


def bearer_token(header: str | bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None if malformed."""
    if header is None:
        return None
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or not _TOKEN.match(token):
        return None
    return token


class KeyStore:
    """The current keys, from ``settings`` (inline and file), reloaded when the file changes.

    ``enabled`` is False when no key source is configured: everything is allowed.
    Raises :class:`KeyFileError` at construction when a configured source cannot be read.
    """

    def __init__(self, inline: str | None, path: Path | None, reload_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 bare_token_name: str | None = None) -> None:
        self.path, self.reload_s, self.clock = path, reload_s, clock
        self.bare_token_name = bare_token_name  # the file holds one bare token of this name
        self.enabled = bool(inline) or path is not None
        self._inline = parse_keys(inline, "GENSERVE_API_KEYS") if inline else []
        self._signature: tuple | None = None
        self._file: list[ApiKey] = []
        if path is not None:
            self._signature, self._file = self._read()
        self._checked = clock()
        self._check_sources()

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        inline = settings.api_keys.get_secret_value() if settings.api_keys else None
        return cls(inline, settings.api_keys_file, settings.api_keys_reload_s)

    @classmethod
    def for_metrics(cls, settings: Settings) -> KeyStore:
        """The separate ``/metrics`` token (a file holding only the token), or disabled."""
        store = cls(None, None)
        if settings.metrics_token_file is not None:
            store = cls(None, settings.metrics_token_file, settings.api_keys_reload_s,
                        bare_token_name="metrics")
        return store

    @property
    def keys(self) -> list[ApiKey]:
        self._maybe_reload()
        return self._inline + self._file

    def _read(self) -> tuple[tuple, list[ApiKey]]:
        assert self.path is not None
        try:
            st = os.stat(self.path)
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or type(err).__name__
            what = "the /metrics token file" if self.bare_token_name else "the API key file"
            raise KeyFileError(f"cannot read {what} {self.path}: {reason}") from None
        if self.bare_token_name is not None:
            keys = [_key(self.bare_token_name, text.strip(), str(self.path))]
        else:
            keys = parse_keys(text, str(self.path))
        return (st.st_ino, st.st_mtime_ns, st.st_size), keys

    def _check_sources(self) -> None:
        if self.enabled and not (self._inline or self._file):
            raise KeyFileError(f"no API keys in {self.path or 'GENSERVE_API_KEYS'}; "
                               "add at least one 'name:token'")

    def _maybe_reload(self) -> None:
        if self.path is None or self.clock() - self._checked < self.reload_s:
            return
        self._checked = self.clock()
        try:
            st = os.stat(self.path)
        except OSError as err:
            log.warning("API key file %s: %s; keeping the previous keys", self.path,
                        err.strerror)
            return
        if (st.st_ino, st.st_mtime_ns, st.st_size) == self._signature:
            return
        try:
            signature, keys = self._read()
        except KeyFileError as err:
            log.warning("%s; keeping the previous keys", err)
            return
        if not keys:
            log.warning("API key file %s has no keys; keeping the previous keys", self.path)
            return
        self._signature, self._file = signature, keys
        log.info("API keys reloaded from %s: %s", self.path, ", ".join(k.name for k in keys))

    def authenticate(self, header: str | bytes | None) -> ApiKey | None:
        """The key whose token the ``Authorization`` header carries, else None."""
        token = bearer_token(header)
        if token is None:
            return None
        digest = _digest(token)
        found = None
        for key in self.keys:  # every key is compared: no early exit
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


class RateLimiter:
    """One token bucket per key name: ``rps`` tokens per second, at most ``burst`` stored.

    Per process: with ``workers`` BentoML workers each holds a bucket refilled at
    ``rps / workers`` (burst likewise divided, at least 1), which adds up to the configured
    rate when requests spread evenly over the workers.
    """

    def __init__(self, rps: float | None, burst: int | None, workers: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rps, self.burst, self.workers, self.clock = rps, burst, workers, clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)

    def _limits(self, key: ApiKey | None) -> tuple[float, float] | None:
        rps = key.rps if key is not None and key.rps is not None else self.rps
        if rps is None:
            return None
        burst = key.burst if key is not None and key.burst is not None else self.burst
        burst = burst if burst is not None else max(1, math.ceil(rps))
        return rps / self.workers, max(1.0, burst / self.workers)

    def acquire(self, name: str, key: ApiKey | None = None) -> float:
        """Take one token for ``name``: 0.0 if allowed, else seconds until one is available."""
        limits = self._limits(key)
        if limits is None:
            return 0.0
        rate, burst = limits
        now = self.clock()
        tokens, at = self._buckets.get(name, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens >= 1.0:
            self._buckets[name] = (tokens - 1.0, now)
            return 0.0
        self._buckets[name] = (tokens, now)
        return (1.0 - tokens) / rate


def security_config(settings: Settings) -> dict[str, Any]:
    """Start-up check of the key and TLS files, and the ``@bentoml.service`` TLS arguments.

    An unreadable or invalid file ends the process with one line naming it (no traceback):
    this runs when the service module is imported, before anything listens.
    """
    try:
        KeyStore.from_settings(settings)
        KeyStore.for_metrics(settings)
        for path in (settings.tls_certfile, settings.tls_keyfile):
            if path is not None:
                try:
                    path.read_bytes()
                except OSError as err:
                    raise KeyFileError(f"cannot read TLS file {path}: {err.strerror}") from None
    except KeyFileError as err:
        raise SystemExit(f"genserve: {err}") from None
    if settings.tls_certfile is None:
        return {}
    return {"ssl": {"enabled": True, "certfile": str(settings.tls_certfile),
                    "keyfile": str(settings.tls_keyfile)}}
