"""``manifest.json``: the only contract between ``training/`` (which writes it) and the service.

Versioned and validated by Pydantic. It names every graph file with its inputs and outputs
(batch axis dynamic), the family's time convention and schedule, preprocessing, default
solver settings, the anomaly score kind and its calibration, the training data's summary,
the sha256 of every file, and the versions that produced it.

Version 2 added the ``anomaly`` section (``artifact.scores``); a version-1 manifest has none
and serves the ``nll`` score, so both are read.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from artifact.calibration import Calibration
from artifact.conditions import ConditionSpec
from artifact.families import COMMON_GRAPHS, FAMILIES, family
from artifact.scores import LATENTS_FILE, AnomalyScoreSpec

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_VERSION",
    "READABLE_VERSIONS",
    "Calibration",
    "DataInfo",
    "Defaults",
    "GraphFile",
    "LogDetSpec",
    "Manifest",
    "ManifestError",
    "ManifoldSpec",
    "TensorSpec",
    "TimeSpec",
    "TokenSpec",
    "read_manifest",
    "sha256_file",
]

MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Manifest versions this code reads: 1 (before score kinds) and 2."""
MANIFEST_FILE = "manifest.json"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ManifestError(ValueError):
    """An artifact directory is missing a file, fails its sha256, or breaks the schema."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TensorSpec(_Model):
    name: str
    shape: list[int | str] = Field(description='dimensions; "batch" is the dynamic axis')
    dtype: Literal["float32", "float64", "int64"] = "float32"


class GraphFile(_Model):
    file: str
    format: Literal["onnx", "torchscript"]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @field_validator("file")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if "/" in v or "\\" in v or v.startswith("."):
            raise ValueError(f"graph file {v!r} must be a plain file name inside the directory")
        return v


class TimeSpec(_Model):
    """ODE time convention: t = t_min is data, t = t_max is noise, ``noise_std`` times standard
    normal (1 and 1 for diffusion and flow matching; EDM's time is sigma, from sigma_min to
    sigma_max, and its base has the std of data plus sigma_max noise)."""

    t_min: float = Field(0.0, ge=0, lt=1)
    t_max: float = Field(1.0, gt=0)
    noise_std: float = Field(1.0, gt=0, description="std of the base at t_max")
    rho: float | None = Field(None, gt=0, description="fixed-step solvers step uniformly in "
                              "t^(1/rho) (EDM's sigma steps); none: uniformly in t")
    schedule: Literal["linear", "cosine"] | None = None
    beta_min: float | None = None
    beta_max: float | None = None
    # EDM: the data std its denoiser is preconditioned for, and the stochastic sampler's
    # churn (Karras et al. 2022, algorithm 2); s_tmax None: no upper bound
    sigma_data: float | None = Field(None, gt=0)
    s_churn: float | None = Field(None, ge=0)
    s_tmin: float | None = Field(None, ge=0)
    s_tmax: float | None = Field(None, ge=0)
    s_noise: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> TimeSpec:
        if not self.t_min < self.t_max:
            raise ValueError(f"time: t_min {self.t_min} must be below t_max {self.t_max}")
        return self


class ManifoldSpec(_Model):
    """The manifold the rows lie on (``numerics.manifolds``) and the tolerance the service
    allows a request's row (unit norm on the sphere; angles within [-pi, pi] on the torus)."""

    name: Literal["sphere", "torus"]
    tolerance: float = Field(1e-4, gt=0)


class TokenSpec(_Model):
    """Integer token rows: values in ``[0, vocab)``, and the source of the discrete path."""

    vocab: int = Field(ge=2)
    source: Literal["mask", "uniform"] = "mask"


class NoiseSpec(_Model):
    """Training-noise augmentation (TarFlow): Gaussian noise of ``std`` in model space was added
    to every training row, so log-likelihoods are those of the noised data, and samples are
    denoised by one score step ``x + std^2 grad log p(x)`` (``denoise: "tweedie"``)."""

    std: float = Field(gt=0)
    denoise: Literal["tweedie"] = "tweedie"


class LogDetSpec(_Model):
    """How a served residual flow's ``log_prob`` graph computes ``log det(I + J_g)`` above
    the dimension where it is exact (``training.flows.residual.EXACT_MAX_DIM``): the power
    series ``sum_k (-1)^(k+1) tr(J^k) / k`` cut after ``terms`` terms, each trace by
    Hutchinson's estimate ``e^T J^k e`` over the request's Rademacher probes (the answer's
    standard error is theirs). With ``Lip(g_b) <= L_b < 1`` the cut costs at most
    ``D sum_{k > terms} L_b^k / k`` nats per block: ``truncation_bound`` sums it over the
    blocks (a bias, not in the standard error)."""

    series: Literal["truncated_power_series"] = "truncated_power_series"
    terms: int = Field(ge=1, description="power-series terms per residual block")
    lipschitz: list[float] = Field(description="each residual block's bound on Lip(g), from "
                                   "its layers' exact spectral norms at export")
    truncation_bound: float = Field(ge=0, description="nats per row: the most the cut "
                                    "series can differ from the full one")

    @field_validator("lipschitz")
    @classmethod
    def _contractive(cls, v: list[float]) -> list[float]:
        if not v or not all(0 <= c < 1 for c in v):
            raise ValueError(f"log_det.lipschitz must list one bound in [0, 1) per block; "
                             f"got {v}")
        return v


class Defaults(_Model):
    solver: str | None = None
    steps: int | None = Field(None, ge=1)
    method: Literal["exact", "hutchinson", "elbo"] = "exact"
    probes: int = Field(8, ge=1)
    rtol: float = 1e-5
    atol: float = 1e-5


class DataInfo(_Model):
    name: str
    rows: int
    dim: int
    levels: int | None = None
    mean: list[float] = Field(default_factory=list)
    std: list[float] = Field(default_factory=list)
    columns: list[str] = Field(default_factory=list, description="the training table's "
                               "column names in the model's order (bulk scoring's default "
                               "feature columns); empty when the table had none")

    @model_validator(mode="after")
    def _one_name_per_column(self) -> DataInfo:
        if self.columns and len(self.columns) != self.dim:
            raise ValueError(f"data.columns names {len(self.columns)} columns; dim={self.dim}")
        return self


class Manifest(_Model):
    manifest_version: int = MANIFEST_VERSION
    name: str = Field(pattern=NAME_PATTERN)
    family: str = Field(description="a registered family (artifact.families)")
    model_type: str
    dim: int = Field(ge=1)
    event_shape: list[int] = Field(description="shape of one row, e.g. [2] or [1, 8, 8]")
    preprocessing: list[dict] = Field(default_factory=list)
    graphs: dict[str, dict[str, GraphFile]] = Field(description="graph name -> format -> file")
    time: TimeSpec | None = None
    manifold: ManifoldSpec | None = None
    tokens: TokenSpec | None = None
    noise: NoiseSpec | None = Field(
        None, description="training-noise augmentation and the samples' denoising (TarFlow)")
    log_det: LogDetSpec | None = Field(
        None, description="a residual flow above the exact dimension: its served log-det "
        "series, terms and truncation bound")
    defaults: Defaults = Field(default_factory=Defaults)
    calibration: Calibration | None = None
    anomaly: AnomalyScoreSpec | None = Field(
        None, description="the anomaly score kind and its parameters (none: nll)")
    condition: ConditionSpec | None = Field(
        None, description="a conditional model's label or context (none: unconditional)")
    data: DataInfo
    files: dict[str, str] = Field(description="file name -> sha256 of every file but this one")
    versions: dict[str, str] = Field(default_factory=dict)

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        if v not in FAMILIES:
            raise ValueError(f"unknown family {v!r}; known: {', '.join(sorted(FAMILIES))}")
        return v

    @model_validator(mode="after")
    def _complete(self) -> Manifest:
        fam = family(self.family)
        missing = [g for g in fam.all_graphs if g not in self.graphs]
        if missing:
            raise ValueError(f"a {self.family} model needs graphs {missing}")
        extra = [g for g in self.graphs if g not in fam.all_graphs + fam.optional_graphs]
        if extra:
            raise ValueError(f"a {self.family} model has no graphs {extra}")
        for graph, by_format in self.graphs.items():
            for fmt, spec in by_format.items():
                if spec.format != fmt:
                    raise ValueError(f"graph {graph}: format key {fmt} != file format")
                if spec.file not in self.files:
                    raise ValueError(f"graph file {spec.file} has no sha256 in 'files'")
        if fam.timed and self.time is None:
            raise ValueError(f"a {self.family} model needs a 'time' section")
        if self.defaults.method not in fam.likelihood_methods:
            raise ValueError(f"defaults.method {self.defaults.method!r} does not apply to a "
                             f"{self.family} model; its methods: "
                             f"{', '.join(fam.likelihood_methods)}")
        if self.log_det is not None and self.defaults.method != "hutchinson":
            raise ValueError("a 'log_det' series is served by method 'hutchinson'; "
                             f"defaults.method is {self.defaults.method!r}")
        self._check_score(fam.score_kinds)
        self._check_condition()
        if fam.manifold and self.manifold is None:
            raise ValueError(f"a {self.family} model needs a 'manifold' section")
        if fam.tokens and self.tokens is None:
            raise ValueError(f"a {self.family} model needs a 'tokens' section")
        if math.prod(self.event_shape) != self.dim:  # images: [C, H, W], rows flattened
            raise ValueError(f"event_shape {self.event_shape} does not hold dim={self.dim} values")
        return self

    def _check_score(self, kinds: tuple[str, ...]) -> None:
        kind = self.score_kind
        if self.anomaly is not None and self.manifest_version < 2:
            raise ValueError("an 'anomaly' section needs manifest_version 2")
        if kind not in kinds:
            raise ValueError(f"score kind {kind!r} does not apply to a {self.family} model; "
                             f"its kinds: {', '.join(kinds)}")
        if self.calibration is not None and self.calibration.score != kind:
            raise ValueError(f"the calibration is of score {self.calibration.score!r} but the "
                             f"model serves {kind!r}")
        if kind == "latent" and ("encode" not in self.graphs or LATENTS_FILE not in self.files):
            raise ValueError(f"a latent score needs the 'encode' graph and {LATENTS_FILE}")

    def _check_condition(self) -> None:
        """A conditional model's own graphs take ``context: (batch, width)``; none other."""
        for graph, by_format in self.graphs.items():
            for spec in by_format.values():
                names = {t.name: t for t in spec.inputs}
                wants = self.condition is not None and graph not in COMMON_GRAPHS
                if wants and names.get("context") is None:
                    raise ValueError(f"graph {graph} of a conditional model needs a "
                                     "'context' input")
                if wants and names["context"].shape != ["batch", self.condition.width]:
                    raise ValueError(f"graph {graph}: context shape "
                                     f"{names['context'].shape} != [batch, "
                                     f"{self.condition.width}]")
                if not wants and "context" in names:
                    raise ValueError(f"graph {graph} takes a context but the model has no "
                                     "'condition' section")

    @property
    def score_kind(self) -> str:
        """The anomaly score this model serves (``nll`` without an ``anomaly`` section)."""
        return "nll" if self.anomaly is None else self.anomaly.kind

    def formats(self) -> set[str]:
        """Formats every graph is available in."""
        sets = [set(v) for v in self.graphs.values()]
        return set.intersection(*sets) if sets else set()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path, *, verify: bool = True) -> Manifest:
    """Parse and validate ``directory/manifest.json``; with ``verify``, check every sha256."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{directory.name}: {MANIFEST_FILE} is missing")
    try:
        manifest = Manifest.model_validate_json(path.read_bytes())
    except ValueError as err:
        first = str(err).splitlines()
        detail = "; ".join(line.strip() for line in first[1:3]) if len(first) > 1 else str(err)
        raise ManifestError(f"{directory.name}/{MANIFEST_FILE} is invalid: {detail}") from None
    if manifest.manifest_version not in READABLE_VERSIONS:
        raise ManifestError(
            f"{directory.name}: manifest version {manifest.manifest_version}, this service "
            f"reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if verify:
        for name, expected in manifest.files.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
                raise ManifestError(f"{directory.name}: file name {name!r} is not allowed")
            file = directory / name
            if not file.is_file():
                raise ManifestError(f"{directory.name}/{name} is missing")
            if sha256_file(file) != expected:
                raise ManifestError(
                    f"{directory.name}/{name} fails its sha256 check (the file was changed "
                    "after export; re-export the model)"
                )
    return manifest
