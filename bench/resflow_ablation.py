"""Why the residual flow trails NSF at the reduced budget: one change at a time.

    python -m bench.resflow_ablation [--sets gmm2 8gaussians] [--steps 400] [--rows 5000]

The reduced-budget comparison (``python -m bench.flows ... --steps 400 --rows 5000``, section
"flows-subset") trains every model at the zoo plans' learning rate 1e-3. This benchmark trains
the residual flow of that comparison (hidden 64, 2 layers, 4 blocks, Lipschitz coefficient 0.9,
the Russian-roulette log-det) on the same rows and seed, changing one thing per row:

* ``exact log-det``: the training loss uses the exact log-det that ``log_prob`` serves (the
  full Jacobian and its determinant, what Chen et al. 2019 call brute force on 2-D toys)
  instead of the roulette estimator: if the estimator's variance held training back, this
  row closes the gap;
* ``Lipschitz 0.97``: each layer's spectral-norm coefficient (so each block's bound) nearer 1;
* ``16 blocks``: four times the depth;
* ``lr 1e-2`` and ``lr 1e-2, Lipschitz 0.97``: a higher peak learning rate.

Writes the ``resflow-ablation`` section of ``docs/BENCHMARKS.md`` and
``docs/bench/resflow_ablation.json``; ``--render`` rewrites the section from that file.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "bench" / "resflow_ablation.json"
SECTION = "resflow-ablation"

VARIANTS: list[tuple[str, dict[str, Any], bool]] = [
    # (label, Plan / Arch changes, train on the exact log-det)
    ("reduced plan (lr 1e-3, Lipschitz 0.9, roulette)", {}, False),
    ("exact log-det", {}, True),
    ("Lipschitz 0.97", {"arch": {"lipschitz": 0.97}}, False),
    ("16 blocks", {"arch": {"transforms": 16}}, False),
    ("lr 1e-2", {"lr": 1e-2}, False),
    ("lr 1e-2, Lipschitz 0.97", {"lr": 1e-2, "arch": {"lipschitz": 0.97}}, False),
]


@contextlib.contextmanager
def exact_log_det_training() -> Iterator[None]:
    """While open, ``ResidualFlow.training_loss`` is the negative exact log-likelihood (the
    served ``log_prob``) in place of the roulette estimate, after the same power iteration
    per step (``training_loss`` itself runs it)."""
    from training.flows.residual import ResidualFlow

    roulette = ResidualFlow.estimated_log_prob

    def exact(self: Any, x: Any, generator: Any = None, context: Any = None) -> Any:
        return self.log_prob(x, context=context)

    ResidualFlow.estimated_log_prob = exact  # type: ignore[method-assign]
    try:
        yield
    finally:
        ResidualFlow.estimated_log_prob = roulette  # type: ignore[method-assign]


def gaussian_fit(name: str, rows: int) -> dict[str, Any]:
    """The row of the Gaussian with the training rows' mean and covariance: what the residual
    flow is at initialisation (every ``g = 0``, ActNorm standardising the rows)."""
    import numpy as np
    from scipy.stats import multivariate_normal

    from bench.flows import load_splits
    from training.data import true_log_density

    _, splits = load_splits(name, rows)
    fitted = multivariate_normal(splits.train.mean(0), np.cov(splits.train.T, bias=True))

    def gap(x: Any) -> Any:
        return true_log_density(name)(x) - fitted.logpdf(x)

    diff = gap(splits.test)
    return {"set": name, "variant": "Gaussian fit of the training rows (no training)",
            "gap": float(diff.mean()), "gap_se": float(diff.std(ddof=1) / len(diff) ** 0.5),
            "val_gap": float(gap(splits.val).mean()), "steps": 0,
            "seconds_per_1000_steps": None}


def run(name: str, steps: int, rows: int) -> list[dict[str, Any]]:
    from bench.flows import PLANS, run_one, subset_plan

    base = subset_plan(PLANS[name], steps, rows)
    out = [gaussian_fit(name, rows)]
    for label, changes, exact in VARIANTS:
        plan = replace(base, **{k: v for k, v in changes.items() if k != "arch"},
                       arch=replace(base.arch, **changes.get("arch", {})))
        with exact_log_det_training() if exact else contextlib.nullcontext():
            res = run_one("resflow", name, plan)
        t = res["test"]
        out.append({"set": name, "variant": label, "gap": t["gap"], "gap_se": t["gap_se"],
                    "val_gap": res["val"]["gap"], "steps": res["steps_run"],
                    "seconds_per_1000_steps": res["seconds_per_1000_steps"],
                    "model": res["model"], "train": res["train"]})
        print(f"[resflow-ablation] {name:>10} {label}: test gap {t['gap']:.4f} ± "
              f"{t['gap_se']:.4f}", flush=True)
    return out


def render(payload: dict[str, Any]) -> str:
    from bench.report import markdown_table

    rows = [[r["set"], r["variant"], f"{r['gap']:.4f} ± {r['gap_se']:.4f}",
             f"{r['val_gap']:.4f}", r["steps"],
             "–" if r["seconds_per_1000_steps"] is None else f"{r['seconds_per_1000_steps']:.1f}"]
            for r in payload["results"]]
    return "\n".join([
        "## Residual flow at the reduced budget: one change at a time (issue #24)",
        "",
        f"Reproduce: `{payload['command']}` ({payload['machine']}; {payload['wall']:.0f} s "
        "wall). The residual flow of the reduced-budget section (hidden 64, 2 layers, 4 blocks "
        f"of ActNorm + residual block, {payload['steps']} steps of batch 256 on "
        f"{payload['rows']} rows, seed 0), one change per row; gap = true − model test "
        "log-likelihood (nats, paired s.e.).",
        "",
        markdown_table(["set", "variant", "test gap ± s.e.", "val gap", "steps",
                        "s / 1000 steps"], rows),
        "",
        NOTES,
    ]).rstrip() + "\n"


NOTES = """\
What it shows. At initialisation every residual block is the identity (its last layer is
zero) and ActNorm standardises the rows, so the flow is the Gaussian fit of the training
rows (first row of each set), a point where the likelihood's gradient with respect to `g` is
small (for Gaussian rows it vanishes: Stein's identity). At lr 1e-3 the flow barely leaves
it in 400 steps: on 8gaussians every lr-1e-3 variant ends at the Gaussian fit's gap, whatever
the estimator, coefficient or depth, and on gmm2 within 0.06 nats of it. Training on the
exact log-det instead of the roulette estimator changes the gap by about 0.01 nats, so the
estimator's variance is not what holds the flow back; the learning rate is, and a
coefficient nearer 1 helps once the flow moves. The flow zoo's `--tune` rows choose the
residual flow's rate at the full budget on the validation split
(`python -m bench.flows --only resflow ... --tune`).
"""


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench.report import command_line, machine_line, publish, rerender

    parser = argparse.ArgumentParser(prog="python -m bench.resflow_ablation",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["gmm2", "8gaussians"],
                        choices=["gmm2", "8gaussians", "checkerboard"])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--render", action="store_true", help="rewrite the section from "
                        f"{JSON_PATH.relative_to(ROOT)} only")
    args = parser.parse_args(argv)
    if args.render:
        rerender(SECTION, render, JSON_PATH)
        return 0
    torch.set_num_threads(1)
    start = time.perf_counter()
    results = [r for name in args.sets for r in run(name, args.steps, args.rows)]
    publish(SECTION, render, JSON_PATH, {
        "command": command_line("bench.resflow_ablation", argv), "machine": machine_line(),
        "steps": args.steps, "rows": args.rows, "wall": time.perf_counter() - start,
        "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
