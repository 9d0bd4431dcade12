"""Bulk scoring throughput and memory: the single-process engine (CSV and Parquet), Apache
Spark in local mode (``local[1]``, ``local[2]``), and the in-process runtime as the ceiling.

    python -m bench.spark [--rows 1000000] [--small-rows 250000] [--csv-rows 200000]
                          [--repeats 3] [--data /tmp/genserve-bench-spark]

A synthetic table (an ``id`` key and the breast-cancer model's 30 columns, each drawn from a
Gaussian with the training data's mean and std from the manifest, seeded) is generated once
under ``--data`` as Parquet (row groups of 65536 rows) and CSV, then scored with
``exported_models/breast-cancer-maf``, keeping ``id``:

- ceiling: ``ModelRuntime.anomaly_score`` on blocks of 4096 rows already in memory, no I/O;
- process-parquet / process-csv: ``genserve score`` (``service.scoring.score_file``), file to
  file, blocks of 4096 rows per graph call;
- spark-local[1] / spark-local[2]: ``genserve score --engine spark`` (``genserve.spark``),
  Parquet to Parquet, Arrow batches of 10000 rows; the session's start is not timed, the
  job's is (Python workers starting and loading the model included).

ONNX Runtime runs one intra-op thread everywhere (Spark: ``spark.task.cpus`` = 1 per task),
so ``local[2]`` is the only contestant that may use both cores. Each contestant runs in its
own process (started fresh; ``--repeats`` timed runs, median reported) while this process
samples the resident memory of that process and all its children (the JVM and Python
workers for Spark) every 0.1 s: the peak is the figure. Memory that is flat in the row count
shows as equal peaks at ``--small-rows`` and ``--rows``.

Writes the ``spark`` section of docs/BENCHMARKS.md and docs/bench/spark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench.report import machine_line, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "exported_models" / "breast-cancer-maf"
RAW = ROOT / "docs" / "bench" / "spark.json"
BLOCK = 4096
ROW_GROUP = 65_536
ENGINES = ("ceiling", "process-parquet", "process-csv", "spark-local[1]", "spark-local[2]")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def generate(rows: int, data: Path, seed: int = 0) -> dict[str, Path]:
    """``rows`` synthetic rows as Parquet and CSV under ``data`` (reused when present)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from artifact.manifest import read_manifest

    paths = {"parquet": data / f"rows-{rows}.parquet", "csv": data / f"rows-{rows}.csv"}
    if all(p.exists() for p in paths.values()):
        return paths
    data.mkdir(parents=True, exist_ok=True)
    info = read_manifest(MODEL).data
    mean, std = np.asarray(info.mean), np.asarray(info.std)
    rng = np.random.default_rng(seed)
    names = [f"f{i}" for i in range(len(mean))]
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
    schema = pa.schema([("id", pa.int64()), *[(n, pa.float64()) for n in names]])
    with pq.ParquetWriter(tmp["parquet"], schema) as pw, \
            pacsv.CSVWriter(tmp["csv"], schema) as cw:
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            x = mean + std * rng.standard_normal((n, len(mean)))
            batch = pa.RecordBatch.from_arrays(
                [pa.array(np.arange(start, start + n)), *list(x.T)], schema=schema)
            pw.write_batch(batch)
            cw.write_batch(batch)
    for k, p in paths.items():
        tmp[k].replace(p)
    log(f"generated {rows} rows: {', '.join(str(p) for p in paths.values())}")
    return paths


# --------------------------------------------------------------------------- one contestant


def run_one(engine: str, rows: int, source: Path, out: Path, repeats: int) -> dict[str, Any]:
    """Time ``engine`` on ``rows`` rows of ``source`` ``repeats`` times (in this process)."""
    import shutil

    seconds: list[float] = []
    if engine == "ceiling":
        from service.runtime import open_runtime

        rt = open_runtime(MODEL, threads=1)
        x = next(_blocks(source, rows))
        rt.anomaly_score(x[:BLOCK])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            for a in range(0, rows, BLOCK):
                rt.anomaly_score(x[(a % len(x)):(a % len(x)) + min(BLOCK, rows - a)])
            seconds.append(time.perf_counter() - start)
        return {"seconds": seconds}
    if engine.startswith("process"):
        from service.runtime import open_runtime
        from service.scoring import score_file

        rt = open_runtime(MODEL, threads=1)
        for _ in range(repeats):
            start = time.perf_counter()
            info = score_file(MODEL, source, out, keep=["id"], overwrite=True,
                              batch_rows=BLOCK, runtime=rt)
            seconds.append(time.perf_counter() - start)
            assert info["rows"] == rows, info
        return {"seconds": seconds}
    from genserve.spark import score_job, session

    master = engine.removeprefix("spark-")
    spark = session(master, {"spark.ui.enabled": "false", "spark.driver.memory": "1g",
                             "spark.ui.showConsoleProgress": "false"})
    spark.sparkContext.setLogLevel("ERROR")
    counts = {}
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        counts = score_job(spark, MODEL, in_path=str(source), out_path=str(out), keep=["id"])
        seconds.append(time.perf_counter() - start)
        assert counts["rows"] == rows, counts
    spark.stop()
    return {"seconds": seconds, "loads": counts["loads"], "batches": counts["batches"]}


def _blocks(source: Path, rows: int):
    """The features of up to one row group of ``source``, as the ceiling's in-memory rows."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(source).read_row_group(0)
    yield np.column_stack([table.column(n).to_numpy() for n in table.column_names[1:]])


def measure(engine: str, rows: int, source: Path, out: Path, repeats: int) -> dict[str, Any]:
    """Run one contestant in a fresh process, sampling its process tree's memory."""
    cmd = [sys.executable, "-m", "bench.spark", "--one", engine, "--rows", str(rows),
           "--source", str(source), "--out", str(out), "--repeats", str(repeats)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    peak, cpu = 0, {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                    times = p.cpu_times()
                    cpu[p.pid] = times.user + times.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
        time.sleep(0.1)
    stdout = proc.stdout.read() if proc.stdout else ""
    if proc.wait() != 0:
        raise SystemExit(f"{engine} failed (exit {proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    median = float(np.median(result["seconds"]))
    # CPU seconds of the whole process tree (last sample of each process) over all its runs,
    # per second of timed run: how many cores the engine kept busy (start-up included)
    result.update(engine=engine, rows=rows, median_s=median, rows_per_s=rows / median,
                  peak_rss_mb=peak / 2**20, cpu_s=sum(cpu.values()),
                  cores_busy=sum(cpu.values()) / sum(result["seconds"]))
    log(f"{engine} @ {rows}: {rows / median:,.0f} rows/s (median of "
        f"{len(result['seconds'])}), peak RSS {peak / 2**20:.0f} MB")
    return result


# --------------------------------------------------------------------------- report


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by = {(r["engine"], r["rows"]): r for r in results}
    ceiling = by[("ceiling", args.rows)]["rows_per_s"]
    rows = []
    for r in results:
        rows.append([r["engine"], f"{r['rows']:,}", f"{r['rows_per_s']:,.0f}",
                     f"{r['rows_per_s'] / ceiling:.2f}", f"{r['peak_rss_mb']:.0f}",
                     f"{r['cores_busy']:.2f}",
                     " / ".join(f"{s:.1f}" for s in r["seconds"])])
    pq_ratio = by[("process-parquet", args.rows)]["rows_per_s"] / ceiling
    l1 = by[("spark-local[1]", args.rows)]["rows_per_s"]
    l2 = by[("spark-local[2]", args.rows)]["rows_per_s"]
    mem = {e: (by[(e, args.small_rows)]["peak_rss_mb"], by[(e, args.rows)]["peak_rss_mb"])
           for e in ("process-parquet", "spark-local[2]") if (e, args.small_rows) in by}
    verdict = [
        f"- single-process Parquet at {pq_ratio:.0%} of the in-process ceiling (target "
        f">= 80 %): **{'met' if pq_ratio >= 0.8 else 'missed'}**.",
        f"- Spark local[2] at {l2 / l1:.2f}x local[1] (target >= 1.6x): "
        f"**{'met' if l2 / l1 >= 1.6 else 'missed'}**.",
    ]
    for e, (small, big) in mem.items():
        verdict.append(f"- {e} peak memory {small:.0f} MB at {args.small_rows:,} rows, "
                       f"{big:.0f} MB at {args.rows:,} rows ({big / small:.2f}x for "
                       f"{args.rows / args.small_rows:.0f}x the rows).")
    ceiling_cores = by[("ceiling", args.rows)]["cores_busy"]
    busy = [r["cores_busy"] for r in results]
    c1 = by[("spark-local[1]", args.rows)]["cores_busy"]
    c2 = by[("spark-local[2]", args.rows)]["cores_busy"]
    if ceiling_cores < 0.8:
        verdict.append(
            f"- The machine was oversubscribed: the ceiling, one single-threaded loop, kept "
            f"{ceiling_cores:.2f} of a core busy, the contestants {min(busy):.2f}-"
            f"{max(busy):.2f} (load average {getattr(args, 'load', 'not recorded')}). "
            f"Rates are what that fraction of a core gives, and ratios of contestants run "
            f"one after another carry the load's drift."
            + (f" local[2] kept {c2:.2f} cores busy against local[1]'s {c1:.2f}: it got "
               f"no second core, so their ratio measures the scheduler, not Spark, and the "
               f"1.6x target is untested here." if c2 < 1.5 * c1 else ""))
    verdict.append(
        f"- A cluster: the job is embarrassingly parallel (each row scored alone, no shuffle, "
        f"the model shipped once per executor and loaded once per Python worker), so N "
        f"executor cores should give about N x the one-task rate measured here "
        f"({l1:,.0f} rows/s for local[1], job overheads included; N = 32: about "
        f"{32 * l1 / 1e6:.1f} M rows/s), as long as the input has at least N splits and "
        f"storage keeps up. local[2]'s {l2 / l1:.2f}x on this 2-core machine, shared with "
        f"other work, is the only scaling measured here: no cluster was available.")
    cmd = (f"python -m bench.spark --rows {args.rows} --small-rows {args.small_rows} "
           f"--csv-rows {args.csv_rows} --repeats {args.repeats}")
    return "\n".join([
        "## Bulk scoring: one process (CSV, Parquet) and Apache Spark (local mode)",
        "",
        f"`{cmd}` ({machine_line()}; shared machine: other work ran at the same time). "
        "Model `exported_models/breast-cancer-maf` (MAF, 30 columns); a synthetic table of "
        "an `id` key and 30 Gaussian columns (the training data's mean and std), `id` kept. "
        "One ONNX Runtime thread per process or Spark task; each contestant in a fresh "
        "process, median of the timed runs, peak = resident memory of the process and its "
        "children (JVM, Python workers) sampled every 0.1 s. The Spark session's start "
        "(about 10-30 s here) is not timed; the job's is, Python workers and model loads "
        "included."
        + (f" The target size is 10 M rows; this run used {args.rows:,} (and {args.small_rows:,} "
           "to show memory flat in the row count): on a 2-core machine shared with other "
           "work, 10 M rows per contestant and run would take hours, and rows/s does not "
           "depend on the size once a job is warm." if args.rows < 10_000_000 else "")
        + " CPU s / run s: the CPU time of the process tree (all runs, start-up "
        "included) over the timed seconds, about how many cores it kept busy.",
        "",
        markdown_table(["engine", "rows", "rows/s", "of ceiling", "peak RSS MB",
                        "CPU s / run s", "runs (s)"], rows),
        "",
        *verdict,
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--small-rows", type=int, default=250_000)
    ap.add_argument("--csv-rows", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path("/tmp/genserve-bench-spark"))
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--one", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.rows, args.source, args.out, args.repeats)))
        return
    results = []
    load_start = os.getloadavg()[0]
    sizes = {"big": args.rows, "small": args.small_rows, "csv": args.csv_rows}
    files = {k: generate(n, args.data) for k, n in sizes.items()}
    plan = [("ceiling", "big"), ("process-parquet", "big"), ("process-parquet", "small"),
            ("process-csv", "csv"), ("spark-local[1]", "big"), ("spark-local[2]", "big"),
            ("spark-local[2]", "small")]
    for engine, size in plan:
        if engine not in args.engines:
            continue
        fmt = "csv" if engine == "process-csv" else "parquet"
        out = args.data / f"out-{engine}.{'csv' if fmt == 'csv' else 'parquet'}"
        results.append(measure(engine, sizes[size], files[size][fmt], out, args.repeats))
    args.load = f"{load_start:.0f} at the start, {os.getloadavg()[0]:.0f} at the end"
    write_results("spark", report(results, args), RAW,
                  {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})


if __name__ == "__main__":
    main()
