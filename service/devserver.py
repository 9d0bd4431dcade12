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
import re
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

__all__ = ["Server", "free_port", "grpc_ports", "listening_ports", "running_server",
           "wait_until_ready"]

ROOT = Path(__file__).resolve().parents[1]
START_ATTEMPTS = 3
"""Starts of ``bentoml serve`` tried when one fails with "address in use": BentoML reserves
circus' two ZeroMQ ports the racy way (found free, released, bound later)."""
_GRPC_START_LINE = re.compile(r"genserve gRPC .* on \S+:(\d+) \(")


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


def _http_port(arbiter_pid: int) -> int | None:
    """The port a ``bentoml serve --port 0`` bound for HTTP: the listening socket its arbiter
    shares with a worker (the arbiter also listens on circus' two ZeroMQ endpoints; workers
    inherit only the HTTP socket). ``None`` until a worker holds it."""
    own = listening_ports(arbiter_pid)
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(arbiter_pid).children(recursive=True):
            shared = own & listening_ports(child.pid)
            if len(shared) == 1:
                return shared.pop()
    return None


def grpc_ports(proc: subprocess.Popen, log: Path, startup_s: float = 60,
               ) -> tuple[int, int | None]:
    """``(port, health port or None)`` of a ``python -m service.grpc.server`` started with
    ``--port 0`` (and ``--health-port 0``), writing to ``log``: the port its start-up line
    names, and the other port it listens on. Both are bound when that line is written."""
    found: list[tuple[int, int | None]] = []

    def started() -> bool:
        line = _GRPC_START_LINE.search(log.read_text(errors="replace"))
        if line is None:
            return False
        port = int(line.group(1))
        others = listening_ports(proc.pid) - {port}
        assert len(others) <= 1, f"gRPC server listens on {others} beside {port}"
        found.append((port, others.pop() if others else None))
        return True

    wait_until_ready(proc, log, started, startup_s, what="gRPC server")
    return found[0]


class Server:
    """Handle on a running service: ``url``, ``post``, ``get``, the process and its log.

    ``ssl_context`` (https servers) verifies the server's certificate.
    """

    def __init__(self, url: str, proc: subprocess.Popen, log: Path,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.url, self.proc, self.log, self.ssl_context = url, proc, log, ssl_context

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
                   startup_s: float = 180, service: str = "service.http.api:GenServe",
                   ) -> Iterator[Server]:
    """Start the service on a loopback port it binds itself, wait for ``/readyz``, stop it
    on exit.

    ``service``: the BentoML service to serve (``bench.noop_service:NoOp`` for the
    framework's own request-rate ceiling in ``bench.serving``).

    With ``GENSERVE_TLS_CERTFILE`` in ``env`` the server speaks https, and the handle trusts
    that (self-signed) certificate. Each server gets its own ``BENTOML_HOME`` (unless ``env``
    names one): BentoML empties its Prometheus directory there at every start, which would
    reset the ``/metrics`` of any other server sharing it.
    """
    home = tempfile.mkdtemp(prefix="genserve-bentoml-")
    full_env = dict(os.environ, GENSERVE_MODELS_DIR=str(models_dir),
                    BENTOML_DO_NOT_TRACK="True", BENTOML_HOME=home, **(env or {}))
    try:
        server = _start(service, full_env, log, startup_s)
        try:
            yield server
        finally:
            stop(server.proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _start(service: str, env: dict[str, str], log: Path, startup_s: float) -> Server:
    attempt = 1
    while True:
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bentoml", "serve", service, "--host", "127.0.0.1",
                 "--port", "0"],
                stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True,
            )
        try:
            return _wait_ready(proc, log, env.get("GENSERVE_TLS_CERTFILE"), startup_s)
        except RuntimeError:
            stop(proc)
            if attempt == START_ATTEMPTS or "Address already in use" not in log.read_text():
                raise
            attempt += 1


def _wait_ready(proc: subprocess.Popen, log: Path, cert: str | None,
                startup_s: float) -> Server:
    """The server's handle once its HTTP port is known and ``/readyz`` answers 200."""
    context = ssl.create_default_context(cafile=cert) if cert else None
    found: list[Server] = []

    def ready() -> bool:
        if not found:
            port = _http_port(proc.pid)
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
