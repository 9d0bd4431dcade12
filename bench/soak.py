"""Soak: mixed verbs at a fixed concurrency against a real server; errors, latency, memory.

    python -m bench.soak [--seconds 60] [--concurrency 64] [--models exported_models]

Starts ``bentoml serve`` on loopback with the default models (``service.devserver``), drives
it with ``--concurrency`` closed-loop asyncio clients (httpx) that pick a verb, model and row
count at random from a fixed seed, and samples the resident memory (RSS) of the server's
processes (arbiter and workers) every second. Writes the ``soak`` section of
``docs/BENCHMARKS.md``: requests, answers by status (503 = the intended overload answer, with
Retry-After; anything else but 200 is an error), latency percentiles, and the RSS slope over
each third of the run (least squares); the last third's should be near zero once warm.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import psutil

from bench.report import machine_line, markdown_table, write_section
from service.devserver import running_server

ROOT = Path(__file__).resolve().parents[1]


def _request(rng: random.Random, dims: dict[str, int]) -> tuple[str, dict]:
    """One request of the mix: half likelihoods, a quarter samples, a quarter anomaly scores."""
    roll = rng.random()
    if roll < 0.25:
        model = rng.choice([m for m in dims if m != "breast-cancer-maf"])
        return "/sample", {"model": model, "n": rng.choice([1, 4, 16]), "seed": rng.randrange(9)}
    model = "breast-cancer-maf" if roll >= 0.75 else rng.choice(sorted(dims))
    rows = rng.choice([1, 1, 4, 16])
    x = np.random.default_rng(rng.randrange(1 << 30)).normal(size=(rows, dims[model]))
    if model == "breast-cancer-maf":
        x = np.abs(x) * 10.0
    verb = "/anomaly_score" if roll >= 0.75 else "/log_likelihood"
    return verb, {"model": model, "x": x.round(4).tolist()}


async def _drive(url: str, dims: dict[str, int], seconds: float, concurrency: int) -> dict:
    statuses: Counter = Counter()
    latencies: list[float] = []
    retry_hints = 0
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, trust_env=False,
                                 timeout=httpx.Timeout(120.0)) as client:

        async def worker(seed: int) -> None:
            nonlocal retry_hints
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                path, body = _request(rng, dims)
                start = time.perf_counter()
                try:
                    resp = await client.post(path, json=body)
                    status = resp.status_code
                    retry_hints += status == 503 and "retry-after" in resp.headers
                except httpx.HTTPError as err:
                    status = type(err).__name__
                latencies.append(time.perf_counter() - start)
                statuses[status] += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return {"statuses": dict(statuses), "latencies": latencies, "retry_hints": retry_hints}


def _rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def run(models: Path, seconds: float, concurrency: int, env: dict[str, str]) -> dict:
    from artifact.manifest import read_manifest

    dims = {}
    for folder in sorted(p for p in models.iterdir() if (p / "manifest.json").exists()):
        m = read_manifest(folder, verify=False)
        dims[m.name] = m.dim
    log = Path(tempfile.mkdtemp(prefix="soak-")) / "server.log"
    with running_server(models, log, env=env) as server:
        pid = server.proc.pid
        memory: list[tuple[float, float]] = []
        start = time.monotonic()

        async def sampler(stop: asyncio.Event) -> None:
            while not stop.is_set():
                memory.append((time.monotonic() - start, _rss_mb(pid)))
                try:
                    await asyncio.wait_for(stop.wait(), 1.0)
                except TimeoutError:
                    pass

        async def main() -> dict:
            stop = asyncio.Event()
            task = asyncio.create_task(sampler(stop))
            out = await _drive(server.url, dims, seconds, concurrency)
            stop.set()
            await task
            return out

        out = asyncio.run(main())
        out["wall_s"] = time.monotonic() - start
        out["memory"] = memory
        out["workers"] = len(psutil.Process(pid).children(recursive=True))
    return out


def summarize(out: dict) -> dict:
    lat = np.array(out["latencies"]) * 1000
    t, mb = np.array(out["memory"]).T
    thirds = [(t >= t[-1] * k / 3) & (t <= t[-1] * (k + 1) / 3) for k in range(3)]
    slopes = [float(np.polyfit(t[m], mb[m], 1)[0]) * 60 if m.sum() > 2 else float("nan")
              for m in thirds]
    statuses = {str(k): v for k, v in out["statuses"].items()}
    errors = sum(v for k, v in statuses.items() if k not in ("200", "503"))
    return {"requests": int(len(lat)), "rps": len(lat) / out["wall_s"], "statuses": statuses,
            "errors": errors, "overload_503": statuses.get("503", 0),
            "retry_hints": out["retry_hints"], "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()),
            "rss_start_mb": float(mb[0]), "rss_end_mb": float(mb[-1]),
            "rss_peak_mb": float(mb.max()), "rss_at_thirds_mb": [
                float(mb[m][-1]) for m in thirds], "slopes_by_third_mb_per_min": slopes}


def markdown(s: dict, command: str, seconds: float, concurrency: int) -> str:
    load = os.getloadavg()[0]
    rows = [
        ["requests (rate)", f"{s['requests']} ({s['rps']:.1f} req/s)"],
        ["answers by status", ", ".join(f"{k}: {v}" for k, v in sorted(s["statuses"].items()))],
        ["errors (not 200, not the intended 503)", s["errors"]],
        ["overload answers (503, with Retry-After)", f"{s['overload_503']} "
         f"({s['retry_hints']} carried Retry-After)"],
        ["latency p50 / p99 / max", f"{s['p50_ms']:.0f} / {s['p99_ms']:.0f} / "
         f"{s['max_ms']:.0f} ms"],
        ["server RSS start / peak / end", f"{s['rss_start_mb']:.0f} / {s['rss_peak_mb']:.0f} / "
         f"{s['rss_end_mb']:.0f} MiB"],
        ["RSS at the end of each third", " / ".join(f"{v:.0f}" for v in s["rss_at_thirds_mb"])
         + " MiB"],
        ["RSS slope in each third (least squares)", " / ".join(
            f"{v:+.2f}" for v in s["slopes_by_third_mb_per_min"]) + " MiB/min"],
    ]
    return f"""## Soak: {seconds:.0f} s of mixed verbs at concurrency {concurrency}

Reproduce: `{command}` ({machine_line()}; 1-minute load average at the end {load:.1f}).

The default models (`exported_models/`), one worker, adaptive batching on. The mix: 25 %
`/sample` (n = 1, 4 or 16; flows, diffusion, flow matching), 50 % `/log_likelihood`
(1–16 rows, every model), 25 % `/anomaly_score` (breast-cancer-maf, 1–16 rows of 30 values).
Closed-loop asyncio clients (httpx) on the same 2 cores as the server. RSS is the sum over
the server's processes, sampled every second; each third's slope is a least-squares fit.
Warm-up (ONNX Runtime's arenas growing to the largest batch seen, BentoML's metric files)
shows in the first third; the last third's slope is the growth rate once warm.

{markdown_table(["figure", "value"], rows)}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=180.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--models", type=Path, default=ROOT / "exported_models")
    p.add_argument("--no-write", action="store_true", help="print, do not write the docs")
    ns = p.parse_args(argv)
    env = {"GENSERVE_MAX_LATENCY_MS": "30000"}
    out = run(ns.models, ns.seconds, ns.concurrency, env)
    summary = summarize(out)
    print(json.dumps(summary, indent=1))
    command = "python -m bench.soak" + " ".join(
        [""] + [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write"])
    if not ns.no_write:
        write_section("soak", markdown(summary, command, ns.seconds, ns.concurrency))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
