"""Training time with one torch thread against torch's default (every core), side by side.

    python -m bench.threads [--rounds 3]

``genserve train`` runs as a subprocess per (model, threads) pair, the pairs interleaved within
each round so that both settings see the same load; the median wall time over rounds and the
per-round ratio (default / one thread, then its median) go to the ``threads`` section of
docs/BENCHMARKS.md and docs/bench/threads.json, with the load average the run saw: the figures
are about a machine whose cores other processes share, as these are.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import machine_line, markdown_table, write_results

SECTION = "threads"
JSON = Path(__file__).resolve().parents[1] / "docs" / "bench" / "threads.json"
RUNS = (  # (model, data, steps): a vector flow, a vector field model, an image flow
    ("nsf", "moons", 300),
    ("otcfm", "moons", 300),
    ("glow_image", "digits_image", 60),
)
SETTINGS = (1, 0)  # threads: one, and torch's default


def _train(model: str, data: str, steps: int, threads: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "cli", "train", "--model", model, "--data", data, "--steps",
           str(steps), "--threads", str(threads), "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run(rounds: int) -> dict:
    seconds: dict[tuple[str, int], list[float]] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for model, data, steps in RUNS:
                for threads in SETTINGS:
                    loads.append(os.getloadavg()[0])
                    s = _train(model, data, steps, threads, Path(tmp) / f"{model}-{threads}")
                    seconds.setdefault((model, threads), []).append(s)
                    print(f"round {r + 1}/{rounds} {model} threads={threads}: {s:.1f} s",
                          file=sys.stderr)
    rows = []
    for model, data, steps in RUNS:
        one, default = seconds[(model, 1)], seconds[(model, 0)]
        rows.append({"model": model, "data": data, "steps": steps,
                     "one_thread_s": statistics.median(one),
                     "default_s": statistics.median(default),
                     "ratio": statistics.median(d / o for d, o in zip(default, one, strict=True)),
                     "one_thread_all": one, "default_all": default})
    return {"rows": rows, "rounds": rounds, "cores": os.cpu_count(),
            "load_average": {"min": min(loads), "median": statistics.median(loads),
                             "max": max(loads)},
            "command": "python -m bench.threads " + shlex.join(sys.argv[1:]),
            "machine": machine_line()}


def render(res: dict) -> str:
    load = res["load_average"]
    table = markdown_table(
        ["model", "data", "steps", "--threads 1 (s)", "--threads 0 (s)", "0 / 1"],
        [[r["model"], r["data"], r["steps"], f"{r['one_thread_s']:.1f}",
          f"{r['default_s']:.1f}", f"{r['ratio']:.1f}x"] for r in res["rows"]])
    return "\n".join([
        "## Training threads: one torch thread against every core",
        "",
        f"`{res['command']}` ({res['machine']}). `genserve train` as a subprocess, "
        f"`--threads 1` (the default) and `--threads 0` (torch's default: one thread per "
        f"core, {res['cores']} here) interleaved in each of {res['rounds']} rounds; medians of "
        "wall time, and the median over rounds of the per-round ratio. The machine was shared "
        f"while it ran: 1-minute load average {load['min']:.1f} to {load['max']:.1f} "
        f"(median {load['median']:.1f}) on {res['cores']} cores.",
        "",
        table,
        "",
        "Why one thread is the default: torch's OpenMP threads busy-wait for each other at "
        "every operator, so when another process holds a core, each of these small networks' "
        "many short operators waits for a thread that is not running. With cores to spare "
        "(a machine of your own, large image networks), `--threads 0` may be faster; this run "
        "did not measure a quiet machine.",
    ])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    res = run(args.rounds)
    write_results(SECTION, render(res), JSON, res)
    print(render(res))


if __name__ == "__main__":
    main()
