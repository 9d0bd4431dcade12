"""The BentoML service: ``/sample``, ``/log_likelihood``, ``/anomaly_score``, ``/models``.

Models load in ``__init__`` and follow the models directory while the service runs
(``service.models``: a watcher thread per worker; new versions load, removed ones retire,
defaults swap atomically); each verb is a batchable API whose single, positional-only
argument is the whole flat JSON body; BentoML's adaptive batcher gathers requests with rows as
the unit (``service.batching``), and the batch is run as one graph call per model and
option set (``service.verbs``). Requests are validated by ``service.http.boundary`` before
they can join a batch.
"""

from __future__ import annotations

import gc
import logging
from collections import defaultdict
from typing import Any

import bentoml
from starlette.responses import JSONResponse

from artifact.plugins import load_plugins
from service.auth import security_config
from service.batching import Answers, Parts, error_answer, rows_of
from service.bentoml_glue import (
    bind_api_once,
    cancel_timeout_timers,
    cap_batch_wait,
    register_containers,
    skip_unsized_metric_files,
)
from service.http.boundary import VERB_PATHS, BoundaryMiddleware
from service.http.uvicorn_glue import install as install_connection_guards
from service.metrics import ABANDONED, ANOMALIES, BATCH_REQUESTS, BATCH_ROWS, REQUESTS, ROWS
from service.models import ModelSet, Watcher
from service.repository import RepositoryState, server_state_path
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
from service.validation import RequestError
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
cancel_timeout_timers()
skip_unsized_metric_files()
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
        self.model_set = ModelSet.load(SETTINGS, RepositoryState(server_state_path()))
        self.watcher = Watcher(self.model_set, SETTINGS.models_poll_s).start()
        # What start-up made (modules, schemas, the models) lives as long as the worker:
        # frozen out of the collector's reach, a full collection walks only what requests
        # made since (a 65 ms pause every ~1.5 s under load otherwise: the p99)
        gc.collect()
        gc.freeze()

    def __is_ready__(self) -> bool:
        return bool(self.model_set.cards)

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
        """The served models (also ``GET /models``), each with its versions, and what the
        models directory holds that does not serve, and why."""
        snapshot = self.model_set.snapshot
        return ModelsResponse(models=list(snapshot.cards.values()), failed=snapshot.failed,
                              unloaded=snapshot.unloaded)

    def _serve(self, verb: str, parts: Parts | Any) -> Answers | Any:
        """One batch: group the parts by model version and options, one graph call per group.

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
            if part._served is None:  # came through BentoML's own route: not validated here
                try:
                    part._served = self.model_set.snapshot.resolve(part.model, part.version)
                except RequestError as err:
                    answers[i] = self._fail(verb, "unknown", "unknown", [part], err.status,
                                            err.message)[0]
                    continue
                part.version = part._served.version
            key = tuple(getattr(part, k) for k in GROUP_KEYS[verb])
            groups[(*key, id(part._served))].append(i)
        for idx in groups.values():
            group = [parts[i] for i in idx]
            for i, answer in zip(idx, self._run_group(verb, group), strict=True):
                answers[i] = answer
        return Answers(answers)

    def _run_group(self, verb: str, group: list) -> list[Any]:
        """One group's answers, by the version its requests hold."""
        rt = group[0]._served.runtime
        BATCH_ROWS.labels(model=rt.name, verb=verb).observe(sum(rows_of(p) for p in group))
        transports = "+".join(sorted({p._ticket.transport for p in group}))
        BATCH_REQUESTS.labels(model=rt.name, verb=verb, transports=transports).observe(
            len(group))
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
            version = str(rt.version)
            if isinstance(err, InputError):
                return self._fail(verb, rt.name, version, group, 400, str(err))
            request_id = group[0]._ticket.request_id
            log.exception("model %s version %s failed on /%s (request_id %s)", rt.name,
                          version, verb, request_id)
            REQUESTS.labels(model=rt.name, version=version, verb=verb, status="500").inc()
            return [error_answer(500, "internal error", request_id=request_id)]
        version = str(rt.version)
        REQUESTS.labels(model=rt.name, version=version, verb=verb, status="200").inc(len(group))
        ROWS.labels(model=rt.name, version=version, verb=verb).inc(
            sum(rows_of(p) for p in group))
        if verb == "anomaly_score":
            ANOMALIES.labels(model=rt.name).inc(sum(sum(r.is_anomaly) for r in results))
        return results

    @staticmethod
    def _fail(verb: str, model: str, version: str, group: list, status: int,
              message: str) -> list[Any]:
        REQUESTS.labels(model=model, version=version, verb=verb, status=str(status)).inc(
            len(group))
        return [error_answer(status, message) for _ in group]


GenServe.add_asgi_middleware(BoundaryMiddleware, settings=SETTINGS)
