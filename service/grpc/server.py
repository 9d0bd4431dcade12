"""The gRPC edge: the Open Inference Protocol v2 (KServe v2), served in every worker process.

The boundary middleware starts one :class:`GrpcEdge` per BentoML worker, on the worker's own
event loop, once the service instance exists, and stops it (draining calls in flight) when
the worker stops. Every worker binds ``GENSERVE_GRPC_PORT`` with ``SO_REUSEPORT``, so several
workers share the port as they share the HTTP one and a client sees one server.

A call converts its tensors at this edge (``service.grpc.convert``: protobuf to numpy and
back, no JSON) and goes through the worker's data plane (``service.dataplane``) like an HTTP
request: the same token, rate limit, queue bound, validation, batcher (a batch may mix gRPC
and HTTP requests), runtime, metrics and access log. Each served model appears as one OIP
model per verb, ``NAME.sample``, ``NAME.log_likelihood`` and ``NAME.anomaly_score``
(docs/GRPC.md). Answers keep their HTTP meaning in gRPC status codes (400 INVALID_ARGUMENT,
401 UNAUTHENTICATED, 404 NOT_FOUND, 413 and 429 RESOURCE_EXHAUSTED, 503 UNAVAILABLE, 504
DEADLINE_EXCEEDED) with the same message as details; a retry hint travels as trailing
metadata ``retry-after``. A call whose deadline passes while it is queued is left out of its
batch. Also served: grpc.health.v1 (SERVING while models are loaded; NOT_SERVING from the
worker's SIGTERM on, before the drain), server reflection and the repository extension
(``RepositoryIndex``; ``RepositoryModelLoad``/``Unload`` behind the admin token, as HTTP's
``POST /models/{name}/load``/``unload``). ``model_version`` pins a version of the model
(``ModelReady``, ``ModelMetadata``, ``ModelInfer``); every answer names the version that
answered. With TLS (``GENSERVE_TLS_*``) the port speaks TLS, and
``GENSERVE_GRPC_HEALTH_PORT`` serves grpc.health.v1 alone in plaintext for the kubelet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from pydantic import ValidationError

from artifact import genserve_version
from service.access_log import rows_in
from service.dataplane import DataPlane
from service.grpc import grpc_predict_v2_pb2 as pb
from service.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from service.grpc.convert import (
    OipError,
    encode_outputs,
    request_fields,
    response_tensors,
    signature,
    split_name,
)
from service.grpc.decode import DecodeErrorInterceptor
from service.schemas import VERBS, ModelInfo, RepositoryAnswer, RepositoryRequest
from service.settings import Settings
from service.validation import RequestError, card_for, pydantic_message

__all__ = ["HTTP_CODES", "TOKEN_REQUIRED", "GrpcEdge", "InferenceServicer"]

log = logging.getLogger("genserve.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
Code = grpc.StatusCode
HTTP_CODES = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED,
              403: Code.PERMISSION_DENIED, 404: Code.NOT_FOUND, 405: Code.UNIMPLEMENTED,
              408: Code.DEADLINE_EXCEEDED, 413: Code.RESOURCE_EXHAUSTED,
              415: Code.INVALID_ARGUMENT, 422: Code.INVALID_ARGUMENT,
              429: Code.RESOURCE_EXHAUSTED, 500: Code.INTERNAL, 502: Code.UNAVAILABLE,
              503: Code.UNAVAILABLE, 504: Code.DEADLINE_EXCEEDED}
MAX_MESSAGE_BYTES = 64 << 20
TOKEN_REQUIRED = ("a valid API token is required: send the metadata "
                  "'authorization: Bearer <token>'")
# what RepositoryModelLoad/Unload read from ``parameters`` (tritonclient sends ``config``, a
# JSON string, and ``unload_dependents``, which does not apply: genserve models have none)
REPOSITORY_PARAMETERS = ("version", "config", "unload_dependents")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class CallError(OipError):
    """A data-plane answer as a gRPC status, with trailing metadata (``retry-after``)."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(code, message)
        self.trailers = trailers


def _status(status: int, message: str, headers: list[tuple[bytes, bytes]]) -> CallError:
    if status == 401:  # the token travels as metadata here, not as a header
        message = TOKEN_REQUIRED
    code = HTTP_CODES.get(status, Code.INVALID_ARGUMENT if status < 500 else Code.INTERNAL)
    retry = [v.decode() for k, v in headers if k.lower() == b"retry-after"]
    return CallError(code, message, (("retry-after", retry[0][:64]),) if retry else ())


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over one worker's data plane."""

    def __init__(self, plane: DataPlane, settings: Settings) -> None:
        self.plane = plane
        self.settings = settings

    def _resolve(self, name: str, version: str) -> tuple[str, str, ModelInfo]:
        """``(model, verb, card)`` of an OIP model name at ``version`` (empty: the model's
        default), or NOT_FOUND naming the served models, or the model's versions."""
        cards = self.plane.cards
        parts = split_name(name)
        if parts is not None and parts[0] in cards:
            try:
                card = card_for(cards, parts[0], _version(version))
            except RequestError as err:
                raise OipError(Code.NOT_FOUND, err.message) from None
            if parts[1] == "anomaly_score" and not card.calibrated:
                raise OipError(Code.NOT_FOUND, f"model '{parts[0]}' version {card.version} "
                               "has no anomaly calibration, so it has no anomaly_score; "
                               "re-export it")
            return parts[0], parts[1], card
        served = ", ".join(_oip_names(cards)) or "(none loaded)"
        hint = (f"model '{name}' is served as one OIP model per verb, NAME.VERB; "
                if name in cards else f"unknown model {name[:64]!r}; ")
        raise OipError(Code.NOT_FOUND, f"{hint}served models: {served}")

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.plane.ready)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        try:
            self._resolve(request.name, request.version)
        except OipError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.plane.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="genserve", version=genserve_version(),
                                         extensions=["parameters", "model_repository"])

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        try:
            _, verb, card = self._resolve(request.name, request.version)
        except OipError as err:
            return await _abort(context, err)  # type: ignore[return-value]
        inputs, outputs = signature(verb, card)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=[str(v) for v in card.ready_versions()],
            platform=f"genserve_{card.family}",
            inputs=[meta(name=n, datatype=d, shape=s) for n, d, s in inputs],
            outputs=[meta(name=n, datatype=d, shape=s) for n, d, s in outputs])

    async def RepositoryIndex(self, request: Any, context: Any) -> pb.RepositoryIndexResponse:
        """Every version of every OIP model (``NAME.VERB``) with its state: ``READY``, or
        ``UNAVAILABLE`` with the reason (refused by its checks, or unloaded); ``ready`` filters
        to ready ones. A version that does not serve is listed under each verb its model
        serves (all three when none of its versions serves)."""
        snapshot = self.plane.snapshot
        index = pb.RepositoryIndexResponse.ModelIndex
        models = []
        for folder, (_, infos) in sorted(snapshot.folders.items()):
            served = {v: each for (_, v), each in snapshot.served.items()
                      if each.folder == folder}
            name = next(iter(served.values())).name if served else folder
            card = snapshot.cards.get(name)
            for info in infos:
                ready = info.version in served
                if request.ready and not ready:
                    continue
                shown = card.for_version(info.version) if ready and card else card
                verbs = [v for v in VERBS if shown is None or v != "anomaly_score"
                         or shown.calibrated]
                models += [index(name=f"{name}.{verb}", version=str(info.version),
                                 state="READY" if ready else "UNAVAILABLE",
                                 reason=info.reason or "") for verb in verbs]
        return pb.RepositoryIndexResponse(models=models)

    async def RepositoryModelLoad(self, request: Any, context: Any
                                  ) -> pb.RepositoryModelLoadResponse:
        """Serve a model folder (``parameters``: ``version``, or tritonclient's ``config``
        ``{"version": N}``) again, checked now; as ``POST /models/{name}/load``."""
        await self._repository("load", request, context)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: Any, context: Any
                                    ) -> pb.RepositoryModelUnloadResponse:
        """Stop serving a model folder (or one ``version``) in every worker; calls already
        holding it finish on it. As ``POST /models/{name}/unload``."""
        await self._repository("unload", request, context)
        return pb.RepositoryModelUnloadResponse()

    async def _repository(self, action: str, request: Any, context: Any
                          ) -> RepositoryAnswer | None:
        """The admin token, the call's model folder and version, then the model set's
        answer; an error aborts the call with the HTTP route's words."""
        try:
            header = dict(context.invocation_metadata() or ()).get("authorization")
            self.plane.authorize_admin(header)
            parts = split_name(request.model_name)  # NAME.VERB names its model folder too
            folder = parts[0] if parts else request.model_name
            version = _repository_version(request.parameters)
            answer = await self.plane.repository(action, folder, version)
        except RequestError as err:
            return await _abort(context, _status(err.status, err.message,  # type: ignore
                                                 getattr(err, "headers", [])))
        log.info("repository: %s %r%s over gRPC: now serving version %s", action,
                 folder[:64], "" if version is None else f" version {version}",
                 answer.version)
        return answer

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        started = time.perf_counter()
        parts = split_name(request.model_name)
        verb = parts[1] if parts else "unknown"
        seen: dict[str, Any] = {"key": None, "model": "unknown", "version": None,
                                "rows": None, "status": "OK"}
        admitted = False
        try:
            header = dict(context.invocation_metadata() or ()).get("authorization")
            key = self.plane.authenticate(header)
            seen["key"] = key.name if key else None
            self.plane.limit(key)
            model, verb, card = self._resolve(request.model_name, request.model_version)
            seen["model"] = model
            self.plane.admit(verb)
            admitted = True
            fields, raw = request_fields(model, verb, card, request, self.settings.max_rows)
            if request.model_version:
                fields["version"] = card.version
            seen["rows"] = rows_in(verb, fields)
            call = self.plane.validate(verb, fields)
            seen["version"] = call.version
            call._ticket.transport = "grpc"
            outcome = await self._infer(verb, call, context)
            if outcome.answer is None:
                error = outcome.error
                message = error["error"] if "request_id" not in error else \
                    f"{error['error']} (request_id {error['request_id']})"
                raise _status(outcome.status, message,
                              self.plane.hinted(outcome.status, outcome.headers))
            tensors, params = response_tensors(verb, outcome.answer)
            resp = pb.ModelInferResponse(model_name=request.model_name,
                                         model_version=str(outcome.answer.version),
                                         id=request.id)
            encode_outputs(resp, tensors, params, [o.name for o in request.outputs], raw)
        except RequestError as err:
            self.plane.refused(verb, err)
            failure = _status(err.status, err.message, getattr(err, "headers", []))
            seen["status"] = failure.code.name
            return await _abort(context, failure)  # type: ignore[return-value]
        except OipError as err:
            seen["status"] = err.code.name
            return await _abort(context, err)  # type: ignore[return-value]
        except Exception:  # the catch-all: the traceback stays in the server log
            request_id = secrets.token_hex(8)
            log.exception("internal error on %s (request_id %s)", request.model_name[:64],
                          request_id)
            seen["status"] = Code.INTERNAL.name
            return await _abort(  # type: ignore[return-value]
                context, OipError(Code.INTERNAL, f"internal error (request_id {request_id})"))
        finally:
            if admitted:
                self.plane.release()
            self.plane.record(protocol="grpc", verb=verb, key=seen["key"], model=seen["model"],
                              version=seen["version"], rows=seen["rows"],
                              status=seen["status"], started=started)
        return resp

    async def _infer(self, verb: str, call: Any, context: Any) -> Any:
        """The data plane's answer, within the call's deadline (and the request timeout): a
        call still queued when it passes is left out of its batch."""
        remaining = context.time_remaining()
        timeout = self.settings.timeout_s if remaining is None else min(
            remaining, self.settings.timeout_s)
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                return await self.plane.infer(verb, call)
        except TimeoutError:
            call._ticket.abandoned = True
            raise OipError(Code.DEADLINE_EXCEEDED, f"/{verb} did not answer within "
                           f"{timeout:.1f} s") from None


async def _abort(context: grpc.aio.ServicerContext, err: OipError) -> None:
    await context.abort(err.code, err.message, getattr(err, "trailers", ()))


def _version(text: str) -> int | None:
    """A call's ``model_version`` (empty: the model's default), or NOT_FOUND."""
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 9 or int(text) < 1:
        raise OipError(Code.NOT_FOUND, f"model_version {text[:16]!r} is not a version: "
                       "versions are integers from 1 (empty: the model's default)")
    return int(text)


def _repository_version(parameters: Any) -> int | None:
    """The ``version`` of a repository call's parameters (an int64 or string ``version``, or
    the JSON ``config`` tritonclient sends), or RequestError 400."""
    unknown = sorted(k for k in parameters if k not in REPOSITORY_PARAMETERS)
    if unknown:
        raise RequestError(400, f"unknown repository parameter {unknown[0][:32]!r}; "
                           f"allowed: {', '.join(REPOSITORY_PARAMETERS)}")
    fields: dict[str, Any] = {}
    if "config" in parameters:
        config = parameters["config"].string_param
        if config.strip():
            try:
                fields = json.loads(config)
            except ValueError:
                raise RequestError(400, "parameter 'config' is not JSON; send "
                                   '{"version": N} or nothing') from None
            if not isinstance(fields, dict):
                raise RequestError(400, "parameter 'config' must be a JSON object; send "
                                   '{"version": N} or nothing')
    if "version" in parameters:
        p = parameters["version"]
        fields["version"] = p.string_param if p.WhichOneof("parameter_choice") == \
            "string_param" else p.int64_param
    try:
        return RepositoryRequest.model_validate(fields).version
    except ValidationError as err:
        raise RequestError(400, pydantic_message(err)) from None


def _oip_names(cards: dict[str, ModelInfo]) -> list[str]:
    return [f"{name}.{verb}" for name, card in sorted(cards.items()) for verb in VERBS
            if verb != "anomaly_score" or card.calibrated]


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    # The OIP descriptors live in a private pool (so tritonclient's own `inference.*` stubs can
    # be imported in the same process); reflection gets a pool holding every served service.
    pool = descriptor_pool.DescriptorPool()
    for desc in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        pool.AddSerializedFile(desc.serialized_pb)
    return pool


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_certfile is None or settings.tls_keyfile is None:
        return None
    pair = (settings.tls_keyfile.read_bytes(), settings.tls_certfile.read_bytes())
    return grpc.ssl_server_credentials([pair])


def _listen(server: grpc.aio.Server, host: str, port: int,
            credentials: grpc.ServerCredentials | None = None) -> int:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = (server.add_secure_port(address, credentials) if credentials
             else server.add_insecure_port(address))
    if not bound:
        raise RuntimeError(f"gRPC cannot listen on {address} (port in use?)")
    return bound


class GrpcEdge:
    """The gRPC servers of one worker (the OIP port, and the plaintext health port when set),
    on the worker's event loop."""

    def __init__(self, servers: list[grpc.aio.Server], health_servicer: Any, port: int,
                 grace_s: float) -> None:
        self.servers, self.health, self.port, self.grace_s = servers, health_servicer, port, \
            grace_s
        self._previous: Any = None

    @classmethod
    async def start(cls, plane: DataPlane, settings: Settings) -> GrpcEdge:
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.so_reuseport", 1)]  # the workers share the port
        server = grpc.aio.server(options=options, interceptors=[DecodeErrorInterceptor()])
        health_servicer = health.aio.HealthServicer()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(plane, settings), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server, pool=_reflection_pool())
        tls = _credentials(settings)
        port = _listen(server, settings.grpc_host, settings.grpc_port, tls)
        servers = [server]
        if settings.grpc_health_port is not None:  # plaintext, grpc.health.v1 only
            probe = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probe)
            _listen(probe, settings.grpc_host, settings.grpc_health_port)
            servers.append(probe)
        for each in servers:
            await each.start()
        edge = cls(servers, health_servicer, port, settings.grpc_grace_s)
        await edge.set_serving(plane.ready)
        edge._on_sigterm(asyncio.get_running_loop())
        log.info("gRPC (Open Inference Protocol v2) on %s:%d (%s, API keys %s)",
                 settings.grpc_host, port, "TLS" if tls else "plaintext",
                 "required" if plane.keys.enabled else "off")
        return edge

    async def set_serving(self, serving: bool) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, SERVING if serving else NOT_SERVING)

    def _on_sigterm(self, loop: asyncio.AbstractEventLoop) -> None:
        """Health says NOT_SERVING as soon as the worker is told to stop, before it drains;
        the worker's own handler (uvicorn's) then runs as before."""
        previous: Callable[..., Any] | int | None = signal.getsignal(signal.SIGTERM)

        def flip(signum: int, frame: Any) -> None:
            loop.call_soon_threadsafe(
                lambda: asyncio.ensure_future(self.health.enter_graceful_shutdown()))
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, flip)
        self._previous = previous

    async def stop(self) -> None:
        """NOT_SERVING, then stop accepting calls and finish those in flight (``grace_s``)."""
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(*(each.stop(self.grace_s) for each in self.servers))
