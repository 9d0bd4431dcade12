"""Request and response bodies of the HTTP API (the JSON shapes in DESIGN.md).

``x`` is declared for the OpenAPI document but not validated element by element by Pydantic
(that would cost milliseconds per request): ``service.validation`` checks it with numpy before
the request can join a batch.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    WithJsonSchema,
    model_validator,
)

__all__ = [
    "AnomalyScoreRequest",
    "AnomalyScoreResponse",
    "ErrorResponse",
    "flatten_image_rows",
    "LogLikelihoodRequest",
    "LogLikelihoodResponse",
    "ModelInfo",
    "ModelsResponse",
    "Rows",
    "SampleRequest",
    "SampleResponse",
    "VERBS",
]

ROWS_SCHEMA = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "array", "minItems": 1, "items": {"type": "number"}},
    "description": "rows of numbers, (rows, dim), in the units of the training data; image "
    "models also take each row as a nested C x H x W list (see the model's 'shape')",
}


def flatten_image_rows(x: Any) -> Any:
    """Nested ``C x H x W`` rows (image models) flattened in C-order; other rows untouched.

    ``service.validation`` has already checked the shapes at the boundary; a row that does
    not flatten cleanly is left for it (or the runtime) to refuse.
    """
    if not isinstance(x, list) or not any(
        isinstance(row, list) and row and isinstance(row[0], list) for row in x
    ):
        return x
    out = []
    for row in x:
        if isinstance(row, list) and row and isinstance(row[0], list):
            try:
                row = np.asarray(row, dtype=np.float64).reshape(-1).tolist()
            except (TypeError, ValueError):
                pass
        out.append(row)
    return out


Rows = Annotated[Any, AfterValidator(flatten_image_rows), WithJsonSchema(ROWS_SCHEMA)]


def _as_json(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _array(items: dict[str, Any], description: str | None = None) -> Any:
    """An answer field held as a numpy array (gRPC encodes its bytes; JSON, its list)."""
    schema = {"type": "array", "items": items} | ({"description": description}
                                                 if description else {})
    return Annotated[Any, PlainSerializer(_as_json), WithJsonSchema(schema)]


Numbers = _array({"type": "number"})
Flags = _array({"type": "boolean"})
Samples = _array({"type": "array", "items": {"type": "number"}},
                 "rows of numbers, (n, dim), in the units of the training data")
MAX_SEED = 2**63 - 1
VERBS = ("sample", "log_likelihood", "anomaly_score")
"""The verbs every model serves, over every transport."""


class Ticket:
    """Shared by a request and the parts the batcher splits it into (``model_copy`` keeps
    the same object): ``abandoned`` is set once its client has stopped waiting (the request
    timed out, 504), so a batch that has not started yet leaves it out; ``request_id`` names
    the request in an internal-error answer and in the server log line that explains it;
    ``transport`` is the edge it came through (``http`` or ``grpc``)."""

    __slots__ = ("abandoned", "request_id", "transport")

    def __init__(self) -> None:
        self.abandoned = False
        self.request_id = secrets.token_hex(8)
        self.transport = "http"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description="served model name (see GET /models)", max_length=64)
    # Row offset of this part inside the client's request: set when the batcher splits one
    # request across two batches, so seeded rows stay the same.
    _offset: int = PrivateAttr(default=0)
    _ticket: Ticket = PrivateAttr(default_factory=Ticket)


class SampleRequest(_Request):
    n: int = Field(description="number of samples", ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed, same samples")
    steps: int | None = Field(None, ge=1, description="solver steps (ODE/diffusion models)")
    solver: str | None = Field(None, description="see GET /models for each model's solvers")

    @model_validator(mode="after")
    def _seeded(self) -> SampleRequest:
        # Chosen before batching, so a request split across batches keeps one stream.
        if self.seed is None:
            self.seed = secrets.randbelow(2**31)
        return self


class SampleResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    samples: Samples
    seed: int
    steps: int | None
    solver: str


class LogLikelihoodRequest(_Request):
    x: Rows
    method: Literal["exact", "hutchinson", "elbo"] | None = Field(
        None, description="divergence for ODE models; flows are always exact; discrete flow "
        "matching answers its evidence lower bound ('elbo')"
    )
    steps: int | None = Field(None, ge=1, description="fixed solver steps (default adaptive)")
    solver: str | None = Field(None, description="ODE solver for the likelihood integral")
    probes: int | None = Field(None, ge=1, description="Hutchinson probes (DFM: random "
                               "orders of the ELBO)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Hutchinson probe seed "
                             "(DFM: the ELBO's orders)")


class LogLikelihoodResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    log_likelihood: Numbers = Field(description="nats per row, in the data's units")
    bits_per_dim: Numbers
    method: str
    std_error: Numbers = Field(
        default_factory=list, description="Hutchinson's (or the ELBO's) standard error per "
        "row; empty if exact"
    )
    nfe: int = Field(description="graph evaluations used")


def _openapi30_open_interval(schema: dict[str, Any]) -> None:
    """BentoML publishes OpenAPI 3.0, where ``exclusiveMinimum``/``exclusiveMaximum`` are
    booleans beside ``minimum``/``maximum`` (JSON Schema 2020's numeric form is invalid there)."""
    targets = schema.get("anyOf", [schema])
    for part in targets:
        for bound, flag in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
            if isinstance(part.get(flag), (int, float)) and not isinstance(part[flag], bool):
                part[bound], part[flag] = part[flag], True


class AnomalyScoreRequest(_Request):
    x: Rows
    target_fpr: float | None = Field(
        None, gt=0, lt=1, description="override the model's calibrated false-positive rate",
        json_schema_extra=_openapi30_open_interval,
    )


class AnomalyScoreResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    scores: Numbers = Field(description="negative log-likelihood, nats per row")
    threshold: float
    is_anomaly: Flags
    percentile: Numbers = Field(description="percentile among normal validation rows")


class ModelInfo(BaseModel):
    """A served model's card: what ``GET /models`` lists and what requests are checked
    against."""

    model_config = ConfigDict(protected_namespaces=())
    name: str
    family: str
    model_type: str
    dim: int
    shape: list[int] = Field(default_factory=list,
                             description="one row's shape: [dim], or [C, H, W] for images")
    graphs: list[str]
    runtime: str
    solvers: list[str]
    defaults: dict[str, Any]
    calibration: dict[str, Any] | None
    time: dict[str, Any] | None = Field(
        None, description="ODE models: the time range (EDM: sigma_min..sigma_max), the base's "
        "std and the family's sampler settings (EDM: rho, sigma_data, churn)")
    manifold: dict[str, Any] | None = Field(
        None, description="rfm: the manifold's name and the tolerance of served rows")
    tokens: dict[str, Any] | None = Field(
        None, description="dfm: rows are integer tokens in [0, vocab); the path's source")

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    @property
    def is_image(self) -> bool:
        return len(self.shape) > 1

    def row_form(self) -> str:
        """How a row is written, for error messages."""
        flat = f"a list of {self.dim} numbers"
        if not self.is_image:
            return flat
        return f"{flat} or a nested list of shape {self.shape} (C x H x W)"


class ModelsResponse(BaseModel):
    models: list[ModelInfo]
    failed: dict[str, str] = Field(description="model folders refused at start, and why")


class ErrorResponse(BaseModel):
    error: str
