"""Live version swaps under load: time to serve a new version, p99 during swaps, lost requests.

``python -m bench.versions`` serves ``exported_models/moons-nsf`` (version 1, flat) from a
temporary models directory with a real 2-worker ``genserve serve`` polling it every
``--poll-s`` seconds, and drives ``/log_likelihood`` (8 rows) with ``wrk`` (a C load
generator) at ``--connections``. Each round runs the same load twice, side by side on the
same server: once with no swap, once while ``--swaps-per-round`` new versions land, one
every ``--every-s`` seconds. A version lands as operators are told to copy one in (its files
into a hidden folder, then one rename to ``NAME/VERSION``); the version before the previous
one is removed then, so old versions also retire under load. Measured per swap: seconds from
the rename to every worker serving the new version (each worker's log line ``model NAME
serves version N``, read from the server log every 20 ms; ``/metrics``' per-worker
``genserve_model_version`` is checked once at the end); per run: p99 (wrk's
latency distribution) and requests lost (non-2xx answers and socket errors). Writes
docs/bench/versions.json and the "versions" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from bench.report import machine_line, markdown_table, write_section
from bench.serving import wrk
from service.devserver import Server, running_server

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench"
MODEL = "moons-nsf"
WORKERS = 2
BODY = {"model": MODEL, "x": np.random.default_rng(0).normal(0.3, 0.7, (8, 2)).round(4).tolist()}
TARGET_P99_RATIO = 1.2


def served_versions(server: Server) -> list[float]:
    """Each worker's served version of the model, from ``/metrics`` (checked once a swap has
    converged: scraping it every few milliseconds would itself load the workers)."""
    from prometheus_client.parser import text_string_to_metric_families

    _, _, raw = server.exchange("GET", "/metrics", timeout=10)
    return [s.value for family in text_string_to_metric_families(raw.decode())
            for s in family.samples
            if s.name == "genserve_model_version" and s.labels.get("model") == MODEL]


class ServerLog:
    """The server's log, read as it grows: each worker logs ``model NAME serves version N``
    the moment it publishes a new default, so counting those lines costs the server
    nothing."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.text = path, 0, ""

    def count(self, line: str) -> int:
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            new = fh.read()
        self.offset += len(new)
        self.text += new.decode(errors="replace")
        return self.text.count(line)


def server_cpu_s(server: Server) -> float:
    """CPU seconds (user + system) the server's processes have used so far."""
    total = 0.0
    root = psutil.Process(server.proc.pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def loaded(server: Server, url: str, connections: int, duration: int) -> dict:
    """One wrk run, and the server's CPU seconds per 1000 answers during it."""
    before = server_cpu_s(server)
    result = wrk(url, BODY, connections, duration)
    spent = server_cpu_s(server) - before
    result["server_cpu_ms_per_request"] = 1000 * spent / max(1.0, result["rps"] * duration)
    return result


def land(folder: Path, version: int, source: Path) -> None:
    """Copy ``source``'s files into ``folder/.VERSION.tmp``, then rename it into place."""
    tmp = folder / f".{version}.tmp"
    tmp.mkdir()
    for f in source.iterdir():
        if f.is_file():
            shutil.copy2(f, tmp / f.name)
    tmp.rename(folder / str(version))


def wait_served(log: ServerLog, version: int, limit_s: float) -> float:
    """Seconds until every worker serves ``version`` (inf past ``limit_s``)."""
    start = time.monotonic()
    line = f"model {MODEL} serves version {version} "
    while time.monotonic() - start < limit_s:
        if log.count(line) >= WORKERS:
            return time.monotonic() - start
        time.sleep(0.02)
    return float("inf")


def swapper(log: ServerLog, folder: Path, source: Path, first: int, count: int,
            every_s: float, into: list[dict]) -> None:
    """Land versions ``first .. first+count-1``, one every ``every_s``; record each."""
    for version in range(first, first + count):
        started = time.monotonic()
        land(folder, version, source)
        seconds = wait_served(log, version, limit_s=60)
        into.append({"version": version, "seconds_to_all_workers": seconds})
        old = folder / str(version - 2)
        if old.is_dir():
            shutil.rmtree(old)  # retired while the load goes on
        time.sleep(max(0.0, every_s - (time.monotonic() - started)))


def measure(rounds: int, duration: int, connections: int, swaps: int, every_s: float,
            poll_s: float) -> dict:
    source = ROOT / "exported_models" / MODEL
    with tempfile.TemporaryDirectory(prefix="bench-versions-") as tmp:
        models = Path(tmp) / "models"
        shutil.copytree(source, models / MODEL)
        env = {"GENSERVE_WORKERS": str(WORKERS), "GENSERVE_MODELS_POLL_S": str(poll_s),
               "GENSERVE_ACCESS_LOG": "false"}
        runs, swapped = [], []
        with running_server(models, Path(tmp) / "server.log", env=env) as server:
            log = ServerLog(server.log)
            url = server.url + "/log_likelihood"
            wrk(url, BODY, connections, 3)  # warm-up
            version = 2
            for r in range(rounds):
                runs.append({"round": r, "swaps": 0,
                             **loaded(server, url, connections, duration)})
                done: list[dict] = []
                thread = threading.Thread(target=swapper, args=(
                    log, models / MODEL, source, version, swaps, every_s, done))
                thread.start()
                result = loaded(server, url, connections, duration)
                thread.join()
                runs.append({"round": r, "swaps": len(done), **result})
                swapped += done
                version += swaps
                print(json.dumps(runs[-2:]), file=sys.stderr, flush=True)
            final = served_versions(server)
    return {"runs": runs, "swaps": swapped, "final_versions": final,
            "final_converged": final == [version - 1] * WORKERS}


def summary(data: dict) -> dict:
    runs, swaps = data["runs"], data["swaps"]
    ratios = [b["p99_ms"] / a["p99_ms"] for a, b in zip(runs[::2], runs[1::2], strict=True)]
    seconds = [s["seconds_to_all_workers"] for s in swaps]
    lost = sum(r["errors"] + r["socket_errors"] for r in runs if r["swaps"])
    cpu = [b["server_cpu_ms_per_request"] / a["server_cpu_ms_per_request"]
           for a, b in zip(runs[::2], runs[1::2], strict=True)]
    rps = [b["rps"] / a["rps"] for a, b in zip(runs[::2], runs[1::2], strict=True)]
    return {
        "swaps": len(swaps),
        "cpu_per_request_ratio": statistics.median(cpu),
        "rps_ratio": statistics.median(rps),
        "to_all_workers_s": {"median": statistics.median(seconds), "max": max(seconds)},
        "p99_ratio": {"median": statistics.median(ratios), "min": min(ratios),
                      "max": max(ratios)},
        "lost_during_swaps": lost,
        "lost_without": sum(r["errors"] + r["socket_errors"] for r in runs if not r["swaps"]),
    }


def markdown(data: dict) -> str:
    s, cfg = data["summary"], data["config"]
    ratio = s["p99_ratio"]
    rows = [[r["round"], "yes" if r["swaps"] else "no", r["swaps"], r["rps"], r["p50_ms"],
             r["p99_ms"], r["server_cpu_ms_per_request"], r["errors"] + r["socket_errors"]]
            for r in data["runs"]]
    quiet = [r["p99_ms"] for r in data["runs"] if not r["swaps"]]
    spread = max(quiet) / min(quiet)  # how much p99 moves between runs without a swap
    verdict = (f"not resolved: p99 without a swap moved {spread:.1f}x between rounds"
               if spread > 1.5 else "met" if ratio["median"] <= TARGET_P99_RATIO else "missed")
    within = s["to_all_workers_s"]["max"] <= cfg["poll_s"]
    return f"""## Live version swaps under load

`{data['command']}` ({data['machine']}). A real 2-worker `genserve serve` following its
models directory within {cfg['poll_s']} s (`GENSERVE_MODELS_POLL_S`: each worker reads it every
{cfg['poll_s'] / 4:g} s); `wrk` at {cfg['connections']}
connections on `/log_likelihood` (8 rows of `moons-nsf`), {cfg['duration']} s per run; each
round is one run without a swap and one while {cfg['swaps']} new versions land (one every
{cfg['every_s']} s: files copied into a hidden folder, one rename into `moons-nsf/N/`; the
version before the previous one removed), on the same server, client and server sharing
the 2 cores.

- **Landing to every worker serving it**: median {s['to_all_workers_s']['median']:.2f} s,
  max {s['to_all_workers_s']['max']:.2f} s over {s['swaps']} swaps; target within one
  interval ({cfg['poll_s']} s): **{'met' if within else 'missed'}**. A worker reads the
  directory every quarter interval, then checks the version it finds (sha256 of every
  file, its graphs opened, a smoke call) and serves it.
- **p99 during swaps / p99 without**: median {ratio['median']:.2f}
  (range {ratio['min']:.2f}–{ratio['max']:.2f}) over {len(data['runs']) // 2} rounds; target
  within 20 %: **{verdict}**.
- **Requests lost during {s['swaps']} swaps**: {s['lost_during_swaps']} (non-2xx answers and
  socket errors; without swaps: {s['lost_without']}); target 0:
  **{'met' if s['lost_during_swaps'] == 0 else 'missed'}**.

- Side by side, runs with swaps / runs without (medians of per-round ratios): requests/s
  {s['rps_ratio']:.2f}, server CPU per request {s['cpu_per_request_ratio']:.2f} (all the
  server's processes, from `psutil`).

{data.get('reading', '')}

{markdown_table(["round", "swapping", "swaps", "req/s", "p50 ms", "p99 ms",
                 "server CPU ms/req", "lost"], rows)}
"""


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `finally` stops the server
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="rounds (10)")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    p.add_argument("--swaps-per-round", type=int, default=2, help="versions landed (2)")
    p.add_argument("--every-s", type=float, default=5.0, help="seconds between swaps (5)")
    p.add_argument("--poll-s", type=float, default=1.0, help="GENSERVE_MODELS_POLL_S (1)")
    p.add_argument("--from-json", action="store_true",
                   help="re-render the section from docs/bench/versions.json; measure nothing")
    ns = p.parse_args(argv)
    path = BENCH / "versions.json"
    if ns.from_json:
        data = json.loads(path.read_text())
        data["summary"] = summary(data)
    else:
        config = {"rounds": ns.rounds, "duration": ns.duration, "connections": ns.connections,
                  "swaps": ns.swaps_per_round, "every_s": ns.every_s, "poll_s": ns.poll_s}
        data = measure(ns.rounds, ns.duration, ns.connections, ns.swaps_per_round,
                       ns.every_s, ns.poll_s)
        data |= {"command": "python -m bench.versions " + " ".join(
            sys.argv[1:] if argv is None else argv), "machine": machine_line(),
            "config": config}
        data["summary"] = summary(data)
        path.write_text(json.dumps(data, indent=1) + "\n")
    write_section("versions", markdown(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
