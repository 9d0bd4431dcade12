"""``genserve data``: list the named data sets, or write one to a file."""

from __future__ import annotations

import argparse
import sys

from training.data import DATASETS, load_data, save_data

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="write a named data set to .npy or .csv")
    p.add_argument("name", nargs="?", help="data set name")
    p.add_argument("--out", help="file to write (.npy or .csv)")
    p.add_argument("--rows", type=int, help="rows for generated sets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the named sets")
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    if ns.list or ns.name is None:
        for name, spec in DATASETS.items():
            print(f"{name:14s} {spec.summary}")
        return 0
    if ns.out is None:
        raise ValueError("give --out FILE (.npy or .csv) to write the data set")
    data = load_data(ns.name, n=ns.rows, seed=ns.seed)
    save_data(data.x, ns.out)
    print(f"wrote {ns.out}: {data.x.shape[0]} rows x {data.x.shape[1]} columns", file=sys.stderr)
    return 0
