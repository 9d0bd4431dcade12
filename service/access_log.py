"""The access log: one JSON line per verb request on stderr, logger ``genserve.access``.

Fields: ``ts`` (UTC, ISO 8601), ``protocol`` (``http`` | ``grpc``), ``key`` (the API key's
name, or null), ``verb``, ``model`` (a loaded model's name, or ``"unknown"``), ``version``
(the model version that answered, or null), ``rows`` (rows of ``x`` or samples asked for,
or null), ``status`` (HTTP code or gRPC status name) and ``latency_ms``. Never payload
values, never tokens. ``GENSERVE_ACCESS_LOG=false`` turns it off.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from functools import lru_cache

import numpy as np

__all__ = ["ACCESS_LOGGER", "access_logger", "log_access", "rows_in"]

ACCESS_LOGGER = "genserve.access"


def access_logger(enabled: bool) -> logging.Logger:
    """The ``genserve.access`` logger, writing bare JSON lines to stderr (or disabled)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.propagate = False  # not through BentoML's or the root's formatters
    logger.setLevel(logging.INFO)
    if not any(getattr(h, "_genserve", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._genserve = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.disabled = not enabled  # also undoes a logging.config that disabled it
    return logger


def log_access(logger: logging.Logger, *, protocol: str, key: str | None, verb: str,
               model: str, version: int | None, rows: int | None, status: int | str,
               latency_s: float) -> None:
    """Write one line. The line is formatted by hand and handed to the logger's handlers as
    one record, without ``Logger.info``'s caller lookup: that lookup and ``json.dumps`` of the
    whole line cost about a tenth of a worker's time per request under 1-row load."""
    if logger.disabled or not logger.isEnabledFor(logging.INFO):
        return
    now = time.time()
    millis = int(now * 1000) % 1000
    line = (f'{{"ts":"{_second(int(now))}.{millis:03d}+00:00","protocol":{_json(protocol)},'
            f'"key":{_json(key)},"verb":{_json(verb)},"model":{_json(model)},'
            f'"version":{_json(version)},"rows":{_json(rows)},"status":{_json(status)},'
            f'"latency_ms":{round(latency_s * 1000, 3)!r}}}')  # a finite float's repr is JSON
    logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, line, None, None))


@lru_cache(maxsize=4)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


@lru_cache(maxsize=1024)
def _json(value: str | int | None) -> str:
    """A field value as JSON (the values are bounded: names of loaded models, key names,
    versions, verbs, statuses and row counts)."""
    return json.dumps(value)


def rows_in(verb: str, payload: object) -> int | None:
    """How many rows a (validated) request asks for: ``n`` for sample, ``len(x)`` otherwise."""
    if not isinstance(payload, dict):
        return None
    value = payload.get("n") if verb == "sample" else payload.get("x")
    if isinstance(value, list | np.ndarray):  # JSON rows, or a gRPC tensor's
        return len(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
