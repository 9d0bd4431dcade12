"""The OpenAPI document at ``/docs.json``, completed with the answers genserve itself gives.

BentoML generates the document from the service's Pydantic models, with 200, 400, 404 and 500
for each API. The boundary and overload middlewares answer more (401, 405, 408, 413, 415,
429, 431, 503, 504, and 500 as the catch-all), always as ``{"error": ...}``; ``complete``
adds them to every verb, with the ``Retry-After`` and ``WWW-Authenticate`` headers they
carry, and documents ``GET /models`` (answered by the boundary) beside BentoML's
``POST /models``. ``ERRORS`` is the one list of
statuses: docs/API.md's status table is checked against it (tests/test_service.py). The
document's ``info`` is genserve's (title, the installed version, what the service does), not
BentoML's generic README with its badges and community links.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from artifact import genserve_version

__all__ = ["ERRORS", "ERROR_SCHEMA", "complete"]

DESCRIPTION = (
    "Likelihood-based generative models (normalizing flows, diffusion, flow matching) behind "
    "three verbs: `POST /sample` draws seeded samples, `POST /log_likelihood` gives log p(x) "
    "per row in the data's units, `POST /anomaly_score` scores rows against the model's "
    "calibrated threshold. `GET /models` lists the served models and what each accepts. "
    "Every error is `{\"error\": ...}` naming what is wrong and what is allowed. "
    "The same verbs speak gRPC (Open Inference Protocol v2); the page at `/` draws samples, "
    "densities and scores.")

ERRORS: dict[int, str] = {
    400: "malformed JSON or an invalid request (the message names the field and what is "
         "allowed)",
    401: "API keys are on and the bearer token is missing or wrong",
    404: "unknown model (the message lists the served ones)",
    405: "the verb was called with another method than POST",
    408: "the headers or the body did not arrive in time (GENSERVE_HEADER_TIMEOUT_S, "
         "GENSERVE_BODY_TIMEOUT_S); the connection is closed",
    413: "too many rows, 'n' over the limit, or the body over GENSERVE_MAX_BODY_BYTES",
    415: "content type other than application/json",
    429: "the API key's request rate is over its limit; retry after Retry-After seconds",
    431: "the request line and headers exceed GENSERVE_MAX_HEADER_BYTES",
    500: "an internal error: the answer carries a request_id that names it in the server log",
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
        "request_id": {"type": "string", "description": "500 only: names the error in the "
                       "server log"},
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


# BentoML's own answer to a POST /models body that is not a JSON object: ``error`` and
# pydantic's ``detail`` list, where BentoML's document says ``detail`` is a string.
_MODELS_400: dict[str, Any] = {
    "description": "the body is not a JSON object (BentoML's answer: 'error', and 'detail' "
                   "listing what was refused)",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}


def complete(doc: dict[str, Any], verb_paths: Iterable[str]) -> dict[str, Any]:
    """A copy of BentoML's document with genserve's error answers on ``verb_paths`` (the
    boundary's ``VERB_PATHS``) and ``GET /models``, each 200 answer's schema as Pydantic
    wrote it, and the 400 that ``POST /models`` really answers."""
    doc = copy.deepcopy(doc)
    doc["info"] = {"title": "genserve", "version": genserve_version(),
                   "description": DESCRIPTION}
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    paths = doc.setdefault("paths", {})
    _refer_200_to_components(paths, schemas)
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
        get = copy.deepcopy({k: v for k, v in models["post"].items() if k != "requestBody"})
        get["operationId"] = f"{get.get('operationId', 'list_models')}_get"
        get["description"] = "The served models and the folders refused at start."
        models["get"] = get
    if "post" in models:
        models["post"].setdefault("responses", {})["400"] = _MODELS_400
    return doc


def _refer_200_to_components(paths: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Point each 200 answer at its component schema (Pydantic's own, under the same title).

    BentoML inlines the 200 schema through a flattening that keeps only the first branch of
    an ``anyOf``: ``steps: int | None`` is documented as ``integer`` there, and a flow's
    ``"steps": null`` contradicts it. The component schema keeps ``anyOf``.
    """
    for item in paths.values():
        for op in item.values() if isinstance(item, dict) else ():
            answer = op.get("responses", {}).get("200", {}) if isinstance(op, dict) else {}
            media = answer.get("content", {}).get("application/json")
            title = (media or {}).get("schema", {}).get("title")
            if title in schemas:
                media["schema"] = {"$ref": f"#/components/schemas/{title}"}
