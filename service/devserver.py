"""A real ``bentoml serve`` subprocess on a free loopback port, for tests and benchmarks.

The one start / wait-until-ready / stop logic: the test suite's fixtures and the benchmarks
both use :func:`running_server`.
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

__all__ = ["Server", "free_port", "running_server", "wait_until_ready"]

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    """Start the service on a free loopback port, wait for ``/readyz``, stop it on exit.

    ``service``: the BentoML service to serve (``bench.noop_service:NoOp`` for the
    framework's own request-rate ceiling in ``bench.serving``).

    With ``GENSERVE_TLS_CERTFILE`` in ``env`` the server speaks https, and the handle trusts
    that (self-signed) certificate. Each server gets its own ``BENTOML_HOME`` (unless ``env``
    names one): BentoML empties its Prometheus directory there at every start, which would
    reset the ``/metrics`` of any other server sharing it.
    """
    port = free_port()
    home = tempfile.mkdtemp(prefix="genserve-bentoml-")
    full_env = dict(os.environ, GENSERVE_MODELS_DIR=str(models_dir),
                    BENTOML_DO_NOT_TRACK="True", BENTOML_HOME=home, **(env or {}))
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", service, "--host",
             "127.0.0.1", "--port", str(port)],
            stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
            start_new_session=True,
        )
    cert = full_env.get("GENSERVE_TLS_CERTFILE")
    context = ssl.create_default_context(cafile=cert) if cert else None
    scheme = "https" if cert else "http"
    server = Server(f"{scheme}://127.0.0.1:{port}", proc, log, context)
    try:
        _wait_ready(server, startup_s)
        yield server
    finally:
        stop(proc)
        shutil.rmtree(home, ignore_errors=True)


def _wait_ready(server: Server, startup_s: float) -> None:
    wait_until_ready(server.proc, server.log, lambda: server.get("/readyz")[0] == 200,
                     startup_s)


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
