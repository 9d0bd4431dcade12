"""Data-parallel training helpers: rank and world from torchrun's environment.

``torchrun --nproc_per_node N -m cli train ...`` starts N copies of the ordinary command;
each reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from
the environment, and :func:`setup` joins them into one process group: ``gloo`` on CPU,
``nccl`` when CUDA is available (``--dist-backend`` overrides). Without those variables, or
with ``WORLD_SIZE=1``, nothing is initialised and training is the plain single-process loop,
bit for bit.

How :func:`training.train.train_model` uses a world of N ranks:

* one global batch of ``batch_size`` rows per step, drawn from a permutation seeded the same
  on every rank; rank ``r`` trains on its own slice ``[r*b, (r+1)*b)``, ``b = batch_size/N``;
* ``torch.nn.parallel.DistributedDataParallel`` averages the gradients, so a step sees the
  gradient of the global batch's mean loss (the model's own noise, such as diffusion times,
  is drawn per rank from distinct seeds);
* rank 0 validates and broadcasts the result, so every rank takes the same early-stopping
  and best-state decisions; only rank 0 shows the progress bar, and only rank 0 should
  write files (:func:`is_main_process`).
"""

from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "all_reduce_mean",
    "barrier",
    "broadcast_float",
    "env_world_size",
    "is_main_process",
    "setup",
    "strip_option",
    "torchrun_command",
]



@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, its device and backend."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """More than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0


def env_world_size(environ: dict[str, str] | None = None) -> int:
    """``WORLD_SIZE`` as set by torchrun (1 when unset)."""
    environ = os.environ if environ is None else environ
    raw = environ.get("WORLD_SIZE", "1") or "1"
    try:
        world = int(raw)
    except ValueError as err:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {raw!r}") from err
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be a positive integer, got {raw!r}")
    return world


def _default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _context_of_group() -> DistContext:
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=local_rank, backend=backend, device=device)


def setup(backend: str = "auto") -> DistContext:
    """The process group of this run, joined from torchrun's environment on first call.

    An already initialised group (a caller's own ``init_process_group``) is used as it is.
    With ``WORLD_SIZE`` unset or 1 this returns the single-process context and touches
    nothing.
    """
    if dist.is_available() and dist.is_initialized():
        return _context_of_group()
    if env_world_size() == 1:
        return DistContext()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 needs {', '.join(missing)} in the environment; "
                         "start training with torchrun")
    backend = _default_backend() if backend == "auto" else backend
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("the nccl backend needs CUDA; train with --dist-backend gloo")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    atexit.register(_shutdown)
    return _context_of_group()


def _shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """True in single-process runs and on rank 0 of a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """Mean of a scalar over the ranks (the value itself in a single process)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def broadcast_float(value: float, ctx: DistContext, src: int = 0) -> float:
    """Rank ``src``'s scalar on every rank (the value itself in a single process)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.broadcast(t, src=src)
    return float(t.item())


def torchrun_command(
    args: list[str],
    nproc_per_node: int,
    *,
    nnodes: int = 1,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    python: str | None = None,
) -> list[str]:
    """The torchrun command line that runs ``genserve ARGS`` (``python -m cli``) per process.

    One node: a standalone rendezvous (``--standalone``), or a fixed ``master_port`` on
    loopback. Several nodes: static rendezvous at ``master_addr:master_port``, this node's
    ``node_rank`` (the training Job passes ``$JOB_COMPLETION_INDEX``).
    """
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError("nproc_per_node and nnodes must be at least 1")
    cmd: list[str] = [python or sys.executable, "-m", "torch.distributed.run",
                      "--nproc_per_node", str(nproc_per_node), "--nnodes", str(nnodes)]
    if nnodes == 1 and master_port is None:
        cmd.append("--standalone")
    else:
        if nnodes > 1 and (master_addr is None or node_rank is None):
            raise ValueError("several nodes need master_addr and node_rank")
        cmd += ["--node_rank", str(node_rank or 0),
                "--master_addr", master_addr or "127.0.0.1",
                "--master_port", str(master_port or 29500)]
    return cmd + ["-m", "cli", *args]



def strip_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option VALUE`` / ``option=VALUE`` (e.g. ``--distributed 4``)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            out.append(arg)
    return out
