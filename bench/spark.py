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
import contextlib
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
ENGINES = ("ceiling", "process-parquet", "process-csv", "spark-local[1]", "spark-local[2]",
           "spark-local[1]-pinned", "spark-local[2]-pinned")
PINNED = "-pinned"  # the process tree runs on as many CPUs as Spark has task slots


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- data


def generate(rows: int, data: Path, seed: int = 0, csv: bool = True) -> dict[str, Path]:
    """``rows`` synthetic rows as Parquet (and CSV) under ``data`` (reused when present)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from artifact.manifest import read_manifest

    paths = {"parquet": data / f"rows-{rows}.parquet"}
    if csv:
        paths["csv"] = data / f"rows-{rows}.csv"
    if all(p.exists() for p in paths.values()):
        return paths
    data.mkdir(parents=True, exist_ok=True)
    info = read_manifest(MODEL).data
    mean, std = np.asarray(info.mean), np.asarray(info.std)
    rng = np.random.default_rng(seed)
    names = [f"f{i}" for i in range(len(mean))]
    tmp = {k: p.with_name(p.name + ".tmp") for k, p in paths.items()}
    schema = pa.schema([("id", pa.int64()), *[(n, pa.float64()) for n in names]])
    with contextlib.ExitStack() as stack:
        writers = [stack.enter_context(pq.ParquetWriter(tmp["parquet"], schema))]
        if csv:
            writers.append(stack.enter_context(pacsv.CSVWriter(tmp["csv"], schema)))
        for start in range(0, rows, ROW_GROUP):
            n = min(ROW_GROUP, rows - start)
            x = mean + std * rng.standard_normal((n, len(mean)))
            batch = pa.RecordBatch.from_arrays(
                [pa.array(np.arange(start, start + n)), *list(x.T)], schema=schema)
            for w in writers:
                w.write_batch(batch)
    for k, p in paths.items():
        tmp[k].replace(p)
    log(f"generated {rows} rows: {', '.join(str(p) for p in paths.values())}")
    return paths


def scoring_bound_model(data: Path, steps: int = 300) -> Path:
    """A model whose scoring, not Spark's row handling, sets the pace: flow matching (cfm) on
    the same benign breast-cancer rows, scored by its PF-ODE log-likelihood (fit-anomaly's
    pipeline, as ``bench.score_speed`` builds it). Built once under ``data``."""
    folder = data / "breast-cancer-cfm-nll"
    if (folder / "manifest.json").exists():
        return folder
    import sklearn.datasets

    from training.anomaly_models import export_candidate, score_spec, train_candidate
    from training.anomaly_rows import prepare

    bunch = sklearn.datasets.load_breast_cancer()
    prep = prepare(bunch.data[bunch.target == 1].astype(np.float64), seed=0, model="cfm",
                   steps=steps)
    chosen = train_candidate(prep, "cfm", 0, progress=True)
    spec, latents, selection = score_spec(prep, chosen, "nll", 0)
    export_candidate(prep, chosen, folder, score=spec, latents=latents,
                     score_selection=selection)
    log(f"built the scoring-bound model {folder}")
    return folder


# --------------------------------------------------------------------------- one contestant


def run_one(engine: str, rows: int, source: Path, out: Path, repeats: int,
            model: Path = MODEL) -> dict[str, Any]:
    """Time ``engine`` on ``rows`` rows of ``source`` ``repeats`` times (in this process)."""
    import shutil

    seconds: list[float] = []
    if engine == "ceiling":
        from service.runtime import open_runtime

        rt = open_runtime(model, threads=1)
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

        rt = open_runtime(model, threads=1)
        for _ in range(repeats):
            start = time.perf_counter()
            info = score_file(model, source, out, keep=["id"], overwrite=True,
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
        counts = score_job(spark, model, in_path=str(source), out_path=str(out), keep=["id"])
        seconds.append(time.perf_counter() - start)
        assert counts["rows"] == rows, counts
    spark.stop()
    return {"seconds": seconds, "loads": counts["loads"], "batches": counts["batches"]}


def _blocks(source: Path, rows: int):
    """The features of up to one row group of ``source``, as the ceiling's in-memory rows."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(source).read_row_group(0)
    yield np.column_stack([table.column(n).to_numpy() for n in table.column_names[1:]])


def measure(engine: str, rows: int, source: Path, out: Path, repeats: int,
            model: Path = MODEL) -> dict[str, Any]:
    """Run one contestant in a fresh process, sampling its process tree's memory and CPU."""
    cmd = [sys.executable, "-m", "bench.spark", "--one", engine.removesuffix(PINNED),
           "--rows", str(rows), "--source", str(source), "--out", str(out),
           "--repeats", str(repeats), "--model", str(model)]
    if engine.endswith(PINNED):  # local[N] on CPUs 0..N-1: one core per task slot
        slots = int(engine[engine.index("[") + 1:engine.index("]")])
        cmd = ["taskset", "-c", ",".join(map(str, range(slots))), *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    peak, cpu, jvm = 0, {}, set()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        total = 0
        try:
            for p in [root, *root.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                    times = p.cpu_times()
                    cpu[p.pid] = times.user + times.system
                    if p.name() == "java":
                        jvm.add(p.pid)
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
    jvm_s = sum(v for pid, v in cpu.items() if pid in jvm)
    result.update(engine=engine, model=model.name, rows=rows, median_s=median,
                  rows_per_s=rows / median, peak_rss_mb=peak / 2**20, cpu_s=sum(cpu.values()),
                  cores_busy=sum(cpu.values()) / sum(result["seconds"]),
                  jvm_cores=jvm_s / sum(result["seconds"]),
                  python_cores=(sum(cpu.values()) - jvm_s) / sum(result["seconds"]))
    log(f"{engine} ({model.name}) @ {rows}: {rows / median:,.0f} rows/s (median of "
        f"{len(result['seconds'])}), peak RSS {peak / 2**20:.0f} MB")
    return result


# --------------------------------------------------------------------------- report


def _table(results: list[dict[str, Any]], ceiling: float) -> str:
    rows = [[r["engine"], f"{r['rows']:,}", f"{r['rows_per_s']:,.0f}",
             f"{r['rows_per_s'] / ceiling:.2f}", f"{r['peak_rss_mb']:.0f}",
             f"{r['cores_busy']:.2f}", f"{r.get('jvm_cores', 0):.2f}",
             f"{r.get('python_cores', r['cores_busy']):.2f}",
             " / ".join(f"{s:.1f}" for s in r["seconds"])] for r in results]
    return markdown_table(["engine", "rows", "rows/s", "of ceiling", "peak RSS MB",
                           "CPU s / run s", "of which JVM", "of which Python", "runs (s)"],
                          rows)


def _scaling(by: dict, rows: int, what: str, suffix: str = "") -> tuple[float, str]:
    l1, l2 = by[("spark-local[1]" + suffix, rows)], by[("spark-local[2]" + suffix, rows)]
    ratio = l2["rows_per_s"] / l1["rows_per_s"]
    how = ("each on as many cores as it has task slots (`taskset`)" if suffix else
           "both free to use the 2 cores")
    cap = 2 / l1["cores_busy"]
    return ratio, (
        f"- {what}, {how}: Spark local[2] at **{ratio:.2f}x** local[1] (target >= 1.6x: "
        f"**{'met' if ratio >= 1.6 else 'missed'}**); local[1] kept "
        f"{l1['cores_busy']:.2f} cores busy (JVM {l1.get('jvm_cores', 0):.2f}, Python "
        f"{l1.get('python_cores', 0):.2f})"
        + (f", so the machine's 2 cores leave local[2] at most {cap:.2f}x: one task "
           "already runs its JVM reader, its JVM writer and its Python worker side by side."
           if not suffix and ratio < 1.6 else "."))


def report(results: list[dict[str, Any]], heavy: list[dict[str, Any]],
           args: argparse.Namespace) -> str:
    by = {(r["engine"], r["rows"]): r for r in results}
    ceiling = by[("ceiling", args.rows)]["rows_per_s"]
    pq_ratio = by[("process-parquet", args.rows)]["rows_per_s"] / ceiling
    l1 = by[("spark-local[1]", args.rows)]["rows_per_s"]
    mem = {e: (by[(e, args.small_rows)]["peak_rss_mb"], by[(e, args.rows)]["peak_rss_mb"])
           for e in ("process-parquet", "spark-local[2]") if (e, args.small_rows) in by}
    verdict = [
        f"- single-process Parquet at {pq_ratio:.0%} of the in-process ceiling (target "
        f">= 80 %): **{'met' if pq_ratio >= 0.8 else 'missed'}**.",
    ]
    hby = {(r["engine"], r["rows"]): r for r in heavy}
    for suffix in ("", PINNED):
        if ("spark-local[1]" + suffix, args.rows) in by:
            verdict.append(_scaling(by, args.rows, "MAF", suffix)[1])
        if ("spark-local[1]" + suffix, args.heavy_rows) in hby:
            verdict.append(_scaling(hby, args.heavy_rows, "PF-ODE cfm", suffix)[1])
    for e, (small, big) in mem.items():
        verdict.append(f"- {e} peak memory {small:.0f} MB at {args.small_rows:,} rows, "
                       f"{big:.0f} MB at {args.rows:,} rows ({big / small:.2f}x for "
                       f"{args.rows / args.small_rows:.0f}x the rows).")
    ceiling_cores = by[("ceiling", args.rows)]["cores_busy"]
    busy = [r["cores_busy"] for r in results]
    if ceiling_cores < 0.8:
        verdict.append(
            f"- The machine was oversubscribed: the ceiling, one single-threaded loop, kept "
            f"{ceiling_cores:.2f} of a core busy, the contestants {min(busy):.2f}-"
            f"{max(busy):.2f} (load average {getattr(args, 'load', 'not recorded')}). "
            f"Rates are what that fraction of a core gives, and ratios of contestants run "
            f"one after another carry the load's drift.")
    one = by.get(("spark-local[1]" + PINNED, args.rows), by[("spark-local[1]", args.rows)])
    per_core = one["rows_per_s"] if one["engine"].endswith(PINNED) else l1
    verdict.append(
        f"- A cluster: the job is embarrassingly parallel (each row scored alone, no shuffle, "
        f"the model shipped once per executor and loaded once per Python worker), so N "
        f"executor cores should give about N x the one-core rate measured here "
        f"({per_core:,.0f} rows/s for local[1] with MAF on one core, job overheads included; "
        f"N = 32: about {32 * per_core / 1e6:.1f} M rows/s), as long as the input has at "
        f"least N splits (a Parquet input of fewer row groups than task slots is spread "
        f"round-robin first) and storage keeps up. No cluster was available; local[2] on "
        f"this 2-core machine is the only scaling measured.")
    cmd = (f"python -m bench.spark --rows {args.rows} --small-rows {args.small_rows} "
           f"--csv-rows {args.csv_rows} --repeats {args.repeats} --heavy-rows "
           f"{args.heavy_rows}")
    heavy_part = [] if not heavy else [
        "",
        f"Scoring-bound: the same table's first {args.heavy_rows:,} rows scored by a flow "
        "matching model (cfm, 300 steps on the same benign rows) whose score is its PF-ODE "
        "log-likelihood, so the Python workers' scoring, not Spark's Parquet and Arrow "
        "handling in the JVM, sets the pace:",
        "",
        _table(heavy, hby[("ceiling", args.heavy_rows)]["rows_per_s"]),
    ]
    return "\n".join([
        "## Bulk scoring: one process (CSV, Parquet) and Apache Spark (local mode)",
        "",
        f"`{cmd}` ({machine_line()}; load average {getattr(args, 'load', 'not recorded')}). "
        "Model `exported_models/breast-cancer-maf` (MAF, 30 columns); a synthetic table of "
        "an `id` key and 30 Gaussian columns (the training data's mean and std), `id` kept. "
        "One ONNX Runtime thread per process or Spark task; each contestant in a fresh "
        "process, median of the timed runs, peak = resident memory of the process and its "
        "children (JVM, Python workers) sampled every 0.1 s. The Spark session's start "
        "(about 10-30 s here) is not timed; the job's is, Python workers and model loads "
        "included."
        + (f" The target size is 10 M rows; this run used {args.rows:,} (and {args.small_rows:,} "
           "to show memory flat in the row count)." if args.rows < 10_000_000 else "")
        + " CPU s / run s: the CPU time of the process tree (all runs, start-up "
        "included) over the timed seconds, about how many cores it kept busy; split into "
        "the JVM and the Python processes (driver and workers).",
        "",
        _table(results, ceiling),
        *heavy_part,
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
    ap.add_argument("--model", type=Path, default=MODEL, help=argparse.SUPPRESS)
    ap.add_argument("--heavy-rows", type=int, default=20_000,
                    help="rows for the scoring-bound model (a PF-ODE; 0: skip it)")
    ap.add_argument("--from-json", action="store_true",
                    help="re-render the section from docs/bench/spark.json; measure nothing")
    args = ap.parse_args()
    if args.from_json:
        raw = json.loads(RAW.read_text())
        for k, v in raw["args"].items():
            if k in ("rows", "small_rows", "csv_rows", "repeats", "heavy_rows"):
                setattr(args, k, int(v))
            elif k == "load":
                args.load = v
        write_results("spark", report(raw["results"], raw.get("scoring_bound", []), args),
                      RAW, raw)
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.rows, args.source, args.out, args.repeats,
                                 args.model)))
        return
    results = []
    load_start = os.getloadavg()[0]
    sizes = {"big": args.rows, "small": args.small_rows, "csv": args.csv_rows}
    files = {k: generate(n, args.data, csv=(k == "csv")) for k, n in sizes.items()}
    plan = [("ceiling", "big"), ("process-parquet", "big"), ("process-parquet", "small"),
            ("process-csv", "csv"), ("spark-local[1]", "big"), ("spark-local[2]", "big"),
            ("spark-local[2]", "small"), ("spark-local[1]-pinned", "big"),
            ("spark-local[2]-pinned", "big")]
    for engine, size in plan:
        if engine not in args.engines:
            continue
        fmt = "csv" if engine == "process-csv" else "parquet"
        out = args.data / f"out-{engine}.{'csv' if fmt == 'csv' else 'parquet'}"
        results.append(measure(engine, sizes[size], files[size][fmt], out, args.repeats))
    heavy = []
    if args.heavy_rows:
        model = scoring_bound_model(args.data)
        source = generate(args.heavy_rows, args.data, csv=False)["parquet"]
        for engine in ("ceiling", "spark-local[1]", "spark-local[2]", "spark-local[1]-pinned",
                       "spark-local[2]-pinned"):
            out = args.data / f"out-heavy-{engine}.parquet"
            heavy.append(measure(engine, args.heavy_rows, source, out, args.repeats, model))
    args.load = f"{load_start:.0f} at the start, {os.getloadavg()[0]:.0f} at the end"
    write_results("spark", report(results, heavy, args), RAW,
                  {"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                   "scoring_bound": heavy})


if __name__ == "__main__":
    main()
