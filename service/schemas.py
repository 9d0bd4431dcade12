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
    "RepositoryAnswer",
    "RepositoryRequest",
    "Rows",
    "SampleRequest",
    "SampleResponse",
    "VERBS",
    "VersionInfo",
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
                 "rows of numbers, (n, dim), in the units of the training data (integers "
                 "for token models: discrete flow matching)")
MAX_SEED = 2**63 - 1
MAX_VERSION = 999_999_999  # artifact.repository.VERSION_DIR: up to nine digits
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
    version: int | None = Field(None, ge=1, le=MAX_VERSION, description="a version of the "
                                "model (see GET /models); default: the one its serving "
                                "policy names")
    # Row offset of this part inside the client's request: set when the batcher splits one
    # request across two batches, so seeded rows stay the same.
    _offset: int = PrivateAttr(default=0)
    _ticket: Ticket = PrivateAttr(default_factory=Ticket)
    # The loaded version that answers it, chosen once, when it is validated (or, sent through
    # BentoML's own route, when its batch runs); the request holds it, so a version unloaded
    # meanwhile still answers it, and its graphs are released once no request holds it.
    _served: Any = PrivateAttr(default=None)


LABELS_SCHEMA = {
    "anyOf": [{"type": "integer"}, {"type": "string"},
              {"type": "array", "minItems": 1,
               "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]}}],
    "description": "label models: the class (a name from the model's 'condition.classes', or "
    "the integer it names): one for every row, or one per row",
}
CONTEXT_SCHEMA = {
    "anyOf": [{"type": "array", "minItems": 1, "items": {"type": "number"}}, ROWS_SCHEMA],
    "description": "context models: one context row of 'condition.width' numbers for every "
    "row, or one per row",
}


class _Conditioned(_Request):
    """The condition of a conditional model's rows (``service.validation`` turns either into
    one value per row before the request can join a batch)."""

    y: Annotated[Any, WithJsonSchema(LABELS_SCHEMA)] = None
    context: Annotated[Any, WithJsonSchema(CONTEXT_SCHEMA)] = None


class SampleRequest(_Conditioned):
    n: int = Field(description="number of samples", ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="same seed, same samples")
    steps: int | None = Field(None, ge=1, description="solver steps (ODE/diffusion models)")
    solver: str | None = Field(None, description="see GET /models for each model's solvers")
    guidance: float | None = Field(None, ge=0, le=100, description="classifier-free guidance "
                                   "weight w (diffusion and flow-matching label models "
                                   "trained with label dropout): v_u + (1 + w)(v_c - v_u); "
                                   "0 is the plain conditional model")

    @model_validator(mode="after")
    def _seeded(self) -> SampleRequest:
        # Chosen before batching, so a request split across batches keeps one stream.
        if self.seed is None:
            self.seed = secrets.randbelow(2**31)
        return self


class SampleResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    version: int = Field(description="the version of the model that answered")
    samples: Samples
    seed: int
    steps: int | None
    solver: str
    nfe: int = Field(description="graph evaluations that drew the batch the request ran in")


class LogLikelihoodRequest(_Conditioned):
    x: Rows
    marginal: bool = Field(False, description="label models: log p(x), summed over the "
                           "classes with the training data's priors, instead of log p(x | y)")
    method: Literal["exact", "hutchinson", "elbo"] | None = Field(
        None, description="divergence for ODE models; flows are exact but a residual flow "
        "above 64 dims, which serves 'hutchinson' (its card's defaults.method); discrete "
        "flow matching answers its evidence lower bound ('elbo')"
    )
    steps: int | None = Field(None, ge=1, description="fixed solver steps (default adaptive; "
                              "DFM with the uniform source: the ELBO's time nodes, 16)")
    solver: str | None = Field(None, description="ODE solver for the likelihood integral")
    probes: int | None = Field(None, ge=1, description="Hutchinson probes (DFM: the ELBO's "
                               "probes)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Hutchinson probe seed "
                             "(DFM: the ELBO's draws)")


class LogLikelihoodResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    version: int = Field(description="the version of the model that answered")
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


class AnomalyScoreRequest(_Conditioned):
    x: Rows
    target_fpr: float | None = Field(
        None, gt=0, lt=1, description="override the model's calibrated false-positive rate",
        json_schema_extra=_openapi30_open_interval,
    )
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="seed of the score's noise (denoise; Hutchinson)")


class AnomalyScoreResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    model: str
    version: int = Field(description="the version of the model that answered")
    scores: Numbers = Field(description="the model's score kind per row (nll: nats per row)")
    score: str = Field("nll", description="the score kind: nll, denoise, dte or latent")
    threshold: float
    thresholds: Numbers = Field(default_factory=list, description="label models calibrated "
                                "per class: each row's class threshold (empty otherwise)")
    is_anomaly: Flags
    percentile: Numbers = Field(description="percentile among normal validation rows")


class VersionInfo(BaseModel):
    """One version of a model in the models directory, and whether it serves."""

    version: int
    state: Literal["ready", "failed", "unloaded"] = Field(
        description="ready: serving; failed: refused by its checks (sha256, manifest, graph "
        "load, a smoke call), see reason; unloaded: through the repository API")
    reason: str | None = Field(None, description="why it is failed or unloaded")


class ModelInfo(BaseModel):
    """A served version's card: what ``GET /models`` lists (for the version requests naming
    none get) and what requests are checked against (for the version they get)."""

    model_config = ConfigDict(protected_namespaces=())
    name: str
    version: int = Field(1, description="the version this card describes; in GET /models the "
                         "default: the one requests naming no version get")
    versions: list[VersionInfo] = Field(default_factory=list, description="every version "
                                        "of the model, with its state")
    family: str
    model_type: str
    dim: int
    shape: list[int] = Field(default_factory=list,
                             description="one row's shape: [dim], or [C, H, W] for images")
    levels: int | None = Field(None, description="integer data (images): values 0..levels-1")
    graphs: list[str]
    runtime: str
    devices: dict[str, str] = Field(default_factory=dict,
                                    description="where each graph runs: cpu or cuda:N")
    solvers: list[str]
    defaults: dict[str, Any]
    calibration: dict[str, Any] | None
    # the cards of the model's other ready versions, for requests that pin one
    _pinned: dict[int, ModelInfo] = PrivateAttr(default_factory=dict)

    def for_version(self, version: int | None) -> ModelInfo | None:
        """The card of ``version`` (None: this one) while it is ready, else None."""
        if version is None or version == self.version:
            return self
        return self._pinned.get(version)

    def ready_versions(self) -> list[int]:
        return sorted({self.version, *self._pinned})
    time: dict[str, Any] | None = Field(
        None, description="ODE models: the time range (EDM: sigma_min..sigma_max), the base's "
        "std and the family's sampler settings (EDM: rho, sigma_data, churn)")
    manifold: dict[str, Any] | None = Field(
        None, description="rfm: the manifold's name and the tolerance of served rows")
    tokens: dict[str, Any] | None = Field(
        None, description="dfm: rows are integer tokens in [0, vocab); the path's source")
    noise: dict[str, Any] | None = Field(
        None, description="tarflow trained with noise augmentation: the noise std in model "
        "space (log-likelihoods are of the noised data) and how samples are denoised")
    log_det: dict[str, Any] | None = Field(
        None, description="resflow above 64 dims (defaults.method 'hutchinson'): the served "
        "log-det's power-series terms, each block's Lipschitz bound and the truncation bound "
        "in nats per row")
    condition: dict[str, Any] | None = Field(
        None, description="conditional models: kind (label or context), width, classes and "
        "their priors, the null token, the context's columns, per-class thresholds")

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
    failed: dict[str, str] = Field(description="what the models directory holds that does "
                                   "not serve, and why: a model folder (NAME), a version "
                                   "(NAME/VERSION) or a serving policy (NAME/policy.json)")
    unloaded: list[str] = Field(default_factory=list, description="models (NAME) and "
                                "versions (NAME/VERSION) unloaded through the repository API")


class RepositoryRequest(BaseModel):
    """The body of ``POST /models/{name}/load`` and ``/unload`` (and the ``config`` of the
    gRPC repository extension's calls): one version, or the whole model."""

    model_config = ConfigDict(extra="forbid")
    version: int | None = Field(None, ge=1, le=MAX_VERSION, description="one version (default: "
                                "every version of the model)")


class RepositoryAnswer(BaseModel):
    """A model's versions after a repository call."""

    model: str = Field(description="the model's folder name")
    version: int | None = Field(description="the version requests naming none get now "
                                "(null: none serves)")
    versions: list[VersionInfo]


class ErrorResponse(BaseModel):
    error: str
