"""A peer server for the serving benchmark: Seldon MLServer serving a no-op model.

Our served rows/s mean more next to another Python model server's request-rate ceiling on the
same machine. The peer is MLServer (``pip install mlserver``) answering the Open Inference
Protocol's REST route with a model whose ``predict`` hands its input tensor back unchanged:
all it pays per request is its own HTTP, JSON and request/response model cost, so its
requests/s is the most any MLServer model could reach here.

MLServer stays out of the project's environment (it brings its own FastAPI, Starlette,
uvicorn and pandas): it gets a venv of its own (:data:`PEER_VENV`) and runs as a
subprocess; this module uses nothing from it. One process, like one BentoML worker:
``parallel_workers`` 0 runs inference inline in the server's event loop (its default, 1, adds
an inference worker process fed over IPC). Its uvicorn runs on uvloop, and httptools is
installed beside it so that it parses HTTP with the same C parser as ours (MLServer alone
would fall back to h11, in pure Python).

    from bench.peer import PEER_BODY, running_peer
    from bench.serving import wrk

    with running_peer() as url:
        print(wrk(url, PEER_BODY, 64, 15))
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from service.devserver import free_port, stop, wait_until_ready

__all__ = ["MLSERVER_VERSION", "PEER_BODY", "PEER_VENV", "ensure_mlserver", "running_peer"]

MLSERVER_VERSION = "1.7.1"  # CPU only: pulls no torch or CUDA
PEER_VENV = Path(os.environ.get("BENCH_PEER_VENV",
                                Path(tempfile.gettempdir()) / "mls-venv"))
MODEL = "noop"
# One 1-row FP32 input of shape [1, 2], the same row as bench.serving's 1-row scenarios.
PEER_BODY = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                         "data": [0.5, 0.25]}]}
# Adaptive batching when asked for: up to 64 requests, held back at most 5 ms.
BATCH_SIZE, BATCH_TIME_S = 64, 0.005

NOOP_PY = '''"""The peer's no-op model: its input tensor back, unchanged, as output "y"."""

from mlserver import MLModel
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput


class NoOp(MLModel):
    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = payload.inputs[0]
        return InferenceResponse(
            model_name=self.name, id=payload.id,
            outputs=[ResponseOutput(name="y", shape=x.shape, datatype=x.datatype, data=x.data)])
'''


def ensure_mlserver(venv: Path = PEER_VENV) -> Path:
    """``venv/bin/mlserver``, creating ``venv`` and installing MLServer there if it is missing.

    The install takes about a minute and about 330 MB; a failed one raises RuntimeError with
    pip's last words.
    """
    exe = venv / "bin" / "mlserver"
    if exe.exists():
        return exe
    print(f"peer: creating {venv} and installing mlserver=={MLSERVER_VERSION}", flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
              f"mlserver=={MLSERVER_VERSION}", "httptools>=0.6"]]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"peer: `{' '.join(cmd)}` failed ({done.returncode}):\n"
                               f"{(done.stdout + done.stderr)[-3000:]}")
    if not exe.exists():
        raise RuntimeError(f"peer: mlserver installed, but {exe} is missing")
    print(f"peer: installed mlserver=={MLSERVER_VERSION} into {venv}", flush=True)
    return exe


def write_model_dir(folder: Path, batching: bool = False) -> int:
    """The server's ``settings.json`` in ``folder``, the no-op's ``model-settings.json`` and
    ``noop.py`` in ``folder/noop``; returns the HTTP port.

    ``debug`` off: no per-request access log or debug logging (MLServer's default turns both
    on). The metrics server and its per-request Prometheus middleware stay on, as they are by
    default. The gRPC and metrics servers listen on ports of their own and run in the same
    event loop, idle under a REST load.
    """
    http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
    settings = {"debug": False, "host": "127.0.0.1", "http_port": http_port,
                "grpc_port": grpc_port, "metrics_port": metrics_port, "parallel_workers": 0,
                "metrics_dir": str(folder / ".metrics"),
                "environments_dir": str(folder / ".envs")}
    model = {"name": MODEL, "implementation": "noop.NoOp"}
    if batching:
        model |= {"max_batch_size": BATCH_SIZE, "max_batch_time": BATCH_TIME_S}
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    (folder / MODEL).mkdir()  # MLServer warns where a model's folder is not named after it
    (folder / MODEL / "model-settings.json").write_text(json.dumps(model, indent=2))
    (folder / MODEL / "noop.py").write_text(NOOP_PY)
    return http_port


@contextlib.contextmanager
def running_peer(batching: bool = False, startup_s: float = 120,
                 log: Path | None = None) -> Iterator[str]:
    """Start MLServer with the no-op model on a free loopback port, wait until it and the
    model are ready, yield the infer URL; stop the whole process group on exit.

    ``batching`` turns MLServer's adaptive batching on (``max_batch_size``
    :data:`BATCH_SIZE`, ``max_batch_time`` :data:`BATCH_TIME_S`); off, every request is its
    own ``predict`` call. The server's output goes to ``log`` (default: ``mlserver.log`` in
    its temporary folder, removed afterwards).
    """
    exe = ensure_mlserver(PEER_VENV)
    folder = Path(tempfile.mkdtemp(prefix="genserve-peer-"))
    port = write_model_dir(folder, batching)
    log = log or folder / "mlserver.log"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(exe), "start", str(folder)], cwd=folder, env=env,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v2"
    try:
        urls = (f"{base}/health/ready", f"{base}/models/{MODEL}/ready")
        wait_until_ready(proc, log, lambda: all(_answers_200(u) for u in urls), startup_s,
                         what="peer")
        yield f"{base}/models/{MODEL}/infer"
    finally:
        stop(proc, grace_s=5)
        shutil.rmtree(folder, ignore_errors=True)


def _answers_200(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as resp:  # a refusal or 4xx/5xx: OSError
        return resp.status == 200
