"""``genserve export``: checkpoint -> ``manifest.json`` + ONNX and/or TorchScript graphs.

Every graph is a thin tensor-in/tensor-out wrapper (STYLE habit 19): no ``Distribution``
objects, no autograd, no data-dependent branching, batch axis dynamic. The runtime composes
them; it never sees training code.
"""

from __future__ import annotations

import json
import logging
import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from service.manifest import (
    MANIFEST_FILE,
    Calibration,
    DataInfo,
    Defaults,
    GraphFile,
    Manifest,
    TensorSpec,
    TimeSpec,
    sha256_file,
)
from training.checkpoint import Checkpoint, atomic_directory

__all__ = ["FORMATS", "OPSET", "calibrate", "export_checkpoint", "graph_modules"]

FORMATS = ("onnx", "torchscript")
OPSET = 18
CALIBRATION_LEVELS = 201


class PreprocessGraph(nn.Module):
    """``x: (batch, dim)`` data units -> ``(u, ladj)``; deterministic (eval mode)."""

    def __init__(self, pre: nn.Module) -> None:
        super().__init__()
        self.pre = pre

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.pre(x)


class PostprocessGraph(nn.Module):
    """``u: (batch, dim)`` model space -> ``x`` data units."""

    def __init__(self, pre: nn.Module) -> None:
        super().__init__()
        self.pre = pre

    def forward(self, u: Tensor) -> Tensor:
        return self.pre.inverse(u)


class LogProbGraph(nn.Module):
    """Flow: ``u: (batch, dim)`` -> ``log p(u): (batch,)`` in model space."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, u: Tensor) -> Tensor:
        return self.model.log_prob(u)


class SampleGraph(nn.Module):
    """Flow: base noise ``z: (batch, dim)`` -> ``u`` (the noise is an input: seeded outside)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: Tensor) -> Tensor:
        return self.model.inverse(z)


class VelocityGraph(nn.Module):
    """``(x: (batch, dim), t: (batch,))`` -> ``v: (batch, dim)`` (t = 0 data, 1 noise)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.model.velocity(x, t)


class VelocityDivGraph(VelocityGraph):
    """-> ``(v, div v)`` with the exact divergence by forward-mode arithmetic."""

    def forward(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.model.velocity_div(x, t)


class VelocityJvpGraph(VelocityGraph):
    """``(x, t, e)`` -> ``(v, J e)`` for Hutchinson's estimator."""

    def forward(self, x: Tensor, t: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.model.velocity_jvp(x, t, e)


def _spec(name: str, dim: int | None) -> TensorSpec:
    return TensorSpec(name=name, shape=["batch"] if dim is None else ["batch", dim])


Graph = tuple[nn.Module, list[TensorSpec], list[TensorSpec]]


def graph_modules(ckpt: Checkpoint) -> dict[str, Graph]:
    """Every graph of the checkpoint's family: name -> (module, inputs, outputs)."""
    d = ckpt.config.dim
    model, pre = ckpt.model.eval(), ckpt.preprocessor.eval().frozen()
    if hasattr(model, "frozen"):  # flows: precomputed inverses instead of triangular solves
        model = model.frozen()
    # I/O names must not collide with the exporter's internal value names (e.g. "div", "t").
    x, u, z, e = (_spec(n, d) for n in ("x", "u", "z", "probe"))
    t = _spec("time", None)
    graphs: dict[str, Graph] = {
        "preprocess": (PreprocessGraph(pre), [x], [u, _spec("ladj", None)]),
        "postprocess": (PostprocessGraph(pre), [u], [x]),
    }
    v, div, jvp = _spec("velocity", d), _spec("divergence", None), _spec("jvp", d)
    if ckpt.config.family == "flow":
        graphs["log_prob"] = (LogProbGraph(model), [u], [_spec("log_prob", None)])
        graphs["sample"] = (SampleGraph(model), [z], [u])
    else:
        graphs["velocity"] = (VelocityGraph(model), [x, t], [v])
        graphs["velocity_div"] = (VelocityDivGraph(model), [x, t], [v, div])
        graphs["velocity_jvp"] = (VelocityJvpGraph(model), [x, t, e], [v, jvp])
    return graphs


def _example_inputs(specs: list[TensorSpec], rows: int = 3) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for s in specs:
        shape = [rows if a == "batch" else int(a) for a in s.shape]
        out.append(torch.rand(shape, generator=gen) * 0.8 + 0.1 if s.name == "time"
                   else torch.randn(shape, generator=gen))
    return tuple(out)


def _export_onnx(module: nn.Module, inputs: list[TensorSpec], outputs: list[TensorSpec],
                 path: Path) -> None:
    from torch.export import Dim

    # torch's registry warns once per missing torchvision op: noise, not news, for our graphs
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch = Dim("batch", min=1, max=1 << 20)
    args = _example_inputs(inputs)
    dynamic = tuple({0: batch} for _ in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            dynamic_shapes=dynamic,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)


def _export_torchscript(module: nn.Module, inputs: list[TensorSpec], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; we still offer the format
        traced = torch.jit.trace(module, _example_inputs(inputs), check_trace=False)
    traced.save(str(path))


def calibrate(nll: np.ndarray, target_fpr: float = 0.01) -> Calibration:
    """Quantiles of the validation NLL and the threshold at the target false-positive rate."""
    nll = np.sort(np.asarray(nll, dtype=np.float64))
    levels = np.linspace(0.0, 1.0, CALIBRATION_LEVELS)
    return Calibration(
        levels=[float(v) for v in levels],
        quantiles=[float(v) for v in np.quantile(nll, levels)],
        target_fpr=target_fpr,
        threshold=float(np.quantile(nll, 1.0 - target_fpr)),
        rows=len(nll),
    )


def _defaults(ckpt: Checkpoint) -> Defaults:
    family = ckpt.config.family
    if family == "flow":
        return Defaults()
    if ckpt.config.model.image_shape is not None:  # D exact-trace passes are costly on images
        base = _vector_defaults(family, ckpt)
        return base.model_copy(update={"method": "hutchinson"})
    return _vector_defaults(family, ckpt)


def _vector_defaults(family: str, ckpt: Checkpoint) -> Defaults:
    if family == "diffusion":
        return Defaults(solver="dpmpp2m", steps=20)
    if "reflow" in ckpt.config.summary:  # straight paths: two Euler steps suffice
        return Defaults(solver="euler", steps=2)
    return Defaults(solver="rk4", steps=16)


def _time_spec(ckpt: Checkpoint) -> TimeSpec | None:
    if ckpt.config.family == "flow":
        return None
    m = ckpt.config.model
    if ckpt.config.family == "diffusion":
        return TimeSpec(t_min=m.t_min, schedule=m.schedule, beta_min=m.beta_min,
                        beta_max=m.beta_max)
    return TimeSpec(t_min=float(getattr(ckpt.model, "t_min", 0.0)))


def _versions() -> dict[str, str]:
    import onnx

    import training

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "opset": str(OPSET),
        "python": platform.python_version(),
        "genserve": getattr(training, "__version__", "0.1.0"),
    }


def export_checkpoint(
    ckpt: Checkpoint,
    out: str | Path,
    *,
    formats: tuple[str, ...] = ("onnx",),
    name: str | None = None,
    target_fpr: float = 0.01,
    calibration_nll: np.ndarray | None = None,
) -> Manifest:
    """Write ``out/`` atomically: graphs in each format, then ``manifest.json`` with sha256s.

    ``calibration_nll`` (normal validation rows' NLL) defaults to the checkpoint's own
    validation split scored in data units.
    """
    from training.evaluate import checkpoint_splits, data_log_prob

    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown export format {bad}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    name = name or out.name
    if calibration_nll is None:
        val = checkpoint_splits(ckpt).val
        calibration_nll = -data_log_prob(ckpt, val)["log_prob"]
    cfg = ckpt.config
    graphs: dict[str, dict[str, GraphFile]] = {}
    with atomic_directory(out) as tmp:
        for graph, (module, inputs, outputs) in graph_modules(ckpt).items():
            graphs[graph] = {}
            for fmt in formats:
                file = f"{graph}.onnx" if fmt == "onnx" else f"{graph}.pt"
                if fmt == "onnx":
                    _export_onnx(module, inputs, outputs, tmp / file)
                else:
                    _export_torchscript(module, inputs, tmp / file)
                graphs[graph][fmt] = GraphFile(file=file, format=fmt, inputs=inputs,
                                               outputs=outputs)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        manifest = Manifest(
            name=name,
            family=cfg.family,
            model_type=cfg.model_type,
            dim=cfg.dim,
            event_shape=list(cfg.model.image_shape or [cfg.dim]),
            preprocessing=_describe(ckpt.preprocessor),
            graphs=graphs,
            time=_time_spec(ckpt),
            defaults=_defaults(ckpt),
            calibration=calibrate(calibration_nll, target_fpr),
            data=DataInfo(name=cfg.data.name, rows=cfg.data.rows, dim=cfg.data.dim,
                          levels=cfg.data.levels, mean=cfg.data.mean, std=cfg.data.std),
            files=files,
            versions=_versions(),
        )
        (tmp / MANIFEST_FILE).write_text(
            json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n"
        )
    return manifest


def _describe(pre: nn.Module) -> list[dict[str, Any]]:
    describe = getattr(pre, "describe", None)
    return describe() if callable(describe) else []
