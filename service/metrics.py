"""genserve's own Prometheus metrics, beside BentoML's built-ins on ``/metrics``.

Created through ``bentoml.metrics`` (a thin proxy over ``prometheus_client``) so that they live
in BentoML's multiprocess registry and add up correctly across workers. Label values are
bounded: model names and versions come only from the models directory (or ``"unknown"``),
verbs and graphs from fixed lists, statuses from HTTP codes.
"""

from __future__ import annotations

import bentoml

__all__ = [
    "ABANDONED",
    "ANOMALIES",
    "BATCH_REQUESTS",
    "BATCH_ROWS",
    "GRAPH_SECONDS",
    "MODELS_LOADED",
    "MODEL_LOADS",
    "MODEL_LOAD_SECONDS",
    "OVERLOAD",
    "REQUESTS",
    "ROWS",
    "SERVED_VERSION",
]

_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_LOAD_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
_TIME_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)

REQUESTS = bentoml.metrics.Counter(
    name="genserve_requests_total",
    documentation="Requests by model, the version that answered, verb and HTTP status",
    labelnames=["model", "version", "verb", "status"],
)
ROWS = bentoml.metrics.Counter(
    name="genserve_rows_total",
    documentation="Rows served (input rows, or samples drawn) by model, version and verb",
    labelnames=["model", "version", "verb"],
)
BATCH_ROWS = bentoml.metrics.Histogram(
    name="genserve_batch_rows",
    documentation="Rows per graph batch after adaptive batching",
    labelnames=["model", "verb"],
    buckets=_ROW_BUCKETS,
)
BATCH_REQUESTS = bentoml.metrics.Histogram(
    name="genserve_batch_requests",
    documentation="Requests (or parts of split ones) sharing one graph batch, by the "
                  "transports they came through (http, grpc, or grpc+http)",
    labelnames=["model", "verb", "transports"],
    buckets=_ROW_BUCKETS,
)
GRAPH_SECONDS = bentoml.metrics.Histogram(
    name="genserve_graph_seconds",
    documentation="Wall time of one graph call",
    labelnames=["model", "graph"],
    buckets=_TIME_BUCKETS,
)
ANOMALIES = bentoml.metrics.Counter(
    name="genserve_anomalies_total",
    documentation="Rows flagged anomalous",
    labelnames=["model"],
)
MODELS_LOADED = bentoml.metrics.Gauge(
    name="genserve_models_loaded",
    documentation="Models loaded by this worker (state=ok) or refused (state=failed)",
    labelnames=["state"],
    multiprocess_mode="livemax",
)
ABANDONED = bentoml.metrics.Counter(
    name="genserve_abandoned_total",
    documentation="Verb requests (or parts of split ones) left out of their batch because "
                  "they had already timed out (504) before it ran",
    labelnames=["model", "verb"],
)
OVERLOAD = bentoml.metrics.Counter(
    name="genserve_overload_rejections_total",
    documentation="Verb requests answered 503 at once because the worker's queue was full",
    labelnames=["verb"],
)
MODEL_LOADS = bentoml.metrics.Counter(
    name="genserve_model_loads",
    documentation="Model versions checked and loaded (result=ok) or refused (result=refused: "
                  "sha256, manifest, graph load or smoke call), by model folder and version, "
                  "in each worker",
    labelnames=["model", "version", "result"],
)
MODEL_LOAD_SECONDS = bentoml.metrics.Histogram(
    name="genserve_model_load_seconds",
    documentation="Time to check and load one model version (sha256, graphs, smoke call)",
    labelnames=["model"],
    buckets=_LOAD_BUCKETS,
)
SERVED_VERSION = bentoml.metrics.Gauge(
    name="genserve_model_version",
    documentation="The version each worker (pid) serves to requests naming none; 0: the "
                  "model no longer serves",
    labelnames=["model"],
    multiprocess_mode="liveall",
)
