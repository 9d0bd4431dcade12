"""``genserve evaluate``: JSON on stdout, test log-likelihood, sample quality and speed."""

from __future__ import annotations

import argparse
import json

from artifact.tables import read_table
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.data import check_dim
from training.evaluate import THREADS, evaluate
from training.train import intra_op_threads

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
    p.add_argument("--threads", type=_threads, default=THREADS,
                   help=f"torch CPU threads ({THREADS}, as `train`; 0: torch's default, one "
                   "per core)")
    p.set_defaults(run=run)


def _threads(text: str) -> int:
    """A thread count as ``TrainConfig.threads`` takes it (its bounds are set there)."""
    try:
        return TrainConfig(threads=int(text)).threads
    except ValueError:  # not an integer, or out of TrainConfig.threads' bounds
        raise argparse.ArgumentTypeError(f"{text!r} is not a thread count; give an integer "
                                         f"from 0 (torch's default) to {_MAX_THREADS}") from None


_MAX_THREADS = next(m.le for m in TrainConfig.model_fields["threads"].metadata
                    if getattr(m, "le", None) is not None)


def run(ns: argparse.Namespace) -> int:
    ckpt = load_checkpoint(ns.checkpoint)
    x = None
    if ns.data is not None:
        x = read_table(ns.data).x
        check_dim(x, ckpt.config.dim, ns.data)
    with intra_op_threads(ns.threads):  # its timings too: see `train --threads`
        report = evaluate(ckpt, x, method=ns.method, steps=ns.steps, solver=ns.solver,
                          samples=ns.samples, seed=ns.seed)
    print(json.dumps(report, indent=2))
    return 0
