"""``genserve serve``: what ``make serve`` runs, HTTP and gRPC on loopback by default."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
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
    if ns.grpc_port is not None:
        env["GENSERVE_GRPC_PORT"] = str(ns.grpc_port)
    if ns.no_grpc:
        env["GENSERVE_GRPC"] = "false"
    env["GENSERVE_GRPC_HOST"] = ns.host  # gRPC binds where HTTP does
    settings = load_settings(env)
    models = Path(settings.models_dir)
    if not models.is_dir():
        raise FileNotFoundError(f"models directory {models} does not exist; run `make models` "
                                "or set GENSERVE_MODELS_DIR")
    scheme = _check_security_settings(settings)
    where = f"{scheme}://{ns.host}:{ns.port}"
    if settings.grpc:
        where += f" and grpc://{ns.host}:{settings.grpc_port} (Open Inference Protocol v2)"
    print(f"serving {models} on {where}", file=sys.stderr)
    # HTTP and gRPC are served by the same worker processes; SIGTERM drains both
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "service.http.api:GenServe",
                             "--host", ns.host, "--port", str(ns.port)], env=env)

    def stop(*_: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return proc.wait()
    finally:
        stop()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check_security_settings(settings: object) -> str:
    """Fail before anything starts on unreadable keys or TLS files; the HTTP scheme."""
    try:
        security_config(settings)
    except SystemExit as err:  # one line, exit 2, like every other bad input
        raise ValueError(str(err).removeprefix("genserve: ")) from None
    return "https" if settings.tls_certfile else "http"
