"""gRPC side of genserve: the Open Inference Protocol v2 (KServe v2) over grpcio asyncio.

    python -m service.grpc.server --host 127.0.0.1 --port 8001 --http-url http://127.0.0.1:3000

BentoML's service API has no gRPC, so this is its own process. It translates each OIP call
into the service's HTTP JSON verbs on loopback, and so reaches the very same batched model
workers: batching, limits, metrics and calibration exist once, on the HTTP side. Each served
model appears as one OIP model per verb, ``NAME.sample``, ``NAME.log_likelihood`` and
``NAME.anomaly_score`` (docs/GRPC.md). Tensors are checked here before they are forwarded;
the HTTP side's answers map to gRPC status codes (400 INVALID_ARGUMENT, 404 NOT_FOUND, 413 and
429 RESOURCE_EXHAUSTED, 503 or unreachable UNAVAILABLE) with the HTTP message as details;
an HTTP ``Retry-After`` travels on as trailing metadata ``retry-after``.
Also served: grpc.health.v1 (SERVING while the HTTP side's /readyz answers 200) and server
reflection.

Access control (docs/SECURITY.md): with API keys configured (the same ``GENSERVE_API_KEYS*``
settings as the HTTP side) ``ModelInfer`` needs metadata ``authorization: Bearer <token>``;
a missing or wrong token is answered UNAUTHENTICATED here, without forwarding. A valid one is
forwarded, and the HTTP side applies the key's rate limit, so each call counts once. With
``GENSERVE_TLS_CERTFILE``/``KEYFILE`` the port speaks TLS; ``--health-port`` then serves
grpc.health.v1 alone in plaintext for the kubelet, whose gRPC probes cannot speak TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2
from pydantic import ValidationError

from artifact import genserve_version
from service.access_log import access_logger, log_access, rows_in
from service.auth import KeyFileError, KeyStore
from service.grpc import grpc_predict_v2_pb2 as pb
from service.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from service.grpc.convert import (
    VERBS,
    OipError,
    encode_outputs,
    request_body,
    response_tensors,
    signature,
    split_name,
)
from service.grpc.decode import DecodeErrorInterceptor
from service.settings import Settings, load_settings

__all__ = ["InferenceServicer", "Reply", "Upstream", "UpstreamError", "main", "serve"]

log = logging.getLogger("genserve.grpc")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
DEFAULT_PORT = 8001
DEFAULT_HTTP_URL = "http://127.0.0.1:3000"
VERSION = "1"  # every OIP model has one version
MODELS_TTL_S = 5.0
Code = grpc.StatusCode
HTTP_CODES = {400: Code.INVALID_ARGUMENT, 401: Code.UNAUTHENTICATED,
              403: Code.PERMISSION_DENIED, 404: Code.NOT_FOUND, 405: Code.UNIMPLEMENTED,
              408: Code.DEADLINE_EXCEEDED, 413: Code.RESOURCE_EXHAUSTED,
              431: Code.RESOURCE_EXHAUSTED,
              415: Code.INVALID_ARGUMENT, 422: Code.INVALID_ARGUMENT,
              429: Code.RESOURCE_EXHAUSTED, 500: Code.INTERNAL, 502: Code.UNAVAILABLE,
              503: Code.UNAVAILABLE, 504: Code.DEADLINE_EXCEEDED}
MAX_MESSAGE_BYTES = 64 << 20
TOKEN_REQUIRED = ("a valid API token is required: send the metadata "
                  "'authorization: Bearer <token>'")


class UpstreamError(OipError):
    """An HTTP answer mapped to a gRPC status, with trailing metadata (``retry-after``)."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(code, message)
        self.trailers = trailers


def pinned_context(certfile: Path) -> ssl.SSLContext:
    """Trust exactly the certificate the HTTP side serves (loopback: no host name check)."""
    context = ssl.create_default_context(cafile=str(certfile))
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a CA-issued leaf pins too
    return context


class Reply:
    """An HTTP answer read in full: status, headers (names lower-cased) and body."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, content: bytes = b"",
                 headers: Mapping[str, str] | None = None) -> None:
        self.status_code = status_code
        self.content = content
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}

    def json(self) -> Any:
        return json.loads(self.content)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class Upstream:
    """The HTTP side on loopback: a pooled client, the model list (cached) and readiness.

    ``verify``: for an https URL, an SSL context, a CA bundle path, ``True`` (the system's
    trust store) or ``False`` (no verification).

    The client is aiohttp's. httpx's (httpcore's pool) checks every pooled connection on every
    request: at 64 calls in flight it cost this process 9.3 ms of CPU per call against
    aiohttp's 2.8 (``python -m bench.grpc_ab``, docs/BENCHMARKS.md).
    """

    def __init__(self, url: str, timeout_s: float = 120.0,
                 verify: ssl.SSLContext | str | bool = True) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        if isinstance(verify, str):
            verify = ssl.create_default_context(cafile=verify)
        self._ssl: ssl.SSLContext | bool | None = None if verify is True else verify
        self._session: aiohttp.ClientSession | None = None
        self._models: dict[str, dict] | None = None
        self._models_at = 0.0
        self._lock = asyncio.Lock()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:  # made on the running loop, at first use
            connector = aiohttp.TCPConnector(limit=128, limit_per_host=128, ssl=self._ssl,
                                             keepalive_timeout=30.0)
            self._session = aiohttp.ClientSession(self.url, connector=connector,
                                                  trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _unreachable(self, err: Exception) -> OipError:
        return OipError(Code.UNAVAILABLE, f"the genserve HTTP service at {self.url} is not "
                        f"reachable ({type(err).__name__}); is it running and ready?")

    async def _request(self, method: str, path: str, timeout_s: float,
                       body: bytes | None = None, headers: dict[str, str] | None = None,
                       ) -> Reply:
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5.0)
        async with self.session.request(method, path, data=body, headers=headers,
                                        timeout=timeout, allow_redirects=False) as resp:
            return Reply(resp.status, await resp.read(), resp.headers)

    async def ready(self) -> bool:
        try:
            return (await self._request("GET", "/readyz", 2.0)).status_code == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def models(self, refresh: bool = False) -> dict[str, dict]:
        """``{name: model info}`` from GET /models, cached for a few seconds."""
        async with self._lock:
            fresh = time.monotonic() - self._models_at < (0.5 if refresh else MODELS_TTL_S)
            if self._models is None or not fresh:
                try:
                    resp = await self._request("GET", "/models", 10.0)
                except (aiohttp.ClientError, TimeoutError) as err:
                    raise self._unreachable(err) from None
                if resp.status_code != 200:
                    raise _http_error(resp)
                self._models = {m["name"]: m for m in resp.json()["models"]}
                self._models_at = time.monotonic()
            return self._models

    async def call(self, verb: str, body: dict, timeout_s: float | None,
                   authorization: str | None = None) -> dict:
        """POST the verb; its JSON answer, or OipError carrying the mapped status."""
        timeout = self.timeout_s if timeout_s is None else max(0.001, timeout_s)
        headers = {"content-type": "application/json"}
        if authorization is not None:
            headers["authorization"] = authorization
        try:
            resp = await self._request("POST", f"/{verb}", timeout, json.dumps(body).encode(),
                                       headers)
        except TimeoutError:
            raise OipError(Code.DEADLINE_EXCEEDED, f"/{verb} did not answer within "
                           f"{timeout:.1f} s") from None
        except aiohttp.ClientError as err:
            raise self._unreachable(err) from None
        if resp.status_code != 200:
            if resp.status_code == 404:
                self._models_at = 0.0  # the model set may have changed
            raise _http_error(resp)
        return resp.json()


def _http_error(resp: Reply) -> UpstreamError:
    try:
        message = str(resp.json()["error"])
    except (ValueError, KeyError, TypeError):
        message = resp.text.strip()[:500] or f"HTTP {resp.status_code}"
    code = HTTP_CODES.get(resp.status_code,
                          Code.INVALID_ARGUMENT if resp.status_code < 500 else Code.INTERNAL)
    retry_after = resp.headers.get("retry-after", "").strip()
    trailers = (("retry-after", retry_after[:64]),) if retry_after else ()
    return UpstreamError(code, message, trailers)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over the HTTP side.

    ``keys``: the API keys ``ModelInfer`` asks for (None, or a disabled store: open).
    ``max_rows``: ``x`` with more rows is refused here, before it is decoded.
    """

    def __init__(self, upstream: Upstream, health_servicer: Any = None,
                 keys: KeyStore | None = None, access: Any = None,
                 max_rows: int | None = None) -> None:
        self.up = upstream
        self.health = health_servicer
        self.keys = keys
        self.access = access if access is not None else access_logger(False)
        self.max_rows = max_rows

    async def _abort(self, context: grpc.aio.ServicerContext, err: OipError) -> None:
        await context.abort(err.code, err.message, getattr(err, "trailers", ()))

    def _authenticate(self, context: Any) -> tuple[str | None, str | None]:
        """``(key name, authorization value to forward)``; UNAUTHENTICATED if required."""
        header = dict(context.invocation_metadata() or ()).get("authorization")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if self.keys is None or not self.keys.enabled:
            return None, header
        key = self.keys.authenticate(header)
        if key is None:
            raise OipError(Code.UNAUTHENTICATED, TOKEN_REQUIRED)
        return key.name, header

    async def set_health(self, ready: bool) -> None:
        if self.health is None:
            return
        status = (health_pb2.HealthCheckResponse.SERVING if ready
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _resolve(self, name: str, version: str) -> tuple[str, str, dict]:
        """``(model, verb, info)`` of an OIP model name, or NOT_FOUND naming the served ones."""
        models = await self.up.models()
        parts = split_name(name)
        if parts is None or parts[0] not in models:
            models = await self.up.models(refresh=True)
        if parts is not None and parts[0] in models:
            info = models[parts[0]]
            if parts[1] == "anomaly_score" and not info.get("calibration"):
                raise OipError(Code.NOT_FOUND, f"model '{parts[0]}' has no anomaly "
                               "calibration, so it has no anomaly_score; re-export it")
            if version not in ("", VERSION):
                raise OipError(Code.NOT_FOUND, f"model '{name}' has no version "
                               f"{version[:16]!r}; its only version is {VERSION!r}")
            return parts[0], parts[1], info
        served = ", ".join(_oip_names(models)) or "(none loaded)"
        hint = (f"model '{name}' is served as one OIP model per verb, NAME.VERB; "
                if name in models else f"unknown model {name[:64]!r}; ")
        raise OipError(Code.NOT_FOUND, f"{hint}served models: {served}")

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        ready = await self.up.ready()
        await self.set_health(ready)
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        try:
            await self._resolve(request.name, request.version)
        except OipError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=await self.up.ready())

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="genserve", version=genserve_version(),
                                         extensions=["parameters"])

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        try:
            model, verb, info = await self._resolve(request.name, request.version)
        except OipError as err:
            return await self._abort(context, err)  # type: ignore[return-value]
        inputs, outputs = signature(verb, info)
        meta = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=[VERSION], platform=f"genserve_{info['family']}",
            inputs=[meta(name=n, datatype=d, shape=s) for n, d, s in inputs],
            outputs=[meta(name=n, datatype=d, shape=s) for n, d, s in outputs])

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:
        started = time.perf_counter()
        parts = split_name(request.model_name)
        seen: dict[str, Any] = {"key": None, "model": "unknown", "rows": None, "status": "OK"}
        try:
            seen["key"], authorization = self._authenticate(context)
            model, verb, info = await self._resolve(request.model_name, request.model_version)
            seen["model"] = model
            body, raw = request_body(model, verb, info, request, self.max_rows)
            seen["rows"] = rows_in(verb, body)
            answer = await self.up.call(verb, body, context.time_remaining(), authorization)
            tensors, params = response_tensors(verb, answer)
            resp = pb.ModelInferResponse(model_name=request.model_name, model_version=VERSION,
                                         id=request.id)
            encode_outputs(resp, tensors, params, [o.name for o in request.outputs], raw)
        except OipError as err:
            seen["status"] = err.code.name
            return await self._abort(context, err)  # type: ignore[return-value]
        finally:
            log_access(self.access, protocol="grpc", key=seen["key"],
                       verb=parts[1] if parts else "unknown", model=seen["model"],
                       rows=seen["rows"], status=seen["status"],
                       latency_s=time.perf_counter() - started)
        return resp


def _oip_names(models: dict[str, dict]) -> list[str]:
    return [f"{name}.{verb}" for name, info in sorted(models.items()) for verb in VERBS
            if verb != "anomaly_score" or info.get("calibration")]


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    # The OIP descriptors live in a private pool (so tritonclient's own `inference.*` stubs can
    # be imported in the same process); reflection gets a pool holding every served service.
    pool = descriptor_pool.DescriptorPool()
    for desc in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        pool.AddSerializedFile(desc.serialized_pb)
    return pool


async def _watch_ready(servicer: InferenceServicer, period_s: float) -> None:
    while True:
        await servicer.set_health(await servicer.up.ready())
        await asyncio.sleep(period_s)


def _listen(server: grpc.aio.Server, host: str, port: int,
            credentials: grpc.ServerCredentials | None = None) -> int:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = (server.add_secure_port(address, credentials) if credentials
                 else server.add_insecure_port(address))
    except RuntimeError as err:
        raise SystemExit(f"genserve grpc: cannot listen on {address}: {err}") from None
    if not bound:
        raise SystemExit(f"genserve grpc: cannot listen on {address} (port in use?)")
    return bound


def server_credentials(certfile: Path, keyfile: Path) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; an unreadable file is a one-line start-up error."""
    try:
        pair = (keyfile.read_bytes(), certfile.read_bytes())
    except OSError as err:
        raise SystemExit(f"genserve grpc: cannot read TLS file {err.filename}: "
                         f"{err.strerror}") from None
    return grpc.ssl_server_credentials([pair])


async def serve(host: str, port: int, http_url: str, grace_s: float = 5.0,
                ready_period_s: float = 2.0, settings: Settings | None = None,
                health_port: int | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain in-flight calls for ``grace_s`` seconds.

    ``settings``: API keys, TLS and the access log (``GENSERVE_*``; default: the environment).
    """
    settings = settings or load_settings()
    try:
        keys = KeyStore.from_settings(settings)
    except KeyFileError as err:
        raise SystemExit(f"genserve grpc: {err}") from None
    tls = (server_credentials(settings.tls_certfile, settings.tls_keyfile)
           if settings.tls_certfile and settings.tls_keyfile else None)
    verify: ssl.SSLContext | bool = True
    if http_url.startswith("https://") and settings.tls_certfile:
        verify = pinned_context(settings.tls_certfile)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.so_reuseport", 0)],
                             interceptors=[DecodeErrorInterceptor()])
    upstream = Upstream(http_url, verify=verify)
    health_servicer = health.aio.HealthServicer()
    servicer = InferenceServicer(upstream, health_servicer, keys,
                                 access_logger(settings.access_log), settings.max_rows)
    await servicer.set_health(False)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=_reflection_pool())
    bound = _listen(server, host, port, tls)
    servers = [server]
    if health_port is not None:  # plaintext, grpc.health.v1 only (kubelet probes)
        servers.append(grpc.aio.server(options=[("grpc.so_reuseport", 0)]))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, servers[1])
        _listen(servers[1], host, health_port)
    for each in servers:
        await each.start()
    scheme = "TLS" if tls else "plaintext"
    print(f"genserve gRPC (Open Inference Protocol v2) on {host}:{bound} ({scheme}, API keys "
          f"{'required' if keys.enabled else 'off'}) -> {upstream.url}",
          file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_ready(servicer, ready_period_s))
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        await health_servicer.enter_graceful_shutdown()
        await asyncio.gather(*(each.stop(grace_s) for each in servers))
        await upstream.close()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is not in 0..65535")
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.grpc.server",
        description="genserve over gRPC: the Open Inference Protocol v2, forwarding to the "
                    "genserve HTTP service (one OIP model per served model and verb).")
    parser.add_argument("--host", default=os.environ.get("GENSERVE_GRPC_HOST", "127.0.0.1"),
                        help="interface to bind (default 127.0.0.1; env GENSERVE_GRPC_HOST)")
    parser.add_argument("--port", type=_port,
                        default=os.environ.get("GENSERVE_GRPC_PORT") or DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; env GENSERVE_GRPC_PORT)")
    parser.add_argument("--http-url", default=os.environ.get("GENSERVE_HTTP_URL")
                        or DEFAULT_HTTP_URL,
                        help=f"the genserve HTTP service (default {DEFAULT_HTTP_URL}; "
                             "env GENSERVE_HTTP_URL)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds to finish in-flight calls on SIGTERM (default 5)")
    parser.add_argument("--health-port", type=_port, default=None,
                        help="also serve grpc.health.v1 alone, in plaintext, on this port "
                             "(for kubelet gRPC probes when the main port speaks TLS)")
    args = parser.parse_args(argv)
    if not args.http_url.startswith(("http://", "https://")):
        parser.error(f"--http-url {args.http_url!r} must start with http:// or https://")
    try:
        settings = load_settings()
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                             for e in err.errors())
        raise SystemExit(f"genserve grpc: invalid GENSERVE_* settings: {problems}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(args.host, _port(str(args.port)), args.http_url, args.grace,
                      settings=settings, health_port=args.health_port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
