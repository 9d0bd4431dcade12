"""The OpenAPI document at ``/docs.json``, completed with the answers genserve itself gives.

BentoML generates the document from the service's Pydantic models, with 200, 400, 404 and 500
for each API. The boundary and overload middlewares answer more (401, 405, 413, 415, 429,
503, 504), always as ``{"error": ...}``; ``complete`` adds them to every verb, with the
``Retry-After`` and ``WWW-Authenticate`` headers they carry, and documents ``GET /models``
(answered by the boundary) beside BentoML's ``POST /models``. ``ERRORS`` is the one list of
statuses: docs/API.md's status table is checked against it (tests/test_service.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

__all__ = ["ERRORS", "ERROR_SCHEMA", "complete"]

ERRORS: dict[int, str] = {
    400: "malformed JSON or an invalid request (the message names the field and what is "
         "allowed)",
    401: "API keys are on and the bearer token is missing or wrong",
    404: "unknown model (the message lists the served ones)",
    405: "the verb was called with another method than POST",
    413: "too many rows, 'n' over the limit, or the body over GENSERVE_MAX_BODY_BYTES",
    415: "content type other than application/json",
    429: "the API key's request rate is over its limit; retry after Retry-After seconds",
    503: "the worker's queue is full or a batch overran its latency budget; retry after "
         "Retry-After seconds",
    504: "the request did not finish within GENSERVE_TIMEOUT_S",
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what is wrong and what is allowed"},
        "retry_after_s": {"type": "integer", "description": "429 only: seconds to wait"},
    },
}

_HEADERS = {
    401: {"WWW-Authenticate": {"description": 'Bearer realm="genserve"',
                               "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before retrying",
                          "schema": {"type": "integer"}}},
    503: {"Retry-After": {"description": "seconds to wait (GENSERVE_RETRY_AFTER_S)",
                          "schema": {"type": "integer"}}},
}


def complete(doc: dict[str, Any], verb_paths: Iterable[str]) -> dict[str, Any]:
    """A copy of BentoML's document with genserve's error answers on ``verb_paths`` (the
    boundary's ``VERB_PATHS``) and ``GET /models``."""
    doc = copy.deepcopy(doc)
    doc.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    paths = doc.setdefault("paths", {})
    for path in verb_paths:
        op = paths.get(path, {}).get("post")
        if op is None:
            continue
        responses = op.setdefault("responses", {})
        for status, description in ERRORS.items():
            entry: dict[str, Any] = {
                "description": description,
                "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Error"}}},
            }
            if status in _HEADERS:
                entry["headers"] = _HEADERS[status]
            responses[str(status)] = entry
    models = paths.get("/models", {})
    if "post" in models and "get" not in models:
        get = {k: v for k, v in models["post"].items() if k != "requestBody"}
        get["operationId"] = f"{get.get('operationId', 'list_models')}_get"
        get["description"] = "The served models and the folders refused at start."
        models["get"] = get
    return doc
