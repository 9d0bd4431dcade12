"""A real ``bentoml serve`` subprocess on a loopback port, for tests and benchmarks.

The one start / wait-until-ready / stop logic: the test suite's fixtures and the benchmarks
both use :func:`running_server`.

Servers bind port 0 and are asked which port they got: a port found free here and handed to
a server is free only until someone else binds it, and the test suite starts servers from
two xdist workers (and other checkouts' suites may run on the same machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

__all__ = ["Server", "free_port", "listening_ports", "reserve_port", "running_server",
           "wait_until_ready"]

ROOT = Path(__file__).resolve().parents[1]
START_ATTEMPTS = 3
"""Starts of ``bentoml serve`` tried when one fails with "address in use": BentoML reserves
circus' two ZeroMQ ports the racy way (found free, released, bound later)."""


def free_port() -> int:
    """A port free now, released before the caller binds it: another process may take it
    in between. Servers that may run beside others bind port 0 instead (``running_server``,
    ``grpc_ports``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (empty once it is gone)."""
    with contextlib.suppress(psutil.Error):
        return {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
                if c.status == psutil.CONN_LISTEN}
    return set()


def _http_port(pid: int, others: set[int]) -> int | None:
    """The port a ``bentoml serve --port 0`` (started by process ``pid`` or by one of its
    descendants) bound for HTTP: the listening socket BentoML's arbiter shares with its
    workers (the arbiter also listens on circus' two ZeroMQ endpoints; workers inherit only
    the HTTP socket, and listen on ``others``, the gRPC ports, themselves). ``None`` until a
    worker holds it."""
    with contextlib.suppress(psutil.Error):
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        ports = [listening_ports(p.pid) - others for p in tree]
        for i, own in enumerate(ports):
            for theirs in ports[i + 1:]:
                shared = own & theirs
                if len(shared) == 1:
                    return shared.pop()
    return None


def reserve_port(host: str = "127.0.0.1") -> socket.socket:
    """A socket bound with ``SO_REUSEPORT`` to a free port and not listening: it keeps the
    port from processes that do not share it, while the server's workers, which bind it with
    ``SO_REUSEPORT`` too, listen on it. Close it once the server has stopped."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


class Server:
    """Handle on a running service: ``url``, ``post``, ``get``, the process and its log.

    ``ssl_context`` (https servers) verifies the server's certificate.
    """

    def __init__(self, url: str, proc: subprocess.Popen, log: Path,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.url, self.proc, self.log, self.ssl_context = url, proc, log, ssl_context
        self.grpc_address: str | None = None  # host:port of its gRPC edge

    def exchange(self, method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None,
                 timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
        """``(status, response headers with lower-case names, body)``."""
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout: float = 60) -> tuple[int, bytes]:
        status, _, raw = self.exchange(method, path, body, {"Content-Type": content_type},
                                       timeout)
        return status, raw

    def post(self, path: str, payload: object, timeout: float = 60,
             headers: dict[str, str] | None = None) -> tuple[int, object]:
        status, _, raw = self.exchange("POST", path, json.dumps(payload).encode(), headers,
                                       timeout)
        return status, json.loads(raw)

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)


@contextlib.contextmanager
def running_server(models_dir: Path, log: Path, env: dict[str, str] | None = None,
                   startup_s: float = 180, service: str | None = None,
                   root: Path = ROOT) -> Iterator[Server]:
    """Start ``genserve serve`` on a loopback port it binds itself (its gRPC edge on a port
    reserved here, ``Server.grpc_address``), wait for ``/readyz``, stop it on exit.

    ``service``: another BentoML service to serve with ``bentoml serve`` instead
    (``bench.noop_service:NoOp`` for the framework's own request-rate ceiling in
    ``bench.serving``). ``root``: the checkout whose code serves (another revision's worktree
    in ``bench.revisions``).

    With ``GENSERVE_TLS_CERTFILE`` in ``env`` the server speaks https, and the handle trusts
    that (self-signed) certificate. Each server gets its own ``BENTOML_HOME`` (unless ``env``
    names one): BentoML empties its Prometheus directory there at every start, which would
    reset the ``/metrics`` of any other server sharing it.
    """
    home = tempfile.mkdtemp(prefix="genserve-bentoml-")
    full_env = dict(os.environ, GENSERVE_MODELS_DIR=str(models_dir),
                    BENTOML_DO_NOT_TRACK="True", BENTOML_HOME=home, **(env or {}))
    with contextlib.ExitStack() as held:
        if service is None and "GENSERVE_GRPC_PORT" not in full_env:
            full_env["GENSERVE_GRPC_PORT"] = str(
                held.enter_context(reserve_port()).getsockname()[1])
        try:
            server = _start(service, full_env, log, startup_s, root)
            if service is None:
                server.grpc_address = f"127.0.0.1:{full_env['GENSERVE_GRPC_PORT']}"
            try:
                yield server
            finally:
                stop(server.proc)
        finally:
            shutil.rmtree(home, ignore_errors=True)


def _terminate_with_parent() -> None:
    """In the server's process before it runs (Linux): SIGTERM when the process that started
    it dies, so a killed test run or benchmark leaves no server behind (a normal exit stops
    it through :func:`stop`). Elsewhere a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(service: str | None, env: dict[str, str], log: Path, startup_s: float,
           root: Path) -> Server:
    command = ([sys.executable, "-m", "cli", "serve"] if service is None
               else [sys.executable, "-m", "bentoml", "serve", service])
    grpc_ports = {int(env[k]) for k in ("GENSERVE_GRPC_PORT", "GENSERVE_GRPC_HEALTH_PORT")
                  if env.get(k)}
    attempt = 1
    while True:
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", "0"],
                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )
        try:
            return _wait_ready(proc, log, env.get("GENSERVE_TLS_CERTFILE"), startup_s,
                               grpc_ports)
        except RuntimeError:
            stop(proc)
            if attempt == START_ATTEMPTS or "Address already in use" not in log.read_text():
                raise
            attempt += 1


def _wait_ready(proc: subprocess.Popen, log: Path, cert: str | None,
                startup_s: float, grpc_ports: set[int]) -> Server:
    """The server's handle once its HTTP port is known and ``/readyz`` answers 200."""
    context = ssl.create_default_context(cafile=cert) if cert else None
    found: list[Server] = []

    def ready() -> bool:
        if not found:
            port = _http_port(proc.pid, grpc_ports)
            if port is None:
                return False
            found.append(Server(f"{'https' if cert else 'http'}://127.0.0.1:{port}", proc,
                                log, context))
        return found[0].get("/readyz")[0] == 200

    wait_until_ready(proc, log, ready, startup_s)
    return found[0]


def wait_until_ready(proc: subprocess.Popen, log: Path, ready: Callable[[], bool],
                     startup_s: float, what: str = "server") -> None:
    """Poll ``ready()`` every 0.5 s (an ``OSError`` counts as not yet) until it is true;
    RuntimeError with the log's tail if ``proc`` exits or ``startup_s`` passes first."""
    deadline = time.monotonic() + startup_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early ({proc.returncode}):\n"
                               f"{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if ready():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in {startup_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the server's process group, then SIGKILL after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
