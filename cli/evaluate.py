"""``genserve evaluate``: JSON on stdout, test log-likelihood, sample quality and speed."""

from __future__ import annotations

import argparse
import json

from artifact.tables import read_table
from training.checkpoint import load_checkpoint
from training.data import check_dim
from training.evaluate import evaluate

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="print JSON: test log-likelihood, samples, speed")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--data", help=".npy/.npz/.csv to score instead of the test split")
    p.add_argument("--method", choices=["exact", "hutchinson"], help="divergence (ODE models)")
    p.add_argument("--solver", help="ODE/diffusion solver for likelihood and samples")
    p.add_argument("--steps", type=int, help="solver steps (adaptive dopri5 when unset)")
    p.add_argument("--samples", type=int, default=2000, help="samples for W2 and speed (2000)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    ckpt = load_checkpoint(ns.checkpoint)
    x = None
    if ns.data is not None:
        x = read_table(ns.data).x
        check_dim(x, ckpt.config.dim, ns.data)
    report = evaluate(ckpt, x, method=ns.method, steps=ns.steps, solver=ns.solver,
                      samples=ns.samples, seed=ns.seed)
    print(json.dumps(report, indent=2))
    return 0
