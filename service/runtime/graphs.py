"""Graph executors: ONNX Runtime (CPU, or CUDA when available) and TorchScript.

Both take and return numpy arrays, so the runtime above them is the same code for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from artifact.manifest import GraphFile

__all__ = ["GraphExecutor", "OnnxGraph", "ROW_BLOCK", "TorchScriptGraph", "available_providers",
           "open_graph"]

ROW_BLOCK = 16
"""ONNX Runtime calls get a multiple of this many rows (the last row repeated, the extra
outputs dropped). Its CPU kernels for some functions (Log, Sin, Cos) compute the tail of a
buffer on a scalar path whose last bit can differ from the vector path, so without padding
a row's value would depend on where it sits in its batch, and an adaptive ODE solver turns
a last-bit change into a different step sequence. Whole blocks keep every row on the vector
path: a row's answer is the same alone, batched with others, or split."""


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
        rows = len(inputs[0])
        pad = -rows % ROW_BLOCK
        feed = {n: _padded(np.ascontiguousarray(a, dtype=self.dtype), pad)
                for n, a in zip(self.input_names, inputs, strict=True)}
        out = self.session.run(None, feed)
        return tuple(o[:rows] for o in out) if pad else tuple(out)


def _padded(a: np.ndarray, pad: int) -> np.ndarray:
    """``a`` with its last row repeated ``pad`` more times (``(rows + pad, ...)``)."""
    if pad == 0 or len(a) == 0:
        return a
    return np.concatenate([a, np.repeat(a[-1:], pad, axis=0)])


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
               device: str = "auto") -> GraphExecutor:
    cls = OnnxGraph if spec.format == "onnx" else TorchScriptGraph
    return cls(directory / spec.file, spec, threads=threads, device=device)
