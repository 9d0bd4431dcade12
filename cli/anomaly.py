"""``genserve fit-anomaly`` (one-command anomaly model) and ``genserve score`` (bulk scoring)."""

from __future__ import annotations

import argparse
import json
import sys

from cli.options import add_progress_arg
from service.scoring import score_file
from training.anomaly import SCORES, fit_anomaly, format_summary

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit-anomaly", help="one-command anomaly model from normal rows "
                       "(trained, calibrated, exported)")
    p.add_argument("data", help=".csv/.npy/.npz of normal rows (.npz with y: its y == 0 rows)")
    p.add_argument("--out", required=True, help="artifact directory (served name = folder)")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="share of normal rows the threshold flags (0.01)")
    p.add_argument("--model", nargs="+", help="model type(s) to try instead of the defaults")
    p.add_argument("--ensemble", type=int, default=1,
                   help="seeds per candidate; above 1 the served model is an equal-weight "
                        "mixture of them (exact density), chosen by validation NLL (1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--smoothing-search", nargs="+", type=float, metavar="S",
                   help="train the winning model type again with Gaussian smoothing of S "
                        "standard deviations on every column (each in (0, 2]) and keep the "
                        "lowest validation NLL (default 0.2 0.5; none with --ensemble)")
    g.add_argument("--no-smoothing-search", dest="smoothing_search", action="store_const",
                   const=[], help="train the candidates unsmoothed only")
    p.add_argument("--steps", type=int, help="cap on optimizer steps per candidate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["onnx", "torchscript", "both"], default="onnx")
    p.add_argument("--score", choices=["auto", *SCORES], default="nll",
                   help="served anomaly score kind; auto: chosen on normal rows "
                   "(docs/anomaly-selection-protocol.md)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget in seconds: fewer "
                   "candidates past a share of it (the summary says which)")
    add_progress_arg(p)
    p.set_defaults(run=fit)

    p = sub.add_parser("score", help="score a file in chunks: CSV of score, percentile, "
                       "is_anomaly per row (the numbers /anomaly_score returns)")
    p.add_argument("--model", required=True, help="artifact directory")
    p.add_argument("--in", dest="in_path", required=True, help=".csv/.npy/.npz rows to score")
    p.add_argument("--out", required=True, help="CSV to write (atomically)")
    p.add_argument("--chunk-rows", type=int, default=65536, help="rows read at a time")
    p.add_argument("--per-dim", action="store_true", help="scores in nats per dimension")
    p.add_argument("--target-fpr", type=float, help="override the calibrated rate")
    p.set_defaults(run=score)


def fit(ns: argparse.Namespace) -> int:
    formats = ("onnx", "torchscript") if ns.format == "both" else (ns.format,)
    summary = fit_anomaly(ns.data, ns.out, target_fpr=ns.target_fpr, seed=ns.seed,
                          ensemble=ns.ensemble, model=ns.model, steps=ns.steps,
                          smoothing_search=ns.smoothing_search, formats=formats,
                          progress=not ns.no_progress, score=ns.score,
                          budget_s=ns.budget_s)
    print(format_summary(summary), file=sys.stderr)
    return 0


def score(ns: argparse.Namespace) -> int:
    out = score_file(ns.model, ns.in_path, ns.out, chunk_rows=ns.chunk_rows,
                     per_dim=ns.per_dim, target_fpr=ns.target_fpr)
    print(json.dumps(out), file=sys.stderr)
    return 0
