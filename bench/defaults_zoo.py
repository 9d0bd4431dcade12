"""The flow-zoo and OT-CFM targets on gmm2/gmm6/gmm16, trained with the defaults only.

    python -m bench.defaults_zoo [--sets gmm2 gmm6 gmm16] [--flows nsf ...] [--jobs 2]

Issue #30 asks that the existing gmm2/6/16 targets keep holding with the defaults (no per-set
configuration). ``bench.flows`` and ``bench.families`` meet them with configurations of their
own; this runs what a user gets from ``genserve train --model KIND`` (``default_model_config``
and ``default_train_config``) on the same data and budget:

* flows (``bench.flows``' data: 100 000 rows split 80/10/10, seed 0; 3000 steps of batch 256):
  ``nsf``, ``nsf_ar``, ``maf`` and ``resflow``; the best one's gap to the true test
  log-likelihood against ``bench.flows.TARGETS`` (0.01 / 0.05 / 0.25 nats);
* ``otcfm`` (``bench.families``' data: 30 000 rows; same budget): the W2 excess over the
  finite-sample floor at 16 Euler steps, mean of ``bench.families.TARGET_SEEDS`` noise seeds,
  against ``bench.families.OTCFM_TARGET``.

Writes the ``defaults-zoo`` section of ``docs/BENCHMARKS.md`` and
``docs/bench/defaults_zoo.json``; a run of some flows or sets replaces those rows of the
earlier run and keeps the others (each command is listed).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import command_line, machine_line, markdown_table, publish, rerender

SECTION = "defaults-zoo"
SETS = ("gmm2", "gmm6", "gmm16")
FLOWS = ("nsf", "nsf_ar", "maf", "resflow")
STEPS = 3000
BATCH = 256
FLOW_ROWS = 100_000
SEED = 0


def _fit(kind: str, name: str, rows: int) -> Any:
    import torch

    from training.config import default_model_config, default_train_config
    from training.data import load_data
    from training.fit import fit

    torch.set_num_threads(1)
    dim = load_data(name, n=16, seed=SEED).x.shape[1]
    return fit(kind, name, rows=rows, data_seed=SEED, split_seed=SEED,
               model_cfg=default_model_config(kind, dim),
               train_cfg=default_train_config(kind, steps=STEPS, batch_size=BATCH,
                                              seed=SEED, progress=False))


def flow_job(kind: str, name: str) -> dict[str, Any]:
    """Test gap to the truth of ``kind`` trained with its defaults on ``name``."""
    from bench.flows import load_splits
    from training.data import true_log_density
    from training.evaluate import data_log_prob

    start = time.perf_counter()
    ckpt = _fit(kind, name, FLOW_ROWS)
    _, splits = load_splits(name, FLOW_ROWS, SEED)
    x = splits.test
    diff = true_log_density(name)(x) - data_log_prob(ckpt, x, seed=SEED)["log_prob"]
    return {"job": "flow", "kind": kind, "set": name, "gap": float(diff.mean()),
            "gap_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
            "config": ckpt.config.model.model_dump(include={"hidden_features", "hidden_layers",
                                                            "transforms", "bins"}),
            "train_seconds": float(ckpt.config.summary["train_seconds"]),
            "seconds": time.perf_counter() - start}


def otcfm_job(name: str) -> dict[str, Any]:
    """W2 excess of ``otcfm`` trained with its defaults on ``name``, 16 Euler steps."""
    from bench.families import HELD_OUT, ROWS, TARGET_SEEDS, floor_draws, seeded_w2
    from bench.families import load_splits as family_splits

    start = time.perf_counter()
    ckpt = _fit("otcfm", name, ROWS)
    _, splits = family_splits(name, rows=ROWS)
    ref = splits.test[:HELD_OUT]
    floor = float(np.mean(floor_draws(name, ref)))
    w2 = seeded_w2(ckpt, ref, "euler", 16, TARGET_SEEDS)
    return {"job": "otcfm", "kind": "otcfm", "set": name, "excess": w2["w2"] - floor,
            "excess_se": w2["w2_se"], "floor": floor,
            "train_seconds": float(ckpt.config.summary["train_seconds"]),
            "seconds": time.perf_counter() - start}


def _run(job: str, *args: str) -> dict[str, Any]:
    return flow_job(*args) if job == "flow" else otcfm_job(*args)


def render(payload: dict[str, Any]) -> str:
    from bench.families import OTCFM_TARGET, TARGET_SEEDS
    from bench.flows import TARGETS

    res = payload["results"]
    flows = {(r["set"], r["kind"]): r for r in res if r["job"] == "flow"}
    fields = {r["set"]: r for r in res if r["job"] == "otcfm"}
    rows, o_rows = [], []
    for name in payload["sets"]:
        cells = [flows.get((name, k)) for k in FLOWS]
        done = [c for c in cells if c is not None]
        best = min(done, key=lambda c: c["gap"]) if done else None
        rows.append([name] + [f"{c['gap']:.4f} ± {c['gap_se']:.4f}" if c else "–"
                              for c in cells]
                    + ([best["kind"], f"≤ {TARGETS[name]}",
                        "met" if best["gap"] <= TARGETS[name] else "**not met**"]
                       if best else ["–", f"≤ {TARGETS[name]}", "not measured"]))
        f = fields.get(name)
        o_rows.append([name, f"{f['excess']:+.4f} ± {f['excess_se']:.4f}" if f else "–",
                       f"≤ {OTCFM_TARGET[name]}",
                       ("met" if f["excess"] <= OTCFM_TARGET[name] else "**not met**")
                       if f else "not measured"])
    widths = ", ".join(f"{r['set']} {r['kind']} {r['config']['hidden_features']}"
                       for r in res if r["job"] == "flow" and r["kind"] == "nsf")
    runs = "; ".join(f"`{c['command']}` ({c['machine']}; {c['seconds'] / 60:.1f} min)"
                     for c in payload["commands"])
    return "\n".join([
        "## The gmm2/6/16 targets with the defaults (issue #30)", "",
        f"Commands: {runs}. Every model as `genserve train --model KIND` "
        f"builds it (`training.config.default_model_config` / `default_train_config`), "
        f"{STEPS} steps of batch {BATCH}, seed {SEED}; no per-set configuration "
        f"(flow widths by the rule max(128, 4 D): {widths}).", "",
        f"Flows on `bench.flows`' data ({FLOW_ROWS} rows, 80/10/10): gap = true minus model "
        "test log-likelihood (nats, paired s.e.); the zoo's target for the best flow:", "",
        markdown_table(["set", *FLOWS, "best", "target", ""], rows), "",
        f"OT-CFM on `bench.families`' data: W2 excess over the floor at 16 Euler steps "
        f"(2000 samples, mean ± s.e. of {TARGET_SEEDS} noise seeds):", "",
        markdown_table(["set", "otcfm W2 excess", "target", ""], o_rows), ""])


def _merged(json_path: Path, results: list[dict[str, Any]], run: dict[str, Any]
            ) -> dict[str, Any]:
    """This run's rows and the earlier runs' rows of the other (job, model, set) triples."""
    old = (json.loads(json_path.read_text()) if json_path.exists()
           else {"commands": [], "results": []})
    fresh = {(r["job"], r["kind"], r["set"]) for r in results}
    kept = [r for r in old["results"] if (r["job"], r["kind"], r["set"]) not in fresh]
    return {"sets": [s for s in SETS if any(r["set"] == s for r in kept + results)],
            "commands": old["commands"] + [run], "results": kept + results}


def main(argv: list[str] | None = None) -> int:
    from bench.jobs import run_jobs
    from service.progress import progress_bar

    p = argparse.ArgumentParser(prog="python -m bench.defaults_zoo",
                                description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--flows", nargs="+", choices=FLOWS, default=list(FLOWS))
    p.add_argument("--no-otcfm", action="store_true", help="flows only")
    p.add_argument("--jobs", type=int, default=2, help="trainings side by side")
    p.add_argument("--render", action="store_true",
                   help="rewrite the section from docs/bench/defaults_zoo.json without running")
    ns = p.parse_args(argv)
    json_path = Path(__file__).resolve().parents[1] / "docs" / "bench" / "defaults_zoo.json"
    if ns.render:
        rerender(SECTION, render, json_path)
        return 0
    jobs = [("flow", k, s) for s in ns.sets for k in ns.flows] + (
        [] if ns.no_otcfm else [("otcfm", s) for s in ns.sets])
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    with progress_bar(total=len(jobs), desc="bench.defaults_zoo", unit="run") as bar:

        def report(r: dict[str, Any]) -> None:
            results.append(r)
            bar.write(f"{r['set']} {r['kind']}: "
                      + (f"gap {r['gap']:.4f}" if r["job"] == "flow"
                         else f"W2 excess {r['excess']:+.4f}"))
            bar.update()

        run_jobs(_run, jobs, ns.jobs, report)
    run = {"command": command_line("bench.defaults_zoo", argv), "machine": machine_line(),
           "seconds": time.perf_counter() - start}
    print(publish(SECTION, render, json_path, _merged(json_path, results, run)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
