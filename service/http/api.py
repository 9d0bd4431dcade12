"""The BentoML service: ``/sample``, ``/log_likelihood``, ``/anomaly_score``, ``/models``.

Models load once in ``__init__``; each verb is a batchable API whose single, positional-only
argument is the whole flat JSON body; BentoML's adaptive batcher gathers requests with rows as
the unit (``service.batching``), and the batch is run as one graph call per model and
option set (``service.verbs``). Requests are validated by ``service.http.boundary`` before
they can join a batch.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import bentoml
from starlette.responses import JSONResponse

from artifact.plugins import load_plugins
from service.auth import security_config
from service.batching import Answers, Parts, error_answer, rows_of
from service.bentoml_glue import bind_api_once, cap_batch_wait, register_containers
from service.http.boundary import VERB_PATHS, BoundaryMiddleware
from service.http.uvicorn_glue import install as install_connection_guards
from service.metrics import (
    ABANDONED,
    ANOMALIES,
    BATCH_REQUESTS,
    BATCH_ROWS,
    GRAPH_SECONDS,
    MODELS_LOADED,
    REQUESTS,
    ROWS,
)
from service.models import ModelSet
from service.runtime import InputError
from service.runtime.graphs import serves_on_cuda
from service.schemas import (
    AnomalyScoreRequest,
    AnomalyScoreResponse,
    LogLikelihoodRequest,
    LogLikelihoodResponse,
    ModelsResponse,
    SampleRequest,
    SampleResponse,
)
from service.settings import SettingsError, load_settings
from service.verbs import GROUP_KEYS, RUNNERS

__all__ = ["GenServe"]

log = logging.getLogger("genserve")
# BentoML leaves the root logger at WARNING: without this, models loaded, key reloads and the
# request path chosen at the first verb request never reach the server log.
log.setLevel(logging.INFO)
try:
    SETTINGS = load_settings()
    load_plugins(SETTINGS.plugins)
except (SettingsError, ImportError) as err:  # one line at start-up, not a traceback
    raise SystemExit(f"genserve: {err}") from None
register_containers((SampleRequest, LogLikelihoodRequest, AnomalyScoreRequest),
                    (SampleResponse, LogLikelihoodResponse, AnomalyScoreResponse, JSONResponse))
cap_batch_wait(SETTINGS.max_batch_wait_ms / 1000)
bind_api_once()
install_connection_guards(SETTINGS)  # header deadline and size, connection bound (uvicorn)


def _batching() -> dict[str, Any]:
    if not SETTINGS.batching:
        return {}
    on_cuda = serves_on_cuda(SETTINGS.placement(), SETTINGS.runtime)
    return {"batchable": True, "max_batch_size": SETTINGS.batch_rows(on_cuda),
            "max_latency_ms": SETTINGS.max_latency_ms}


def _traffic() -> dict[str, Any]:
    traffic: dict[str, Any] = {"timeout": SETTINGS.timeout_s}
    if SETTINGS.max_concurrency:
        traffic["max_concurrency"] = SETTINGS.max_concurrency
    return traffic


def _observability() -> dict[str, Any]:
    """BentoML's own access log is off: ``genserve.access`` is the access log, and a second
    line per request cost about a third of the server's time per request. Tracing spans of
    the verbs are opt-in (``GENSERVE_TRACING``): with no exporter they are pure overhead."""
    config: dict[str, Any] = {"logging": {"access": {"enabled": False}}}
    if not SETTINGS.tracing:
        config["tracing"] = {"excluded_urls": list(VERB_PATHS)}
    return config


@bentoml.service(name="genserve", workers=SETTINGS.workers, traffic=_traffic(),
                  **_observability(), **security_config(SETTINGS))
class GenServe:
    """Every model of ``GENSERVE_MODELS_DIR`` behind three verbs."""

    def __init__(self) -> None:
        self.model_set = ModelSet.load(SETTINGS)
        for name, rt in self.model_set.runtimes.items():
            rt.observer = _graph_observer(name)
        MODELS_LOADED.labels(state="ok").set(len(self.model_set.runtimes))
        MODELS_LOADED.labels(state="failed").set(len(self.model_set.failed))

    def __is_ready__(self) -> bool:
        return bool(self.model_set.runtimes)

    @bentoml.api(route="/sample", **_batching())
    def sample(self, request: SampleRequest, /) -> SampleResponse:
        """Draw ``n`` samples (seeded) from a model, in the data's units."""
        return self._serve("sample", request)  # type: ignore[arg-type,return-value]

    @bentoml.api(route="/log_likelihood", **_batching())
    def log_likelihood(self, request: LogLikelihoodRequest, /) -> LogLikelihoodResponse:
        """log p(x) per row in nats (and bits/dim): exact for flows, PF-ODE otherwise."""
        return self._serve("log_likelihood", request)  # type: ignore[arg-type,return-value]

    @bentoml.api(route="/anomaly_score", **_batching())
    def anomaly_score(self, request: AnomalyScoreRequest, /) -> AnomalyScoreResponse:
        """NLL scores, percentiles among normal data and flags at the calibrated threshold."""
        return self._serve("anomaly_score", request)  # type: ignore[arg-type,return-value]

    @bentoml.api(route="/models")
    async def list_models(self) -> ModelsResponse:
        """The served models (also ``GET /models``) and the folders refused at start."""
        return ModelsResponse(models=self.model_set.info(), failed=self.model_set.failed)

    def _serve(self, verb: str, parts: Parts | Any) -> Answers | Any:
        """One batch: group the parts by model and options, one graph call per group.

        With batching off (``GENSERVE_BATCHING=0``) BentoML hands over one request and
        expects one answer.
        """
        if not isinstance(parts, Parts):
            return self._serve(verb, Parts([parts]))[0]
        groups: dict[tuple, list[int]] = defaultdict(list)
        answers: list[Any] = [None] * len(parts)
        for i, part in enumerate(parts):
            if part._ticket.abandoned:  # timed out while queued: no one reads this answer
                ABANDONED.labels(model=part.model, verb=verb).inc()
                answers[i] = error_answer(504, "the request timed out before its batch ran")
                continue
            groups[tuple(getattr(part, k) for k in GROUP_KEYS[verb])].append(i)
        for idx in groups.values():
            group = [parts[i] for i in idx]
            for i, answer in zip(idx, self._run_group(verb, group), strict=True):
                answers[i] = answer
        return Answers(answers)

    def _run_group(self, verb: str, group: list) -> list[Any]:
        name = group[0].model
        rt = self.model_set.runtimes.get(name)
        if rt is None:
            return self._fail(verb, "unknown", group, 404, f"model {name[:64]!r} is not loaded")
        BATCH_ROWS.labels(model=name, verb=verb).observe(sum(rows_of(p) for p in group))
        transports = "+".join(sorted({p._ticket.transport for p in group}))
        BATCH_REQUESTS.labels(model=name, verb=verb, transports=transports).observe(len(group))
        return self._answer(verb, rt, group)

    def _answer(self, verb: str, rt: Any, group: list) -> list[Any]:
        """One graph call for the group; if it raises, each request runs alone, so a
        request that cannot be served fails by itself and the others are answered."""
        try:
            results = RUNNERS[verb](rt, group)
        except Exception as err:
            if len(group) > 1:
                log.warning("model %s failed on a batch of %d /%s requests (%s); each runs "
                            "alone", rt.name, len(group), verb, type(err).__name__)
                return [answer for part in group for answer in self._answer(verb, rt, [part])]
            if isinstance(err, InputError):
                return self._fail(verb, rt.name, group, 400, str(err))
            request_id = group[0]._ticket.request_id
            log.exception("model %s failed on /%s (request_id %s)", rt.name, verb, request_id)
            REQUESTS.labels(model=rt.name, verb=verb, status="500").inc()
            return [error_answer(500, "internal error", request_id=request_id)]
        REQUESTS.labels(model=rt.name, verb=verb, status="200").inc(len(group))
        ROWS.labels(model=rt.name, verb=verb).inc(sum(rows_of(p) for p in group))
        if verb == "anomaly_score":
            ANOMALIES.labels(model=rt.name).inc(sum(sum(r.is_anomaly) for r in results))
        return results

    @staticmethod
    def _fail(verb: str, model: str, group: list, status: int, message: str) -> list[Any]:
        REQUESTS.labels(model=model, verb=verb, status=str(status)).inc(len(group))
        return [error_answer(status, message) for _ in group]


def _graph_observer(model: str) -> Any:
    def observe(graph: str, seconds: float) -> None:
        GRAPH_SECONDS.labels(model=model, graph=graph).observe(seconds)

    return observe


GenServe.add_asgi_middleware(BoundaryMiddleware, settings=SETTINGS)
