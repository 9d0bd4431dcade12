"""Graph executors: ONNX Runtime (CPU, or CUDA when available) and TorchScript.

Both take and return numpy arrays, so the runtime above them is the same code for both.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np

from service.manifest import GraphFile

__all__ = ["GraphExecutor", "OnnxGraph", "TorchScriptGraph", "available_providers", "open_graph"]


class GraphExecutor(Protocol):
    spec: GraphFile

    def __call__(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]: ...


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OnnxGraph:
    """One ONNX file in an ``onnxruntime.InferenceSession``."""

    def __init__(self, path: Path, spec: GraphFile, *, threads: int | None = None,
                 device: str = "auto") -> None:
        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "onnxruntime is not installed: pip install 'genserve[cpu]' (or [gpu])"
            ) from None
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device in ("auto", "cuda") and "CUDAExecutionProvider" in available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        elif device == "cuda":
            raise RuntimeError("GENSERVE_DEVICE=cuda but onnxruntime has no CUDA provider")
        self.spec = spec
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.dtype = np.float32

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    def __call__(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        feed = {n: np.ascontiguousarray(a, dtype=self.dtype) for n, a in zip(self.input_names,
                                                                              inputs, strict=True)}
        return tuple(self.session.run(None, feed))


class TorchScriptGraph:
    """One TorchScript file (needs torch; deprecated upstream, kept as an alternative)."""

    def __init__(self, path: Path, spec: GraphFile, *, threads: int | None = None,
                 device: str = "auto") -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.spec = spec
        self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.providers = ["torchscript-cpu"]

    def __call__(self, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        torch = self.torch
        with torch.no_grad():
            out = self.module(*(torch.as_tensor(np.asarray(a, dtype=np.float32)) for a in inputs))
        out = out if isinstance(out, tuple) else (out,)
        return tuple(o.numpy() for o in out)


def open_graph(directory: Path, spec: GraphFile, *, threads: int | None = None,
               device: str | None = None) -> GraphExecutor:
    device = device or os.environ.get("GENSERVE_DEVICE", "auto")
    cls = OnnxGraph if spec.format == "onnx" else TorchScriptGraph
    return cls(directory / spec.file, spec, threads=threads, device=device)
