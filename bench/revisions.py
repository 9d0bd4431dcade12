"""Serving speed of two revisions side by side: this checkout against ``--before``.

    python -m bench.revisions --before main [--rounds 3] [--duration 6]

Checks ``--before`` out into a temporary git worktree and serves the same committed models
from each revision in turn with ``genserve serve`` (its default: gRPC served by the same
worker); a revision from before the ``cli`` package is served by ``bentoml serve
service.api:GenServe`` (HTTP only). Each round takes every ``bench.serving`` scenario (nsf
and the PF-ODE, 1-row and 64-row ``log_likelihood``) at each concurrency on a fresh server of
each revision, the revisions alternating which goes first; every load is ``wrk`` after a
warm-up and a drain (``bench.serving._measured``). The after/before ratio is taken within
each round and its median reported (the machine is shared: ratios, not absolutes). Writes
docs/bench/revisions.json and the "revisions" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.report import machine_line, markdown_table, write_section
from bench.serving import _measured, scenarios
from service.devserver import running_server

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench"
ENV = {"GENSERVE_MAX_LATENCY_MS": "30000"}  # as bench.serving: overload answers are not a rate


@contextmanager
def worktree(ref: str) -> Iterator[tuple[Path, str]]:
    """A detached worktree of ``ref`` and its short hash; removed on exit."""
    path = Path(tempfile.mkdtemp(prefix="genserve-before-")) / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=ROOT,
                   check=True, capture_output=True)
    try:
        short = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, check=True,
                               capture_output=True, text=True).stdout.strip()
        yield path, short
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT,
                       check=False, capture_output=True)


def _head() -> str:
    """This checkout's short hash, marked when files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + (" + changes" if git("status", "--porcelain",
                                                                       "--untracked-files=no")
                                                   else "")


def measure(before: Path, rounds: int, duration: int, concurrency: list[int]) -> list[dict]:
    models = ROOT / "exported_models"
    logs = Path(tempfile.mkdtemp(prefix="revisions-"))
    # a revision with the `cli` package serves as `genserve serve` does; an older one's
    # service module is served by BentoML alone (HTTP only)
    old = None if (before / "cli" / "serve.py").exists() else "service.api:GenServe"
    sides = {"before": {"service": old, "root": before},
             "after": {"service": None, "root": ROOT}}
    rows = []
    for k in range(rounds):
        for s in scenarios(models):
            order = ("before", "after") if k % 2 == 0 else ("after", "before")
            for side in order:
                with running_server(models, logs / f"{side}.log", env=ENV,
                                    **sides[side]) as server:
                    for c in concurrency:
                        r = _measured(f"{server.url}/log_likelihood", s["body"], c, duration)
                        rows.append(r | {"side": side, "round": k, "scenario": s["name"],
                                         "rows": s["rows"], "concurrency": c})
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per scenario and concurrency: median rows/s and p99 of each side, and the median (min,
    max) of the per-round after/before ratios of rows/s."""
    out = []
    cells = dict.fromkeys((r["scenario"], r["concurrency"]) for r in rows)
    for scenario, c in cells:
        def pick(side: str, scenario: str = scenario, c: int = c) -> list[dict]:
            return sorted((r for r in rows if (r["scenario"], r["concurrency"], r["side"])
                           == (scenario, c, side)), key=lambda r: r["round"])
        before, after = pick("before"), pick("after")
        ratios = [a["rps"] / b["rps"] for b, a in zip(before, after, strict=True)]
        out.append({"scenario": scenario, "concurrency": c,
                    **{f"{side}_{k}": statistics.median(r[k] * (r["rows"] if k == "rps" else 1)
                                                        for r in runs)
                       for side, runs in (("before", before), ("after", after))
                       for k in ("rps", "p99_ms")},
                    "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "errors": sum(r["errors"] + r["timeouts"] for r in before + after)})
    return out


def markdown(data: dict) -> str:
    table = markdown_table(
        ["request", "concurrency", "rows/s before", "rows/s after",
         "after / before (range over rounds)", "p99 ms before / after", "non-2xx + timeouts"],
        [[s["scenario"], s["concurrency"], f"{s['before_rps']:.0f}", f"{s['after_rps']:.0f}",
          f"**{s['ratio']:.2f}x** ({s['ratio_min']:.2f}–{s['ratio_max']:.2f})",
          f"{s['before_p99_ms']:.1f} / {s['after_p99_ms']:.1f}", s["errors"]]
         for s in data["summary"]])
    slower = [s for s in data["summary"] if s["ratio_max"] < 1.0]
    verdict = ("No cell is slower in every round." if not slower else
               "Slower in every round: " + "; ".join(
                   f"{s['scenario']} at {s['concurrency']} ({s['ratio']:.2f}x)" for s in slower)
               + ".")
    return f"""## Serving speed across a change: {data['before']} (before), {data['after']} (after)

Reproduce: `{data['command']}` ({data['machine']}). The same committed models served by each
revision on a fresh server ({data.get('before_served', 'genserve serve')} in a worktree of
the before revision; `genserve serve`, gRPC on, in the after one), {data['rounds']} rounds,
the revisions alternating which goes first; `wrk` for {data['duration']} s after a warm-up,
1 worker. Medians over the rounds; the ratio is the median of per-round ratios.

{table}

{verdict}
"""


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` stops the servers
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", help="git revision to compare against (required to measure)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (3)")
    p.add_argument("--duration", type=int, default=6, help="seconds per load (6)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--section", default="revisions",
                   help="the docs/BENCHMARKS.md section and docs/bench/SECTION.json (revisions)")
    p.add_argument("--from-json", action="store_true",
                   help="re-render the section from its JSON; measure nothing")
    ns = p.parse_args(argv)
    path = BENCH / f"{ns.section}.json"
    if ns.from_json:
        data = json.loads(path.read_text())
    else:
        if ns.before is None:
            p.error("--before is required (or --from-json)")
        with worktree(ns.before) as (path, short):
            rows = measure(path, ns.rounds, ns.duration, ns.concurrency)
            served = ("genserve serve" if (path / "cli" / "serve.py").exists()
                      else "`bentoml serve service.api:GenServe` (HTTP only)")
        data = {"command": "python -m bench.revisions " + " ".join(
            sys.argv[1:] if argv is None else argv), "machine": machine_line(),
            "before": f"{ns.before} ({short})", "after": _head(), "before_served": served,
            "rounds": ns.rounds, "duration": ns.duration, "rows": rows, "summary": summary(rows)}
        path.write_text(json.dumps(data, indent=1) + "\n")
    write_section(ns.section, markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
