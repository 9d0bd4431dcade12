"""genserve's own Prometheus metrics, beside BentoML's built-ins on ``/metrics``.

Created through ``bentoml.metrics`` (a thin proxy over ``prometheus_client``) so that they live
in BentoML's multiprocess registry and add up correctly across workers. Label values are
bounded: model names come only from the loaded set (or ``"unknown"``), verbs and graphs from
fixed lists, statuses from HTTP codes.
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
    "OVERLOAD",
    "REQUESTS",
    "ROWS",
]

_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_TIME_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)

REQUESTS = bentoml.metrics.Counter(
    name="genserve_requests_total",
    documentation="Requests by model, verb and HTTP status",
    labelnames=["model", "verb", "status"],
)
ROWS = bentoml.metrics.Counter(
    name="genserve_rows_total",
    documentation="Rows served (input rows, or samples drawn) by model and verb",
    labelnames=["model", "verb"],
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
