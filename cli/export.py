"""``genserve export``: a checkpoint -> a served artifact (manifest + graphs), calibrated."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from artifact.repository import version_target
from cli.options import add_progress_arg
from training.checkpoint import load_checkpoint
from training.export import export_checkpoint

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a served artifact (manifest + graphs)",
        description="Write the graphs of a checkpoint, then calibrate the anomaly threshold: "
        "the checkpoint's held-out rows are scored through the written graphs, as the service "
        "scores them. For flows that is one pass per row (seconds); diffusion and "
        "flow-matching models integrate the probability-flow ODE per row (tens to hundreds "
        "of graph calls, and D passes per call with the exact trace: minutes for image "
        "models). Bound it with --calibration-rows or --method hutchinson, or skip it with "
        "--no-calibration.")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--format", choices=["onnx", "torchscript", "both"], default="onnx")
    p.add_argument("--out", required=True, help="model folder, e.g. exported_models/NAME")
    p.add_argument("--version", type=int, metavar="N",
                   help="write version N of the model: NAME/N/ (version 1 of a new folder: "
                   "flat files in NAME/, as before versions); default: the next free one, "
                   "so exporting into an existing model folder adds a version")
    p.add_argument("--name", help="served model name (default: the --out folder's name)")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="anomaly threshold's false-positive rate on normal data (0.01)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--calibration-rows", type=int, metavar="N",
                   help="calibrate on at most N of the checkpoint's held-out rows (all, up "
                        "to 10000; cost is linear in N)")
    g.add_argument("--no-calibration", action="store_true",
                   help="no threshold: the model will not serve /anomaly_score")
    p.add_argument("--method", choices=["exact", "hutchinson"],
                   help="ODE models: the served likelihood method, used to calibrate too "
                        "(hutchinson: probes instead of D passes per step; default: exact, "
                        "hutchinson for images)")
    add_progress_arg(p)
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    if ns.calibration_rows is not None and ns.calibration_rows < 1:
        raise ValueError(f"--calibration-rows must be >= 1; got {ns.calibration_rows}")
    formats = ("onnx", "torchscript") if ns.format == "both" else (ns.format,)
    folder = Path(ns.out)
    out, version = version_target(folder, ns.version)
    exported = export_checkpoint(
        load_checkpoint(ns.checkpoint), out, formats=formats, name=ns.name or folder.name,
        target_fpr=ns.target_fpr, calibration=not ns.no_calibration,
        max_calibration_rows=ns.calibration_rows, method=ns.method,
        progress=not ns.no_progress)
    m = exported.manifest
    calibrated = (f", threshold {m.calibration.threshold:.4g} nats on {m.calibration.rows} rows"
                  if m.calibration else ", not calibrated")
    print(f"exported {m.name} version {version} ({m.family} {m.model_type}) to {out}: "
          f"{', '.join(sorted(m.graphs))} as {', '.join(formats)}{calibrated}", file=sys.stderr)
    return 0
