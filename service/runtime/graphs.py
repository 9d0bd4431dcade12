"""Graph executors: ONNX Runtime (CPU, or a GPU execution provider) and TorchScript (CPU or
CUDA), placed by one :class:`Placement` (``GENSERVE_DEVICE``, ``GENSERVE_DEVICE_ID``,
``GENSERVE_PROVIDER``, ``GENSERVE_GPU_MEMORY_MB``).

Both take numpy arrays and return numpy arrays, so the runtime above them is the same code for
both. Each also takes the arrays its :meth:`stage` makes (the executor's own device arrays)
and then returns arrays of that kind, so an ODE solve keeps its state where the graphs run:

* TorchScript stages to torch tensors on its device (the CPU or ``cuda:N``); the solvers work
  on them through ``numerics.arrays``, and a PF-ODE request makes no host round trip per step.
* ONNX Runtime on a GPU provider stages to torch CUDA tensors when torch is installed, and
  binds their memory to the graph's inputs and outputs (IO binding), on torch's CUDA stream.
  Without torch (the GPU serving image) it stages to numpy: every graph call then copies its
  inputs to the device and its outputs back. On the CPU provider it stages to numpy.

This is the one ``service`` module that imports torch, and only to run TorchScript graphs
or to hold an ODE state on a GPU.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from artifact.manifest import GraphFile
from numerics.arrays import Array, array_namespace

__all__ = ["CPU", "GPU_PROVIDERS", "GraphExecutor", "OnnxGraph", "Placement", "ROW_BLOCK",
           "TorchScriptGraph", "available_providers", "choose_providers", "open_graph",
           "serves_on_cuda"]

log = logging.getLogger("genserve")

ROW_BLOCK = 16
"""ONNX Runtime calls get a multiple of this many rows (the last row repeated, the extra
outputs dropped). Its CPU kernels for some functions (Log, Sin, Cos) compute the tail of a
buffer on a scalar path whose last bit can differ from the vector path, so without padding
a row's value would depend on where it sits in its batch, and an adaptive ODE solver turns
a last-bit change into a different step sequence. Whole blocks keep every row on the vector
path: a row's answer is the same alone, batched with others, or split. On a GPU it also
keeps the number of distinct input shapes small (the CUDA provider plans per shape)."""

CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
"""The ONNX Runtime execution providers ``GENSERVE_PROVIDER`` may name (TensorRT falls back
to CUDA for the nodes it does not take, and both to the CPU)."""


@dataclass(frozen=True)
class Placement:
    """Where graphs run.

    Attributes:
        device: ``"cpu"``, ``"cuda"`` (a GPU or an error) or ``"auto"`` (a GPU when the
            runtime offers one, else the CPU, with a warning when a GPU was offered but
            failed to initialise).
        device_id: the CUDA device's index.
        memory_mb: a cap on the GPU memory the graphs of one process take (ONNX Runtime's
            ``gpu_mem_limit`` per session; torch's per-process memory fraction); None: none.
        provider: the ONNX Runtime GPU provider tried first (one of :data:`GPU_PROVIDERS`).
    """

    device: str = "auto"
    device_id: int = 0
    memory_mb: int | None = None
    provider: str = "CUDAExecutionProvider"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda; got {self.device!r}")
        if self.provider not in GPU_PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(GPU_PROVIDERS)}; "
                             f"got {self.provider!r}")

    @classmethod
    def of(cls, device: str | Placement) -> Placement:
        return device if isinstance(device, Placement) else cls(device=device)

    @property
    def cuda(self) -> str:
        return f"cuda:{self.device_id}"


class GraphExecutor(Protocol):
    spec: GraphFile
    where: str  # "cpu" or "cuda:N": the device the graph computes on (GET /models)

    def __call__(self, *inputs: Array) -> tuple[Array, ...]: ...

    def stage(self, a: np.ndarray) -> Array: ...


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def choose_providers(placement: Placement, offered: Sequence[str]) -> list[Any]:
    """The ``providers`` argument of an ``onnxruntime.InferenceSession`` for ``placement``,
    given the providers this ONNX Runtime build offers (``get_available_providers()``).

    The GPU provider (with TensorRT, CUDA behind it) comes first with its device id, memory
    limit and cuDNN's heuristic algorithm choice (an exhaustive search would run again for
    every new batch shape), then the CPU. ``device="auto"`` without the GPU provider, and
    ``device="cpu"``, give the CPU alone; ``device="cuda"`` without it is an error naming
    the fix.
    """
    if placement.device == "cpu":
        return [CPU]
    if placement.provider not in offered:
        if placement.device == "cuda":
            raise RuntimeError(
                f"GENSERVE_DEVICE=cuda but ONNX Runtime offers no {placement.provider} "
                f"(it offers {', '.join(offered) or 'none'}): install onnxruntime-gpu "
                "(pip install 'genserve[gpu]', never together with onnxruntime), or set "
                "GENSERVE_DEVICE=cpu")
        return [CPU]
    chain = [placement.provider]
    if placement.provider == "TensorrtExecutionProvider" and "CUDAExecutionProvider" in offered:
        chain.append("CUDAExecutionProvider")
    out: list[Any] = []
    for name in chain:
        options: dict[str, Any] = {"device_id": placement.device_id}
        if name == "CUDAExecutionProvider":
            options["cudnn_conv_algo_search"] = "HEURISTIC"
            if placement.memory_mb:
                options["gpu_mem_limit"] = placement.memory_mb << 20
        out.append((name, options))
    return [*out, CPU]


def _provider_names(providers: Sequence[Any]) -> list[str]:
    return [p[0] if isinstance(p, tuple) else p for p in providers]


def _torch_cuda(device_id: int) -> Any:
    """torch, when it is installed and sees CUDA device ``device_id``; else None."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or device_id >= torch.cuda.device_count():
        return None
    return torch


def serves_on_cuda(placement: Placement, runtime: str) -> bool:
    """Whether models opened with ``placement`` and ``runtime`` will compute on a GPU, as far
    as can be known before opening them (the batch size the service configures depends on
    it): ONNX Runtime offering the GPU provider, or torch seeing CUDA for TorchScript."""
    if placement.device == "cpu":
        return False
    if placement.device == "cuda":
        return True
    if runtime == "torchscript":
        return _torch_cuda(placement.device_id) is not None
    try:
        return placement.provider in available_providers()
    except ImportError:  # no ONNX Runtime: no ONNX graph is served at all
        return False


class OnnxGraph:
    """One ONNX file in an ``onnxruntime.InferenceSession``.

    Args:
        offered: the providers this ONNX Runtime build offers (default: its own
            ``get_available_providers()``); the session asks for what
            :func:`choose_providers` picks from them.
    """

    def __init__(self, path: Path, spec: GraphFile, *, threads: int | None = None,
                 device: str | Placement = "auto", offered: Sequence[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "onnxruntime is not installed: pip install 'genserve[cpu]' (or [gpu])"
            ) from None
        placement = Placement.of(device)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        offered = available_providers() if offered is None else list(offered)
        wanted = choose_providers(placement, offered)
        gpu = _provider_names(wanted)[0] if wanted[0] != CPU else None
        self._torch = _torch_cuda(placement.device_id) if gpu else None
        if self._torch is not None and gpu == "CUDAExecutionProvider":
            # ORT's kernels on torch's stream: bound torch tensors need no extra sync
            stream = self._torch.cuda.current_stream(placement.device_id).cuda_stream
            wanted[0][1].update(has_user_compute_stream="1", user_compute_stream=str(stream))
        self.spec = spec
        self.session = self._open(ort, path, options, wanted, placement, gpu)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.dtype = np.float32
        on_gpu = gpu is not None and gpu in self.session.get_providers()
        self.where = placement.cuda if on_gpu else "cpu"
        self._device_type, self._device_id = ("cuda", placement.device_id) if on_gpu \
            else ("cpu", 0)
        if not on_gpu:
            self._torch = None

    @staticmethod
    def _open(ort: Any, path: Path, options: Any, wanted: list[Any], placement: Placement,
              gpu: str | None) -> Any:
        """The session; a GPU provider that is offered but fails to initialise is an error
        with ``device="cuda"`` and a warning and a CPU session with ``device="auto"``."""
        with warnings.catch_warnings():
            # ORT warns when asked for a provider it lacks; the check below says it once
            warnings.filterwarnings("ignore", message="Specified provider")
            try:
                session = ort.InferenceSession(str(path), options, providers=wanted)
                failure = None if gpu is None or gpu in session.get_providers() else \
                    "the session came up without it"
            except (RuntimeError, ValueError) as err:
                if gpu is None:
                    raise
                session, failure = None, str(err).strip().splitlines()[0]
        if failure is None:
            return session
        reason = (f"{Path(path).name}: ONNX Runtime offers {gpu} but could not initialise it "
                  f"on device {placement.device_id} ({failure})")
        if placement.device == "cuda":
            raise RuntimeError(f"{reason}; GENSERVE_DEVICE=cuda does not fall back to the CPU")
        log.warning("%s; this graph runs on the CPU (GENSERVE_DEVICE=auto)", reason)
        return session or ort.InferenceSession(str(path), options, providers=[CPU])

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def stage(self, a: np.ndarray) -> Array:
        """``a`` as this graph's device array: a torch CUDA tensor when the graph runs on a
        GPU and torch is installed, else ``a`` itself."""
        if self._torch is None:
            return a
        return self._torch.as_tensor(a, device=self.where)

    def __call__(self, *inputs: Array) -> tuple[Array, ...]:
        if array_namespace(inputs[0]) is not np:
            return self._bound(inputs)
        rows = len(inputs[0])
        pad = -rows % ROW_BLOCK
        feed = {n: _padded(np.ascontiguousarray(a, dtype=self.dtype), pad)
                for n, a in zip(self.input_names, inputs, strict=True)}
        out = self.session.run(None, feed)
        return tuple(o[:rows] for o in out) if pad else tuple(out)

    def _bound(self, inputs: Sequence[Array]) -> tuple[Array, ...]:
        """Torch tensors in and out, their memory bound to the graph (IO binding): no copy
        through the host. The tensors must be on this graph's device."""
        torch = array_namespace(inputs[0])
        rows = inputs[0].shape[0]
        padded = rows + (-rows % ROW_BLOCK)
        binding = self.session.io_binding()
        held = []  # the bound buffers must outlive the run
        for name, a in zip(self.input_names, inputs, strict=True):
            a = a.to(torch.float32)
            if padded > rows:
                a = torch.cat([a, a[-1:].expand(padded - rows, *a.shape[1:])])
            a = a.contiguous()
            held.append(a)
            binding.bind_input(name, self._device_type, self._device_id, np.float32,
                               tuple(a.shape), a.data_ptr())
        outs = []
        for name, tensor_spec in zip(self.output_names, self.spec.outputs, strict=True):
            shape = [padded if d == "batch" else int(d) for d in tensor_spec.shape]
            out = torch.empty(shape, dtype=torch.float32, device=inputs[0].device)
            binding.bind_output(name, self._device_type, self._device_id, np.float32,
                                tuple(shape), out.data_ptr())
            outs.append(out)
        self.session.run_with_iobinding(binding)
        return tuple(o[:rows] for o in outs)


def _padded(a: np.ndarray, pad: int) -> np.ndarray:
    """``a`` with its last row repeated ``pad`` more times (``(rows + pad, ...)``)."""
    if pad == 0 or len(a) == 0:
        return a
    return np.concatenate([a, np.repeat(a[-1:], pad, axis=0)])


class TorchScriptGraph:
    """One TorchScript file on the CPU or a CUDA device (needs torch; deprecated upstream,
    kept as an alternative, and the runtime of torch-only GPU machines).

    On CUDA, TF32 is off for matrix products and convolutions, so a log-likelihood computed
    on the GPU agrees with the CPU's to float32 rounding (TF32 keeps 10 mantissa bits).
    """

    def __init__(self, path: Path, spec: GraphFile, *, threads: int | None = None,
                 device: str | Placement = "auto") -> None:
        import torch

        placement = Placement.of(device)
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.spec = spec
        self.device = _torch_device(torch, placement)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            if placement.memory_mb:
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.cuda.set_per_process_memory_fraction(
                    min(1.0, (placement.memory_mb << 20) / total), self.device)
        self.module = torch.jit.load(str(path), map_location=self.device).eval()
        self.where = str(self.device)
        self.providers = [f"torchscript-{self.device.type}"]

    def stage(self, a: np.ndarray) -> Array:
        """``a`` as a torch tensor on this graph's device (its dtype kept)."""
        return self.torch.as_tensor(a, device=self.device)

    def __call__(self, *inputs: Array) -> tuple[Array, ...]:
        torch = self.torch
        host = array_namespace(inputs[0]) is np
        with torch.no_grad():
            out = self.module(*(torch.as_tensor(a, device=self.device).to(torch.float32)
                                for a in inputs))
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.cpu().numpy() for o in out) if host else out


def _torch_device(torch: Any, placement: Placement) -> Any:
    if placement.device == "cpu":
        return torch.device("cpu")
    if _torch_cuda(placement.device_id) is not None:
        return torch.device(placement.cuda)
    if placement.device == "cuda":
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise RuntimeError(
            f"GENSERVE_DEVICE=cuda but torch {torch.__version__} sees no CUDA device "
            f"{placement.device_id} ({seen} visible"
            f"{'' if torch.version.cuda else ', a CPU-only build'}); set GENSERVE_DEVICE=cpu")
    return torch.device("cpu")


def open_graph(directory: Path, spec: GraphFile, *, threads: int | None = None,
               device: str | Placement = "auto") -> GraphExecutor:
    cls = OnnxGraph if spec.format == "onnx" else TorchScriptGraph
    return cls(directory / spec.file, spec, threads=threads, device=device)
