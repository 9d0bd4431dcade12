"""Service settings, read once from the environment (documented in README's table)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from service.runtime.graphs import Placement

__all__ = ["CPU_BATCH_ROWS", "CUDA_BATCH_ROWS", "Settings", "SettingsError", "load_settings"]

ENV_PREFIX = "GENSERVE_"
CPU_BATCH_ROWS = 4096
CUDA_BATCH_ROWS = 16384
"""Rows per adaptive batch when the models run on CUDA. Provisional: no GPU has measured it
yet. ``make gpu-check`` on a lent GPU times the PF-ODE log-likelihood at 1024 to 65536 rows
per call and reports the smallest batch within 10 % of the best rows/s (docs/BENCHMARKS.md,
"GPU"); that figure replaces this one."""


class Settings(BaseModel):
    """Every knob of the service; environment variable = ``GENSERVE_`` + upper-case name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models_dir: Path = Field(Path("exported_models"), description="directory of model folders")
    models_poll_s: float = Field(5.0, ge=0.05, le=3600, description="seconds within which "
                                 "each worker follows the models directory (it reads it every "
                                 "quarter of this): new models and versions load, removed "
                                 "ones retire, policies apply")
    plugins: list[str] = Field(default_factory=list, description="modules imported at start "
                               "that register model families or types (comma-separated)")
    runtime: Literal["auto", "onnx", "torchscript"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    device_id: int = Field(0, ge=0, description="CUDA device index the graphs run on")
    provider: Literal["CUDAExecutionProvider", "TensorrtExecutionProvider"] = Field(
        "CUDAExecutionProvider", description="ONNX Runtime GPU execution provider tried first")
    gpu_memory_mb: int | None = Field(None, ge=64, description="GPU memory cap per worker "
                                      "process (ONNX Runtime gpu_mem_limit per graph, torch's "
                                      "memory fraction)")
    threads: int | None = Field(None, ge=1, description="intra-op threads per graph session "
                                "(default: the usable CPUs divided among the workers)")
    workers: int = Field(1, ge=1, le=64, description="BentoML worker processes")
    grpc: bool = Field(True, description="serve gRPC (Open Inference Protocol v2) beside HTTP")
    grpc_host: str = Field("127.0.0.1", description="interface gRPC binds (genserve serve "
                           "sets it to --host)")
    grpc_port: int = Field(8001, ge=0, le=65535, description="gRPC port, shared by the workers "
                           "(0: a free port, one worker)")
    grpc_health_port: int | None = Field(None, ge=0, le=65535, description="grpc.health.v1 "
                                         "alone, in plaintext (kubelet probes when gRPC "
                                         "speaks TLS)")
    grpc_grace_s: float = Field(5.0, ge=0, description="seconds a stopping worker gives gRPC "
                                "calls in flight")
    batching: bool = Field(True, description="adaptive batching on (off: one request per call)")
    fast_path: bool = Field(True, description="the boundary hands validated verb requests to "
                            "BentoML's batcher directly (false: through BentoML's HTTP route)")
    max_batch_rows: int | None = Field(None, ge=2, description="adaptive batching: rows per "
                                       "batch (unset: batch_rows_default(on_cuda))")
    max_latency_ms: int = Field(10000, ge=1, description="adaptive batching: queueing bound")
    max_batch_wait_ms: float = Field(5.0, ge=0, description="adaptive batching: longest a "
                                     "request is held back to wait for others")
    max_rows: int = Field(10000, ge=1, description="rows of x per request")
    max_samples: int = Field(10000, ge=1, description="n per /sample request")
    max_steps: int = Field(1000, ge=1, description="solver steps per request")
    max_probes: int = Field(64, ge=1, description="Hutchinson probes per request")
    max_body_bytes: int = Field(8 << 20, ge=1024, description="request body size limit")
    timeout_s: int = Field(60, ge=1, description="request timeout (BentoML traffic.timeout)")
    max_concurrency: int | None = Field(None, ge=1, description="requests in flight per service")
    max_queue: int = Field(512, ge=1, description="verb requests queued or running per worker; "
                           "beyond it a fast 503 with Retry-After")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of overload answers")
    # hostile input and slow clients (docs/API.md, "Limits")
    max_json_depth: int = Field(32, ge=5, le=512, description="arrays and objects nested in "
                                "a request body, checked before parsing (400 above)")
    max_number_chars: int = Field(100, ge=24, le=4000, description="characters of one number "
                                  "in a request body, checked before parsing (400 above)")
    header_timeout_s: float = Field(10.0, gt=0, description="a request's headers must arrive "
                                    "within this (408 and close); a new connection's first "
                                    "request too")
    max_header_bytes: int = Field(32768, ge=4096, le=1 << 20, description="request line and "
                                  "headers of one request (431 and close above)")
    body_timeout_s: float = Field(10.0, gt=0, description="a verb request's body must arrive "
                                  "within this plus 1 s per min_body_rate bytes (408 and close)")
    min_body_rate: int = Field(65536, ge=1, description="bytes/s a slow body is allowed "
                               "beyond body_timeout_s")
    linger_bytes: int = Field(64 << 20, ge=0, description="after an answer given before the "
                              "body was read (401, 413, 415, ...), body bytes read and "
                              "discarded so a client that sends all first reads it")
    linger_s: float = Field(5.0, ge=0, description="the longest that discarding lasts")
    max_connections: int = Field(1024, ge=8, description="open HTTP connections per worker; "
                                 "beyond it the longest-idle one is closed (503 if none idle)")
    # access control and transport security (docs/SECURITY.md)
    api_keys: SecretStr | None = Field(None, description="inline API keys, name:token,...")
    api_keys_file: Path | None = Field(None, description="API key file (JSON or name:token lines)")
    api_keys_reload_s: float = Field(5.0, gt=0, description="seconds between key file checks")
    metrics_token_file: Path | None = Field(None, description="bearer token for /metrics and "
                                            "the repository API (the admin token)")
    rate_limit_rps: float | None = Field(None, gt=0, description="requests/s per key")
    rate_limit_burst: int | None = Field(None, ge=1, description="token bucket size per key")
    access_log: bool = Field(True, description="JSON access log lines on stderr")
    tracing: bool = Field(False, description="OpenTelemetry spans for the verb requests "
                          "(BentoML's tracing config picks the exporter)")
    tls_certfile: Path | None = Field(None, description="TLS certificate (PEM) for HTTP and gRPC")
    tls_keyfile: Path | None = Field(None, description="TLS private key (PEM) for HTTP and gRPC")

    def placement(self) -> Placement:
        """Where the graphs run (``service.runtime.graphs``)."""
        return Placement(device=self.device, device_id=self.device_id,
                         memory_mb=self.gpu_memory_mb, provider=self.provider)

    def graph_threads(self) -> int:
        """Intra-op threads per graph session: ``threads``, else the CPUs this process may
        run on divided among the workers (at least 1). ONNX Runtime's own default, one
        spinning thread per core in every worker, oversubscribes the cores as soon as there
        are two workers: 2 workers on 2 cores answered 2 400 requests/s with a p99 of up to
        170 ms, against 4 600 and 7 ms at one thread each (nsf, 8 rows, 16 connections)."""
        if self.threads is not None:
            return self.threads
        return max(1, len(os.sched_getaffinity(0)) // self.workers)

    def batch_rows(self, on_cuda: bool) -> int:
        """Rows per adaptive batch: ``max_batch_rows`` when set, else the device's default."""
        if self.max_batch_rows is not None:
            return self.max_batch_rows
        return CUDA_BATCH_ROWS if on_cuda else CPU_BATCH_ROWS

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("set both GENSERVE_TLS_CERTFILE and GENSERVE_TLS_KEYFILE, or neither")
        return self


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Settings from ``GENSERVE_*`` variables; an invalid value is an error naming it."""
    environ = dict(os.environ if environ is None else environ)
    values = {}
    for name in Settings.model_fields:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _parse(name, raw)
    try:
        return Settings.model_validate(values)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = ENV_PREFIX + str(e["loc"][0]).upper() if e["loc"] else "GENSERVE_*"
            problems.append(f"{loc}: {e['msg']}")
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None


def _parse(name: str, raw: str) -> object:
    """Comma-separated lists for list fields; everything else as the string Pydantic reads."""
    if Settings.model_fields[name].annotation == list[str]:
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


class SettingsError(ValueError):
    """A ``GENSERVE_*`` variable holds a value the service cannot use (one line, no secrets)."""
