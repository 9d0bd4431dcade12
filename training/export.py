"""``genserve export``: checkpoint -> ``manifest.json`` + ONNX and/or TorchScript graphs.

The model names its family's graphs (``export_graphs()``, thin wrappers of
``training.graphs``) and the manifest fields its family needs (``time_spec()``,
``serving_defaults()``); this module adds the preprocessing graphs, writes each graph in each
format, and calibrates the anomaly threshold on the written graphs through the served
runtime (``service.runtime``), so what is calibrated is what is served: the anomaly score of
the kind ``score`` names (``artifact.scores``; default ``nll``), whose stored parts (a
``latent`` score's training latents) are written beside the graphs and sha256-listed like
them. Export needs only the checkpoint: its held-out calibration rows travel in it.
"""

from __future__ import annotations

import json
import logging
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.numpy import save_file
from torch import Tensor, nn
from torch.export import Dim

from artifact import genserve_version
from artifact.calibration import calibrate
from artifact.families import family
from artifact.manifest import (
    MANIFEST_FILE,
    DataInfo,
    GraphFile,
    Manifest,
    TensorSpec,
    sha256_file,
)
from artifact.scores import LATENTS_FILE, AnomalyScoreSpec
from service.progress import progress_bar
from service.runtime import open_runtime
from training.checkpoint import Checkpoint, atomic_directory
from training.graphs import ExportGraph, PostprocessGraph, PreprocessGraph, spec

__all__ = ["CALIBRATION_BATCH", "FORMATS", "OPSET", "Exported", "export_checkpoint",
           "export_graphs"]

FORMATS = ("onnx", "torchscript")
OPSET = 18
CALIBRATION_BATCH = 256
"""Rows per graph call while calibrating (one progress-bar tick)."""


@dataclass(frozen=True)
class Exported:
    """What :func:`export_checkpoint` wrote: the manifest, and the calibration rows' scores
    (the served score kind through the served graphs; None without calibration)."""

    manifest: Manifest
    calibration_scores: np.ndarray | None


def export_graphs(ckpt: Checkpoint, with_encode: bool = False) -> dict[str, ExportGraph]:
    """Every graph of the artifact: the preprocessing pair and the model's own (with a
    flow's ``encode`` graph for a ``latent`` score)."""
    d = ckpt.config.dim
    model, pre = ckpt.model.eval(), ckpt.preprocessor.eval().frozen()
    x, u = spec("x", d), spec("u", d)
    return {
        "preprocess": ExportGraph(PreprocessGraph(pre), [x], [u, spec("ladj", None)]),
        "postprocess": ExportGraph(PostprocessGraph(pre), [u], [x]),
        **model.export_graphs(),
        **(model.encode_graphs() if with_encode else {}),
    }


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
    # torch's registry warns once per missing torchvision op: noise, not news, for our graphs
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    batch = Dim("batch", min=1, max=1 << 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            _example_inputs(inputs),
            input_names=[s.name for s in inputs],
            output_names=[s.name for s in outputs],
            dynamic_shapes=tuple({0: batch} for _ in inputs),
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


def _write_graphs(ckpt: Checkpoint, formats: tuple[str, ...], folder: Path,
                  with_encode: bool = False) -> dict[str, dict[str, GraphFile]]:
    graphs: dict[str, dict[str, GraphFile]] = {}
    for name, graph in export_graphs(ckpt, with_encode).items():
        graphs[name] = {}
        for fmt in formats:
            file = f"{name}.onnx" if fmt == "onnx" else f"{name}.pt"
            if fmt == "onnx":
                _export_onnx(graph.module, graph.inputs, graph.outputs, folder / file)
            else:
                _export_torchscript(graph.module, graph.inputs, folder / file)
            graphs[name][fmt] = GraphFile(file=file, format=fmt, inputs=graph.inputs,
                                          outputs=graph.outputs)
    return graphs


def _versions() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "opset": str(OPSET),
        "python": platform.python_version(),
        "genserve": genserve_version(),
    }


def _straightened(ckpt: Checkpoint) -> bool:
    """A reflowed model: nearly straight paths, so two Euler steps sample well."""
    return "reflow" in ckpt.config.summary


def _write_manifest(folder: Path, manifest: Manifest) -> None:
    (folder / MANIFEST_FILE).write_text(
        json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")


def _calibration_rows(ckpt: Checkpoint, rows: np.ndarray | None, limit: int | None,
                      seed: int, condition: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows calibration scores, and their condition (a conditional model's)."""
    condition = _calibration_condition(ckpt, rows, condition)
    rows = ckpt.calibration_rows if rows is None else np.asarray(rows, dtype=np.float64)
    if rows is None:
        raise ValueError("this checkpoint carries no calibration rows (it was saved before "
                         "checkpoints kept them): export with --no-calibration, or train it "
                         "again")
    if rows.ndim != 2 or rows.shape[1] != ckpt.config.dim or len(rows) == 0:
        raise ValueError(f"calibration rows have shape {rows.shape}; expected (rows >= 1, "
                         f"{ckpt.config.dim})")
    if limit is not None and len(rows) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), limit, replace=False))
        rows = rows[keep]
        condition = None if condition is None else condition[keep]
    return rows, condition


def _calibration_condition(ckpt: Checkpoint, rows: np.ndarray | None,
                           condition: np.ndarray | None) -> np.ndarray | None:
    """The condition of the rows calibration scores (None: an unconditional model)."""
    if ckpt.config.condition is None:
        return None
    own = rows is None
    if own and ckpt.calibration_rows is None:
        return None  # _calibration_rows says what is missing
    condition = ckpt.calibration_condition if own else condition
    count = len(ckpt.calibration_rows if own else rows)
    if condition is None or len(condition) != count:
        raise ValueError("a conditional model calibrates on rows with their labels or "
                         "context: give calibration_condition beside calibration_rows")
    return np.asarray(condition)


def _score_rows(folder: Path, manifest: Manifest, fmt: str, rows: np.ndarray,
                progress: bool, condition: np.ndarray | None = None) -> np.ndarray:
    """The anomaly score of ``rows`` through the served runtime on ``folder`` (given each
    row's ``condition``: class indices or context rows, for a conditional model)."""
    runtime = open_runtime(folder, manifest=manifest, runtime=fmt)
    key = None if manifest.condition is None else (
        "labels" if manifest.condition.kind == "label" else "context")
    scores = []
    with progress_bar(total=len(rows), desc="calibrate", unit="rows",
                      disable=not progress) as bar:
        for a in range(0, len(rows), CALIBRATION_BATCH):
            block = rows[a:a + CALIBRATION_BATCH]
            rows_index = np.arange(a, a + len(block))
            given = {} if key is None else {key: condition[a:a + CALIBRATION_BATCH]}
            scores.append(runtime.score(block, rows=rows_index, **given))
            bar.update(len(block))
    return np.concatenate(scores)


def _calibrated(manifest: Manifest, scores: np.ndarray, condition: np.ndarray | None,
                target_fpr: float) -> Manifest:
    """``manifest`` with the calibration of ``scores``, and a label model's per class (on
    that class's rows; a class without validation rows keeps the model-wide one)."""
    cal = calibrate(scores, target_fpr, score=manifest.score_kind)
    update: dict[str, Any] = {"calibration": cal}
    cond = manifest.condition
    if cond is not None and cond.kind == "label":
        labels = np.asarray(condition, dtype=np.int64)
        per_class = [calibrate(scores[labels == k], target_fpr, score=manifest.score_kind)
                     if (labels == k).any() else cal for k in range(cond.width)]
        update["condition"] = cond.model_copy(update={"calibrations": per_class})
    return manifest.model_copy(update=update)


def export_checkpoint(
    ckpt: Checkpoint,
    out: str | Path,
    *,
    formats: tuple[str, ...] = ("onnx",),
    name: str | None = None,
    target_fpr: float = 0.01,
    calibration: bool = True,
    calibration_rows: np.ndarray | None = None,
    calibration_condition: np.ndarray | None = None,
    max_calibration_rows: int | None = None,
    method: str | None = None,
    progress: bool = False,
    seed: int = 0,
    score: AnomalyScoreSpec | None = None,
    latents: np.ndarray | None = None,
) -> Exported:
    """Write ``out/`` atomically: graphs in each format, then ``manifest.json`` with sha256s.

    Args:
        formats: ``"onnx"`` and/or ``"torchscript"``.
        name: the served name (default: the folder's name).
        target_fpr: the calibrated threshold's false-positive rate on normal rows.
        calibration: calibrate the anomaly threshold (False: the model serves no
            ``/anomaly_score``).
        calibration_rows: normal rows in data units (default: the checkpoint's own).
        calibration_condition: a conditional model's condition of ``calibration_rows`` (class
            indices or context rows; default: the checkpoint's own, with its own rows).
        max_calibration_rows: score at most this many of them (a seeded subsample).
        method: the served likelihood method of ODE models (default: the model's), which
            calibration uses too.
        progress: a progress bar while calibrating (an ODE model integrates the PF-ODE per
            row: the longest part of an export).
        score: the anomaly score kind and its parameters (default: ``nll``).
        latents: ``(rows, dim)`` training latents a ``latent`` score stores.
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"unknown export format {bad}; choose from {', '.join(FORMATS)}")
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1); got {target_fpr}")
    out = Path(out)
    cfg, model = ckpt.config, ckpt.model
    rows, condition = _calibration_rows(ckpt, calibration_rows, max_calibration_rows, seed,
                                        calibration_condition) if calibration else (None, None)
    defaults = model.serving_defaults()
    if method is not None:
        methods = family(cfg.family).served_methods(defaults.method)
        if method not in methods:
            raise ValueError(f"method {method!r} does not apply to a {cfg.family} model; "
                             f"choose one of: {', '.join(methods)}")
        defaults = defaults.model_copy(update={"method": method})
    if _straightened(ckpt):
        defaults = defaults.model_copy(update={"solver": "euler", "steps": 2})
    scores = None
    with atomic_directory(out) as tmp:
        graphs = _write_graphs(ckpt, formats, tmp, with_encode=score is not None
                               and score.kind == "latent")
        if latents is not None:
            save_file({"z": np.ascontiguousarray(latents, dtype=np.float32)},
                      str(tmp / LATENTS_FILE))
        manifest = Manifest(
            name=name or out.name,
            family=cfg.family,
            model_type=cfg.model_type,
            dim=cfg.dim,
            event_shape=list(cfg.model.image_shape or [cfg.dim]),
            preprocessing=_describe(ckpt.preprocessor),
            graphs=graphs,
            time=model.time_spec(),
            manifold=model.manifold_spec() if hasattr(model, "manifold_spec") else None,
            tokens=model.token_spec() if hasattr(model, "token_spec") else None,
            noise=model.noise_spec() if hasattr(model, "noise_spec") else None,
            log_det=model.log_det_spec() if hasattr(model, "log_det_spec") else None,
            defaults=defaults,
            calibration=None,
            anomaly=score,
            condition=cfg.condition,
            data=DataInfo(name=cfg.data.name, rows=cfg.data.rows, dim=cfg.data.dim,
                          levels=cfg.data.levels, mean=cfg.data.mean, std=cfg.data.std,
                          columns=cfg.data.columns),
            files={p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
            versions=_versions(),
        )
        if rows is not None:
            scores = _score_rows(tmp, manifest, formats[0], rows, progress, condition)
            manifest = _calibrated(manifest, scores, condition, target_fpr)
        _write_manifest(tmp, manifest)
    return Exported(manifest, scores)


def _describe(pre: nn.Module) -> list[dict[str, Any]]:
    describe = getattr(pre, "describe", None)
    return describe() if callable(describe) else []
