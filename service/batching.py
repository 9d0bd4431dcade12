"""Rows as the unit of BentoML's adaptive batching, for flat JSON requests.

A batch is a ``Parts`` list of requests (or parts of requests) in arrival order, and its
answer an ``Answers`` list with one answer per part, errors included, so a part that cannot
be served fails alone. A request larger than the room left in a batch is split at a row
boundary (:func:`split_request`), keeping its row offset so that seeded rows do not change,
and the two halves' answers are merged back (:func:`merge_answers`).
``service.bentoml_glue`` registers these with BentoML's batcher.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel
from starlette.responses import JSONResponse, Response

from service.schemas import SampleRequest

__all__ = ["Answers", "ErrorAnswer", "Parts", "error_answer", "merge_answers", "rows_of",
           "split_request"]


class Parts(list):
    """The requests (or parts of requests) in one batch, in arrival order."""


class Answers(list):
    """One answer per part, in the same order: a response model or an error response."""


def rows_of(req: BaseModel) -> int:
    return int(req.n) if isinstance(req, SampleRequest) else len(req.x)


class ErrorAnswer(JSONResponse):
    """A part's error answer: JSON ``{"error": ...}`` with its status, and that payload kept
    for transports other than HTTP."""

    def __init__(self, status: int, payload: dict[str, Any]) -> None:
        super().__init__(payload, status_code=status)
        self.payload = payload


def error_answer(status: int, message: str, **extra: Any) -> ErrorAnswer:
    return ErrorAnswer(status, {"error": message, **extra})


def split_request(req: BaseModel, k: int) -> list[BaseModel]:
    """Two parts: rows ``[0, k)`` and ``[k, rows)`` of ``req``."""
    offset = req._offset
    # per-row fields (a conditional model's y and context, one value per row once validated)
    rows = [f for f in ("x", "y", "context") if isinstance(getattr(req, f, None), np.ndarray)]
    head = {f: getattr(req, f)[:k] for f in rows}
    tail = {f: getattr(req, f)[k:] for f in rows}
    if isinstance(req, SampleRequest):
        head["n"], tail["n"] = k, req.n - k
    else:
        head["x"], tail["x"] = req.x[:k], req.x[k:]
    first, second = req.model_copy(update=head), req.model_copy(update=tail)
    first._offset, second._offset = offset, offset + k
    return [first, second]


def merge_answers(first: Any, second: Any) -> Any:
    """The answer of a request that was split over two batches."""
    if isinstance(first, Response):
        return first
    if isinstance(second, Response):
        return second
    update = {}
    for name, value in first:
        other = getattr(second, name)
        if isinstance(value, np.ndarray | list):
            update[name] = np.concatenate([np.asarray(value), np.asarray(other)])
        elif name == "nfe":
            update[name] = max(value, other)
    return first.model_copy(update=update)
