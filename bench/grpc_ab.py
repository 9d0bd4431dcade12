"""The gRPC forwarder before and after a change, side by side on one HTTP server.

    python -m bench.grpc_ab --before b2e1cd2 [--rounds 3] [--duration 8]

Starts one genserve HTTP service and two gRPC forwarders in front of it: this checkout's
``service.grpc.server`` and the one of git revision ``--before`` (its file, run as a module
beside this checkout's other modules). Each round loads each forwarder in turn with 1-row nsf
``log_likelihood`` calls at each concurrency (`bench.serving.grpc_load`), reading the
forwarder's CPU from /proc around the run. Prints per-round figures and the medians, and the
after/before ratios taken within each round (the machine is shared: ratios, not absolutes);
writes docs/bench/grpc_ab.json and the 'grpc-ab' section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import machine_line, markdown_table, write_results
from bench.serving import forwarder_load, start_forwarder
from service.devserver import running_server, stop

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "moons-nsf", "x": [[0.125, 0.25]]}
JSON_PATH = ROOT / "docs" / "bench" / "grpc_ab.json"
SECTION = "grpc-ab"


def render(payload: dict) -> str:
    """The section: medians over the rounds and after/before ratios taken within each round."""
    rows, rounds = payload["rows"], payload["rounds"]

    def pick(rnd: int, side: str, c: int) -> dict:
        return next(r for r in rows if (r["round"], r["side"], r["concurrency"]) == (rnd, side, c))

    table = []
    for c in payload["concurrency"]:
        def med(side: str, key: str, c: int = c) -> float:
            return statistics.median(pick(k, side, c)[key] for k in range(rounds))
        ratios = [pick(k, "after", c)["rps"] / pick(k, "before", c)["rps"] for k in range(rounds)]
        table.append([c, f"{med('before', 'rps'):.0f}", f"{med('after', 'rps'):.0f}",
                      f"**{statistics.median(ratios):.2f}x** "
                      f"({min(ratios):.2f}-{max(ratios):.2f})",
                      f"{med('before', 'p50_ms'):.1f} / {med('after', 'p50_ms'):.1f}",
                      f"{med('before', 'forwarder_cpu_ms_per_call'):.2f} / "
                      f"{med('after', 'forwarder_cpu_ms_per_call'):.2f}"])
    head = ["concurrency", "calls/s before", "calls/s after",
            f"after / before (median of {rounds} rounds, min-max)", "p50 ms before / after",
            "forwarder CPU ms per call, before / after"]
    return f"""### gRPC forwarder before and after its HTTP client change, side by side

Reproduce: `{payload['command']}` ({payload['machine']}). One HTTP service, two forwarders
in front of it (revision {payload['before']}'s, httpx; this checkout's, aiohttp), loaded in
turn with 1-row nsf `log_likelihood` calls for {payload['duration']} s each, {rounds} rounds.

{markdown_table(head, table)}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision of the 'before' forwarder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=8, help="seconds per load (8)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ns = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so `finally` stops the servers and removes the copied file
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    old = subprocess.run(["git", "show", f"{ns.before}:service/grpc/server.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    old_path = ROOT / "service" / "_grpc_server_before.py"  # removed in `finally`
    old_path.write_text(old)
    sides = {"before": "service._grpc_server_before", "after": "service.grpc.server"}
    rows: list[dict] = []
    log = Path(tempfile.mkdtemp()) / "server.log"
    try:
        with running_server(ROOT / "exported_models", log,
                            env={"GENSERVE_MAX_LATENCY_MS": "30000"}) as server:
            procs = {k: start_forwarder(server.url, m) for k, m in sides.items()}
            time.sleep(4)
            try:
                for rnd in range(ns.rounds):
                    for c in ns.concurrency:
                        for side, (proc, port) in procs.items():
                            r = forwarder_load(proc, port, BODY, c, ns.duration)
                            r |= {"round": rnd, "side": side, "concurrency": c}
                            rows.append(r)
                            print(json.dumps(r), flush=True)
            finally:
                for proc, _ in procs.values():
                    stop(proc, grace_s=10)
    finally:
        old_path.unlink(missing_ok=True)
    payload = {"command": "python -m bench.grpc_ab " + " ".join(
        sys.argv[1:] if argv is None else argv), "machine": machine_line(),
        "before": ns.before, "rounds": ns.rounds, "duration": ns.duration,
        "concurrency": ns.concurrency, "rows": rows}
    markdown = render(payload)
    print(markdown)
    write_results(SECTION, markdown, JSON_PATH, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
