"""Reflow tuning on validation rows only: one OT-CFM teacher, then reflow variants.

``python -m bench.reflow_val --set gmm2 --variants '[{"u_shape": 0}, {"u_shape": 4}]'``

Each variant is a set of :class:`bench.families.ReflowPlan` overrides (``train`` entries
merge into the plan's ``TrainConfig``). Prints the 1-, 2- and 100-step Euler W2 excess over
the floor against validation rows (mean ± s.e. over the target seeds) and the 1-step /
100-step ratio the families target reads. Test rows are never touched.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench import families as F

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="gmm2", choices=F.SETS)
    p.add_argument("--variants", default='[{"u_shape": 0.0}, {"u_shape": 4.0}]',
                   help="JSON list of ReflowPlan overrides")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    _, splits = F.load_splits(ns.set)
    ref = splits.val[:F.HELD_OUT]
    floor = float(np.mean(F.floor_draws(ns.set, ref)))
    teacher = F.train_one("otcfm", ns.set, F.PLANS["otcfm"], F.STEPS)
    print(f"{ns.set} (validation rows): floor {floor:.4f}", flush=True)
    for variant in json.loads(ns.variants):
        overrides = {k: v for k, v in variant.items() if k != "train"}
        plan = replace(F.REFLOW, **overrides, train=F.REFLOW.train | variant.get("train", {}))
        student, seconds = F.reflow_one(teacher, plan)
        cells = {}
        for steps in (1, 2, 100):
            c = F.seeded_w2(student, ref, "euler", steps, F.TARGET_SEEDS)
            cells[steps] = (c["w2"] - floor, c["w2_se"])
        print(json.dumps(variant), f"reflow {seconds:.0f}s", " ".join(
            f"{k}-step {m:+.4f}±{s:.4f}" for k, (m, s) in cells.items()),
            f"ratio {cells[1][0] / cells[100][0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
