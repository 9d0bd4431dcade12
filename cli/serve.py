"""``genserve serve``: what ``make serve`` runs, HTTP and gRPC on loopback by default."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from service.auth import security_config
from service.settings import load_settings

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the models over HTTP and gRPC on loopback")
    p.add_argument("--models", help="models directory (GENSERVE_MODELS_DIR, exported_models)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (3000)")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="gRPC (Open Inference Protocol v2) port (8001; GENSERVE_GRPC_PORT)")
    p.add_argument("--no-grpc", action="store_true", help="serve HTTP only")
    p.add_argument("--workers", type=int, help="worker processes (GENSERVE_WORKERS, 1)")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    env = dict(os.environ)
    if ns.models:
        env["GENSERVE_MODELS_DIR"] = ns.models
    if ns.workers:
        env["GENSERVE_WORKERS"] = str(ns.workers)
    if ns.grpc_port:
        env["GENSERVE_GRPC_PORT"] = str(ns.grpc_port)
    settings = load_settings(env)
    models = Path(settings.models_dir)
    if not models.is_dir():
        raise FileNotFoundError(f"models directory {models} does not exist; run `make models` "
                                "or set GENSERVE_MODELS_DIR")
    scheme = _check_security_settings(settings)
    cmds = [[sys.executable, "-m", "bentoml", "serve", "service.http.api:GenServe",
             "--host", ns.host, "--port", str(ns.port)]]
    where = f"{scheme}://{ns.host}:{ns.port}"
    if not ns.no_grpc:
        local = "127.0.0.1" if ns.host in ("0.0.0.0", "::", "") else ns.host
        local = f"[{local}]" if ":" in local else local
        cmds.append([sys.executable, "-m", "service.grpc.server", "--host", ns.host,
                     "--port", str(settings.grpc_port),
                     "--http-url", f"{scheme}://{local}:{ns.port}"])
        where += f" and grpc://{ns.host}:{settings.grpc_port} (Open Inference Protocol v2)"
    print(f"serving {models} on {where}", file=sys.stderr)
    procs = [subprocess.Popen(cmd, env=env) for cmd in cmds]

    def stop(*_: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:  # one process gone (crash or signal) stops the other: no half-served state
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
    finally:
        stop()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return max(proc.returncode or 0 for proc in procs)


def _check_security_settings(settings: object) -> str:
    """Fail before anything starts on unreadable keys or TLS files; the HTTP scheme."""
    try:
        security_config(settings)
    except SystemExit as err:  # one line, exit 2, like every other bad input
        raise ValueError(str(err).removeprefix("genserve: ")) from None
    return "https" if settings.tls_certfile else "http"
