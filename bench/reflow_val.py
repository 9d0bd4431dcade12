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
import math
from dataclasses import replace

import numpy as np


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench import families as F
    from training.data import gaussian_mixture
    from training.metrics import wasserstein2

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="gmm2", choices=F.SETS)
    p.add_argument("--variants", default='[{"u_shape": 0.0}, {"u_shape": 4.0}]',
                   help="JSON list of ReflowPlan overrides")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    _, splits = F.load_splits(ns.set)
    ref = splits.val[:F.HELD_OUT]
    mixture = gaussian_mixture(ns.set)
    floor = float(np.mean([
        wasserstein2(mixture.sample(F.HELD_OUT, np.random.default_rng(F.FLOOR_SEED + k))[0], ref)
        for k in range(F.FLOOR_DRAWS)]))
    teacher = F.train_one("otcfm", ns.set, F.PLANS["otcfm"], F.STEPS)
    print(f"{ns.set} (validation rows): floor {floor:.4f}", flush=True)
    seeds = range(F.SAMPLE_SEED, F.SAMPLE_SEED + F.TARGET_SEEDS)
    for variant in json.loads(ns.variants):
        overrides = {k: v for k, v in variant.items() if k != "train"}
        plan = replace(F.REFLOW, **overrides, train=F.REFLOW.train | variant.get("train", {}))
        student, seconds = F.reflow_one(teacher, plan)
        cells = {}
        for steps in (1, 2, 100):
            w2 = [F._w2(student, ref, "euler", steps, seed)["w2"] for seed in seeds]
            cells[steps] = (float(np.mean(w2)) - floor, float(np.std(w2, ddof=1)) /
                            math.sqrt(len(w2)))
        print(json.dumps(variant), f"reflow {seconds:.0f}s", " ".join(
            f"{k}-step {m:+.4f}±{s:.4f}" for k, (m, s) in cells.items()),
            f"ratio {cells[1][0] / cells[100][0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
