"""``genserve fit-anomaly`` (one-command anomaly model) and ``genserve score`` (bulk scoring)."""

from __future__ import annotations

import argparse
import json
import sys

from artifact.tables import FORMATS, DataError, table_format
from cli.options import add_progress_arg
from service.scoring import ON_BAD_ROW, score_file
from training.anomaly import fit_anomaly, format_summary
from training.anomaly_models import SCORES

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit-anomaly", help="one-command anomaly model from normal rows "
                       "(trained, calibrated, exported)")
    p.add_argument("data", help=".csv/.npy/.npz of normal rows (.npz with y: its y == 0 rows)")
    p.add_argument("--out", required=True, help="artifact directory (served name = folder)")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="share of normal rows the threshold flags (0.01)")
    p.add_argument("--model", nargs="+", help="model type(s) to try instead of the defaults; "
                   "auto: the candidates of `train --model auto` (nsf, nsf_ar, maf)")
    p.add_argument("--ensemble", type=int, default=1,
                   help="seeds per candidate; above 1 the served model is an equal-weight "
                        "mixture of them (exact density), chosen by validation NLL (1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--smoothing-search", nargs="+", type=float, metavar="S",
                   help="train the winning model type again with Gaussian smoothing of S "
                        "standard deviations on every column (each in (0, 2]) and keep the "
                        "lowest validation NLL (default 0.2 0.5; none with --ensemble)")
    g.add_argument("--no-smoothing-search", dest="smoothing_search", action="store_const",
                   const=[], help="train the candidates unsmoothed only")
    p.add_argument("--steps", type=int, help="cap on optimizer steps per candidate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["onnx", "torchscript", "both"], default="onnx")
    p.add_argument("--score", choices=["auto", *SCORES], default="nll",
                   help="served anomaly score kind; auto: chosen on normal rows "
                   "(docs/anomaly-selection-protocol.md)")
    p.add_argument("--budget-s", type=float, help="wall-clock budget in seconds: fewer "
                   "candidates past a share of it (the summary says which)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--label-col", dest="label_col", metavar="C", help="a conditional model "
                   "on each row's class in this column (not a feature): -log p(x | y), "
                   "thresholds calibrated per class; score reads the column too")
    g.add_argument("--context-cols", dest="context_cols", nargs="+", metavar="C",
                   help="a conditional model on each row's context in these columns")
    add_progress_arg(p)
    p.set_defaults(run=fit)

    p = sub.add_parser("score", help="score a table in bounded batches: CSV or Parquet of "
                       "score, percentile, is_anomaly per row (the numbers /anomaly_score "
                       "returns), in one process or on Spark")
    p.add_argument("--model", required=True, help="artifact directory")
    p.add_argument("--in", dest="in_path",
                   help=".csv/.npy/.npz/.parquet rows to score (a directory: Parquet parts)")
    p.add_argument("--in-format", choices=FORMATS, help="the input's format (default: from "
                   "its suffix)")
    p.add_argument("--out", help="file to write atomically: .csv or .parquet by its suffix "
                   "(Spark: a Parquet directory)")
    p.add_argument("--cols", type=_names, help="feature columns a,b,... in the model's order "
                   "(default: the names the manifest records, else every numeric column "
                   "that is not kept)")
    p.add_argument("--keep-cols", type=_names, default=[], help="key columns id,ts,... "
                   "copied to the output before the scores")
    p.add_argument("--on-bad-row", choices=ON_BAD_ROW, default="error",
                   help="a row with a missing, non-numeric, NaN or Inf feature: stop naming "
                   "it (error, default), leave it out (skip), or write it with null scores "
                   "and a reason column (flag)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--chunk-rows", type=int, default=65536, help="rows read at a time")
    p.add_argument("--per-dim", action="store_true", help="scores in nats per dimension")
    p.add_argument("--target-fpr", type=float, help="override the calibrated rate")
    g = p.add_argument_group("engine (--engine spark needs the [spark] extra)")
    g.add_argument("--engine", choices=["process", "spark"], default="process",
                   help="process: this process, streaming (default); spark: Apache Spark "
                   "(mapInArrow on the executors)")
    g.add_argument("--master", default="local[*]", help="Spark master (local[*] or a "
                   "cluster URL)")
    g.add_argument("--spark-conf", action="append", default=[], type=_conf, metavar="K=V",
                   help="a Spark setting (repeatable)")
    g.add_argument("--spark-log-level", default="OFF", help="Spark's log level on the "
                   "driver (OFF: errors come as one line; WARN or INFO for Spark's own)")
    g.add_argument("--in-table", help="Spark: read this table instead of --in")
    g.add_argument("--out-table", help="Spark: write this table instead of --out")
    add_progress_arg(p)
    p.set_defaults(run=score)


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of column "
                                         "names")
    return names


def _conf(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value


def fit(ns: argparse.Namespace) -> int:
    formats = ("onnx", "torchscript") if ns.format == "both" else (ns.format,)
    summary = fit_anomaly(ns.data, ns.out, target_fpr=ns.target_fpr, seed=ns.seed,
                          ensemble=ns.ensemble, model=ns.model, steps=ns.steps,
                          smoothing_search=ns.smoothing_search, formats=formats,
                          progress=not ns.no_progress, score=ns.score,
                          budget_s=ns.budget_s, label_col=ns.label_col,
                          context_cols=ns.context_cols)
    print(format_summary(summary), file=sys.stderr)
    return 0


def score(ns: argparse.Namespace) -> int:
    if ns.engine == "spark":
        out = _score_spark(ns)
    else:
        if ns.in_table or ns.out_table:
            raise DataError("--in-table and --out-table need --engine spark")
        if ns.in_path is None or ns.out is None:
            raise DataError("name the input (--in) and the output (--out)")
        out = score_file(ns.model, ns.in_path, ns.out, in_format=ns.in_format, cols=ns.cols,
                         keep=ns.keep_cols, on_bad_row=ns.on_bad_row, overwrite=ns.overwrite,
                         chunk_rows=ns.chunk_rows, per_dim=ns.per_dim,
                         target_fpr=ns.target_fpr, progress=not ns.no_progress)
    print(json.dumps(out), file=sys.stderr)
    return 0


def _score_spark(ns: argparse.Namespace) -> dict:
    try:
        from pyspark.sql import SparkSession

        from genserve import spark as engine
    except ImportError:
        raise DataError("--engine spark needs pyspark, which is not installed; install it "
                        "with pip install 'genserve[spark]' (and a Java 17+ runtime)") from None
    if ns.in_path is not None and table_format(ns.in_path, ns.in_format) != "parquet":
        raise DataError(f"--engine spark reads Parquet (a file or a directory) or a table "
                        f"(--in-table); '{ns.in_path}' is not Parquet")
    conf = dict(ns.spark_conf)
    conf.setdefault("spark.ui.showConsoleProgress", str(not ns.no_progress).lower())
    owned = SparkSession.getActiveSession() is None  # else a caller's, left running
    spark = engine.session(ns.master, conf)
    try:
        spark.sparkContext.setLogLevel(ns.spark_log_level)
        return engine.score_job(spark, ns.model, in_path=ns.in_path, in_table=ns.in_table,
                                out_path=ns.out, out_table=ns.out_table, cols=ns.cols,
                                keep=ns.keep_cols, on_bad_row=ns.on_bad_row,
                                overwrite=ns.overwrite, target_fpr=ns.target_fpr,
                                per_dim=ns.per_dim)
    finally:
        if owned:
            spark.stop()
