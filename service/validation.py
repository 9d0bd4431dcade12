"""Request validation at the boundary, shared by HTTP and gRPC.

Everything that can be known about a request without running a graph is checked here,
before it can join a batch: one bad request never reaches (and so never fails) a batch.
Each error carries a status and a message that says what is wrong and what is allowed.
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np
from pydantic import ValidationError

from artifact.conditions import label_index
from artifact.families import family
from numerics.manifolds import manifold
from service.schemas import (
    AnomalyScoreRequest,
    LogLikelihoodRequest,
    ModelInfo,
    SampleRequest,
)
from service.settings import Settings

__all__ = [
    "Refused",
    "RequestError",
    "card_for",
    "check_condition",
    "pydantic_message",
    "validate_anomaly_score",
    "validate_log_likelihood",
    "validate_sample",
    "validate_verb",
]

FLOAT32_MAX = float(np.finfo(np.float32).max)


class RequestError(Exception):
    """A request that cannot be served as sent. ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Refused(RequestError):
    """A request turned away before its body is read (401, 429, 503), with response headers
    (``WWW-Authenticate``, ``Retry-After``) and extra fields for the error answer."""

    def __init__(self, status: int, message: str, headers: list[tuple[bytes, bytes]],
                 **extra: Any) -> None:
        super().__init__(status, message)
        self.headers, self.extra = headers, extra


def pydantic_message(err: ValidationError) -> str:
    """Pydantic's errors in one line: each field and what is wrong with it."""
    parts = []
    for e in err.errors(include_url=False):
        field = ".".join(str(p) for p in e["loc"]) or "body"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it"
        parts.append(f"'{field}': {msg}")
    return "; ".join(parts)


def _parse(cls: type, body: Any) -> Any:
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(body)
    except ValidationError as err:
        raise RequestError(400, pydantic_message(err)) from None


def card_for(cards: dict[str, ModelInfo], name: str, version: int | None = None) -> ModelInfo:
    """The card of model ``name`` at ``version`` (None: the model's default), or 404 listing
    the served models, or the model's versions."""
    card = cards.get(name)
    if card is None:
        shown = repr(name[:64])
        choices = ", ".join(sorted(cards)) or "(none loaded)"
        raise RequestError(404, f"unknown model {shown}; served models: {choices}")
    pinned = card.for_version(version)
    if pinned is None:
        served = ", ".join(map(str, card.ready_versions()))
        known = {v.version: v for v in card.versions}.get(version)
        why = "" if known is None else f" (it is {known.state}" + (
            f": {known.reason[:160]})" if known.reason else ")")
        raise RequestError(404, f"model '{name}' has no version {version} serving{why}; its "
                           f"versions serving: {served} (without 'version': {card.version})")
    return pinned


def _card(cards: dict[str, ModelInfo], req: Any) -> ModelInfo:
    """The card of the request's model at its version; the request is given that version."""
    card = card_for(cards, req.model, req.version)
    req.version = card.version
    return card


def _limit(value: int | None, field: str, maximum: int) -> None:
    if value is not None and value > maximum:
        raise RequestError(
            413 if field in ("n", "x") else 400,
            f"'{field}' is {value}; the largest allowed is {maximum} (server limit)",
        )


def check_rows(x: Any, card: ModelInfo, max_rows: int) -> np.ndarray:
    """``x`` as finite float64 ``(rows, dim)``; the message names the problem and the fix.

    ``x`` is a JSON list of rows, or an array a transport has already decoded and shaped
    (gRPC tensors), whose values are checked the same way."""
    if isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == card.dim and len(x):
        _limit(len(x), "x", max_rows)
        return _check_manifold(_check_values(x.astype(np.float64, copy=False)), card)
    if not isinstance(x, list):
        raise RequestError(400, f"'x' must be a list of rows, each {card.row_form()}")
    if len(x) == 0:
        raise RequestError(400, "'x' is empty; send at least one row")
    _limit(len(x), "x", max_rows)
    if card.is_image:
        x = [_flat_image(row, i, card) for i, row in enumerate(x)]
    for i, row in enumerate(x):
        if not isinstance(row, list):
            raise RequestError(400, f"'x' row {i} is not a list; each row is {card.row_form()}")
        if len(row) != card.dim:
            shape = f" (images of shape {list(card.shape)})" if card.is_image else ""
            raise RequestError(400, f"'x' row {i} has {len(row)} values but model "
                               f"'{card.name}' expects {card.dim}{shape}")
    try:
        arr = np.array(x)
    except (ValueError, TypeError):
        raise RequestError(400, "'x' has rows of different lengths") from None
    # numpy turns true/false beside numbers into 1/0: look for them among the values; a row
    # of lists (not an image model's) makes a third dimension
    if arr.ndim != 2 or arr.dtype.kind not in "iuf" or bool in set(
            map(type, chain.from_iterable(x))):
        raise RequestError(400, "'x' must contain only numbers (no strings, booleans or nulls)")
    return _check_manifold(_check_values(arr.astype(np.float64, copy=False)), card)


def _check_manifold(arr: np.ndarray, card: ModelInfo) -> np.ndarray:
    """``arr`` if every row lies on the model's manifold within its tolerance (or, for token
    models, holds integers in ``[0, vocab)``), else 400 naming the first row off it."""
    if card.tokens is not None:
        vocab = card.tokens["vocab"]
        bad = (arr != np.round(arr)) | (arr < 0) | (arr >= vocab)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise RequestError(400, f"'x' row {r}, column {c} is {arr[r, c]:g}; model "
                               f"'{card.name}' takes integer tokens in [0, {vocab})")
        return arr
    if card.manifold is None:
        return arr
    m = manifold(card.manifold["name"], card.manifold["tolerance"])
    off = m.off_manifold(arr)
    bad = np.flatnonzero(off > m.tolerance)
    if len(bad):
        raise RequestError(400, f"'x' row {bad[0]} is {off[bad[0]]:.3g} off the manifold; "
                           f"model '{card.name}' takes points on {m.describe(card.dim)}")
    return arr


def _check_values(arr: np.ndarray) -> np.ndarray:
    """``arr`` if every value is finite and within float32's range, else 400 naming one."""
    if not np.abs(arr).max() <= FLOAT32_MAX:  # one reduction; NaN, ±inf and huge all fail it
        bad = ~np.isfinite(arr)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise RequestError(400, f"'x' has a non-finite value at row {r}, column {c}; "
                               "every value must be a finite number")
        r, c = np.argwhere(np.abs(arr) > FLOAT32_MAX)[0]
        raise RequestError(400, f"'x' has a value beyond float32 range at row {r}, column {c}; "
                           f"values must lie within ±{FLOAT32_MAX:.4g}")
    return arr


def _flat_image(row: Any, i: int, card: ModelInfo) -> Any:
    """A nested C x H x W row flattened in C-order; any other row is returned as it is."""
    if not (isinstance(row, list) and row and isinstance(row[0], list)):
        return row
    try:
        arr = np.array(row)
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.dtype == object or arr.shape != tuple(card.shape):
        found = "ragged" if arr is None or arr.dtype == object else f"shape {list(arr.shape)}"
        raise RequestError(400, f"'x' row {i} is a nested list of {found}, but model "
                           f"'{card.name}' expects images of shape {list(card.shape)} "
                           f"(C x H x W) or flat rows of {card.dim} numbers")
    if arr.dtype.kind not in "iuf" or arr.dtype == bool:
        raise RequestError(400, "'x' must contain only numbers (no strings, booleans or nulls)")
    return arr.reshape(-1).tolist()


def check_condition(req: Any, card: ModelInfo, rows: int, marginal: bool = False) -> None:
    """Turn the request's ``y`` or ``context`` into one value per row (``(rows,)`` class
    indices, ``(rows, width)`` floats) against the card's ``condition``, or 400 saying what
    the model takes."""
    y, context, name = req.y, req.context, card.name
    if card.condition is None:
        if y is not None or context is not None or marginal:
            field = "'y'" if y is not None else "'context'" if context is not None \
                else "'marginal'"
            raise RequestError(400, f"model '{name}' is unconditional: {field} does not "
                               "apply; leave it out")
        return
    spec = card.condition
    if spec["kind"] == "label":
        if context is not None:
            raise RequestError(400, f"model '{name}' is conditioned on a label: send 'y' (one "
                               f"of {_classes(spec)}), not 'context'")
        if marginal:
            if y is not None:
                raise RequestError(400, "'marginal': true sums log p(x | y) over every class; "
                                   "leave out 'y'")
            return
        req.y = _labels(y, spec, name, rows)
        return
    if y is not None:
        raise RequestError(400, f"model '{name}' is conditioned on a context of "
                           f"{spec['width']} numbers: send 'context', not 'y'")
    if marginal:
        raise RequestError(400, f"'marginal' applies to label models; model '{name}' is "
                           "conditioned on a context")
    req.context = _context(context, spec["width"], name, rows)


def _classes(spec: dict[str, Any]) -> str:
    classes = spec["classes"]
    more = f", ... ({len(classes)} classes)" if len(classes) > 20 else ""
    return ", ".join(classes[:20]) + more


def _labels(y: Any, spec: dict[str, Any], name: str, rows: int) -> np.ndarray:
    if y is None:
        raise RequestError(400, f"model '{name}' is conditioned on a label: send 'y', one of "
                           f"{_classes(spec)} (one for all rows, or one per row)")
    many = isinstance(y, list | np.ndarray)
    values = list(y) if many else [y]
    if many and len(values) != rows:
        raise RequestError(400, f"'y' has {len(values)} labels but the request has {rows} "
                           "rows; send one label for all rows, or one per row")
    index = [label_index(spec["classes"], v) for v in values]
    for i, (v, k) in enumerate(zip(values, index, strict=True)):
        if k is None:
            where = f" (row {i})" if many else ""
            raise RequestError(400, f"'y' {str(v)[:32]!r}{where} is not a class of model "
                               f"'{name}'; its classes: {_classes(spec)}")
    out = np.asarray(index, dtype=np.int64)
    return out if many else np.repeat(out, rows)


def _context(context: Any, width: int, name: str, rows: int) -> np.ndarray:
    if context is None:
        raise RequestError(400, f"model '{name}' is conditioned on a context: send 'context', "
                           f"{width} numbers for all rows or a row of {width} per row")
    if isinstance(context, list) and not all(
            type(v) in (int, float) for v in _flat(context)):
        raise RequestError(400, f"'context' must be {width} numbers, or a list of rows of "
                           f"{width} numbers (one per row); no strings, booleans or nulls")
    try:
        arr = np.asarray(context, dtype=np.float64)
    except (ValueError, TypeError):
        arr = None
    if arr is None or arr.ndim not in (1, 2) or arr.size == 0:
        raise RequestError(400, f"'context' must be {width} numbers, or a list of rows of "
                           f"{width} numbers (one per row)")
    if arr.shape[-1] != width:
        raise RequestError(400, f"'context' rows have {arr.shape[-1]} values but model "
                           f"'{name}' takes a context of {width}")
    if arr.ndim == 2 and len(arr) != rows:
        raise RequestError(400, f"'context' has {len(arr)} rows but the request has {rows}; "
                           "send one context row for all rows, or one per row")
    if not np.isfinite(arr).all() or np.abs(arr).max() > FLOAT32_MAX:
        raise RequestError(400, "'context' values must be finite numbers within float32 range")
    return np.broadcast_to(arr, (rows, width)).copy() if arr.ndim == 1 else arr


def _flat(values: list) -> list:
    """The numbers of a list, or of a list of lists (anything deeper stays a list)."""
    return list(chain.from_iterable(v if isinstance(v, list) else [v] for v in values))


def validate_sample(body: Any, cards: dict[str, ModelInfo], s: Settings,
                    cls: type[SampleRequest] = SampleRequest) -> SampleRequest:
    req = _parse(cls, body)
    card = _card(cards, req)
    _limit(req.n, "n", s.max_samples)
    _limit(req.steps, "steps", s.max_steps)
    if req.solver is not None and req.solver not in card.solvers:
        raise RequestError(400, f"unknown solver {req.solver[:32]!r} for {card.family} model "
                           f"'{card.name}'; choose one of: {', '.join(card.solvers)}")
    check_condition(req, card, req.n)
    _check_guidance(req.guidance, card)
    return req


def _check_guidance(guidance: float | None, card: ModelInfo) -> None:
    """400 unless ``guidance`` applies: a label model of an ODE family with label dropout."""
    if guidance is None:
        return
    if not family(card.family).guidance:
        raise RequestError(400, f"'guidance' applies to diffusion and flow-matching models; "
                           f"model '{card.name}' is a {card.family}: leave it out")
    if card.condition is None or not card.condition.get("cfg_dropout"):
        raise RequestError(400, f"model '{card.name}' was trained without label dropout "
                           "(train --condition label --cfg-dropout P), so it has no "
                           "unconditional field to guide against: leave 'guidance' out")


def validate_log_likelihood(body: Any, cards: dict[str, ModelInfo], s: Settings,
                            cls: type[LogLikelihoodRequest] = LogLikelihoodRequest,
                            ) -> LogLikelihoodRequest:
    req = _parse(cls, body)
    card = _card(cards, req)
    req.x = check_rows(body["x"], card, s.max_rows)  # as sent: the schema flattens images
    _limit(req.steps, "steps", s.max_steps)
    _limit(req.probes, "probes", s.max_probes)
    spec = family(card.family)
    if spec.one_pass_likelihood:
        (only,) = spec.served_methods(card.defaults.get("method"))
        if req.method not in (None, only):
            raise RequestError(400, f"model '{card.name}' is a {card.family}: its likelihood is "
                               f"{only}; use method '{only}' or leave it out")
        if req.solver is not None or req.steps is not None:
            raise RequestError(400, f"model '{card.name}' is a {card.family}: 'solver' and "
                               "'steps' do not apply; leave them out")
    elif req.solver is not None and req.solver not in spec.likelihood_solvers:
        raise RequestError(400, f"unknown solver {req.solver[:32]!r} for the likelihood; "
                           f"choose one of: {', '.join(spec.likelihood_solvers)}")
    check_condition(req, card, len(req.x), marginal=req.marginal)
    return req


def validate_anomaly_score(body: Any, cards: dict[str, ModelInfo], s: Settings,
                           cls: type[AnomalyScoreRequest] = AnomalyScoreRequest,
                           ) -> AnomalyScoreRequest:
    req = _parse(cls, body)
    card = _card(cards, req)
    if not card.calibrated:
        raise RequestError(400, f"model '{card.name}' has no anomaly calibration; re-export it")
    req.x = check_rows(body["x"], card, s.max_rows)  # as sent: the schema flattens images
    check_condition(req, card, len(req.x))
    return req


VALIDATORS = {
    "sample": validate_sample,
    "log_likelihood": validate_log_likelihood,
    "anomaly_score": validate_anomaly_score,
}


def validate_verb(verb: str, body: Any, cards: dict[str, ModelInfo], s: Settings,
                  types: dict[str, type] | None = None) -> Any:
    """The validated request of ``verb``, as ``types[verb]`` when given (a subclass of the
    verb's schema: BentoML's input type, so the request can go to its batcher as it is)."""
    if types is None:
        return VALIDATORS[verb](body, cards, s)
    return VALIDATORS[verb](body, cards, s, types[verb])
