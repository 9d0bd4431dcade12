"""Anomaly scores of a Spark DataFrame, computed where the data is (``genserve score
--engine spark`` and pipelines that already hold a DataFrame).

The model folder travels to the executors with ``SparkContext.addFile``; each Python worker
opens the served runtime (ONNX Runtime, no torch; every sha256 checked there) once and reuses
it for every batch of every task it runs. Batches arrive through ``mapInArrow`` and go through
``service.scoring.score_batch``, the step the single-process engine takes, so both engines
give the same columns, the same bad-row handling and the same numbers (to float32 rounding:
a graph call's batch size differs).

Example (a complete local job; ``spark-submit`` and Kubernetes: docs/PIPELINES.md):
    >>> from genserve.spark import score, session                     # doctest: +SKIP
    >>> spark = session("local[2]")
    >>> events = spark.read.parquet("events.parquet")
    >>> scored = score(events, "exported_models/breast-cancer-maf", keep=["id"])
    >>> scored.write.parquet("scores.parquet")
    >>> scored.filter("is_anomaly").count()
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
from pyspark import SparkFiles, TaskContext
from pyspark.accumulators import Accumulator
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import BooleanType, DoubleType, StringType, StructField, StructType

from artifact.manifest import MANIFEST_FILE, read_manifest, sha256_file
from artifact.tables import DataError, parquet_row_groups
from service.runtime import ModelRuntime, open_runtime
from service.score_files import out_format
from service.scoring import REASON, ScoreCounts, ScorePlan, plan_scoring, score_batch

__all__ = ["ScoreCounters", "score", "score_job", "session"]

# Per Python worker process: the runtimes it opened, by (model name, manifest sha256). A
# worker serves many batches and tasks (spark.python.worker.reuse, on by default).
_RUNTIMES: dict[tuple[str, str], ModelRuntime] = {}


class ScoreCounters:
    """Spark accumulators of scoring jobs: rows read, scored, bad (skipped or flagged),
    anomalous, batches, and runtime loads (once per Python worker and model). A task that
    Spark retries counts again."""

    NAMES = ("rows", "scored", "bad", "anomalies", "batches", "loads")

    def __init__(self, spark: SparkSession) -> None:
        sc = spark.sparkContext
        self.acc: dict[str, Accumulator[int]] = {n: sc.accumulator(0) for n in self.NAMES}

    def add(self, counts: ScoreCounts, batches: int) -> None:
        for name, value in {**asdict(counts), "batches": batches}.items():
            self.acc[name].add(value)

    def values(self) -> dict[str, int]:
        return {name: int(acc.value) for name, acc in self.acc.items()}


@dataclass(frozen=True)
class _Task:
    """What a Python worker needs to score a partition (pickled into the task)."""

    plan: ScorePlan
    model: str  # the folder's name among SparkFiles
    manifest_sha: str  # the driver's manifest, which the workers' copy must equal
    threads: int
    counters: ScoreCounters | None


def _worker_runtime(task: _Task) -> ModelRuntime:
    key = (task.model, task.manifest_sha)
    rt = _RUNTIMES.get(key)
    if rt is None:
        directory = Path(SparkFiles.get(task.model))
        if sha256_file(directory / MANIFEST_FILE) != task.manifest_sha:
            raise DataError(f"the executors' copy of model '{task.model}' differs from the "
                            "driver's (a folder of that name was added to this Spark "
                            "application before); restart the application to score it")
        rt = open_runtime(directory, threads=task.threads)  # verifies every file's sha256
        _RUNTIMES[key] = rt
        if task.counters is not None:
            task.counters.acc["loads"].add(1)
    return rt


def _score_partition(batches: Iterator[pa.RecordBatch], task: _Task,
                     ) -> Iterator[pa.RecordBatch]:
    rt = _worker_runtime(task)
    context = TaskContext.get()
    part = context.partitionId() if context is not None else 0
    total, n = ScoreCounts(), 0
    for batch in batches:
        done = total.rows
        out, counts = score_batch(
            rt, batch, task.plan, first_row=done,
            locate=lambda i, d=done: f"row {d + i + 1} of partition {part}")
        total.add(counts)
        n += 1
        yield out
    if task.counters is not None:
        task.counters.add(total, n)


def _quoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def score(df: DataFrame, model_dir: str | os.PathLike[str], cols: Sequence[str] | None = None,
          keep: Sequence[str] = (), *, on_bad_row: str = "error",
          target_fpr: float | None = None, per_dim: bool = False,
          counters: ScoreCounters | None = None, spread: bool = False) -> DataFrame:
    """``df``'s anomaly scores by the model in ``model_dir`` (lazy: a DataFrame to write).

    The model folder is verified (every sha256) and the columns are checked on the driver
    before any job runs. Output columns: ``keep``, then ``score``, ``percentile``,
    ``is_anomaly`` (and ``reason`` with ``on_bad_row="flag"``), one row per input row
    (``skip`` leaves bad rows out), as ``service.scoring.score_file`` writes them.

    Args:
        df: the rows to score.
        model_dir: an exported, calibrated model folder on the driver (its name must be
            unique among the folders this Spark application scores with).
        cols: feature columns in the model's order (None: the names the manifest records,
            else every numeric column that is not a key).
        keep: key columns copied to the output.
        on_bad_row: ``error`` (the job fails naming the row's keys and column), ``skip`` or
            ``flag``.
        target_fpr: flag at this false-positive rate instead of the calibrated one.
        per_dim: ``score`` in nats per column.
        counters: accumulators that count the job's rows and runtime loads.
        spread: repartition ``df`` round-robin over the application's task slots
            (``defaultParallelism``) first, so that every slot scores, for a DataFrame of
            fewer splits than slots (``score_job`` decides this for its input).
    """
    model_dir = Path(model_dir).resolve()
    manifest = read_manifest(model_dir, verify=True)
    plan = plan_scoring(to_arrow_schema(df.schema), manifest, cols=cols, keep=keep,
                        on_bad_row=on_bad_row, target_fpr=target_fpr, per_dim=per_dim)
    spark = df.sparkSession
    spark.sparkContext.addFile(str(model_dir), recursive=True)
    threads = int(spark.conf.get("spark.task.cpus", "1") or 1)
    task = _Task(plan, model_dir.name, sha256_file(model_dir / MANIFEST_FILE), threads,
                 counters)
    if spread:
        df = df.repartition(spark.sparkContext.defaultParallelism)
    fields = [df.schema[k] for k in plan.keep]
    fields += [StructField("score", DoubleType()), StructField("percentile", DoubleType()),
               StructField("is_anomaly", BooleanType())]
    if plan.on_bad_row == "flag":
        fields.append(StructField(REASON, StringType()))
    return df.select(*[_quoted(c) for c in plan.read]).mapInArrow(
        functools.partial(_score_partition, task=task), StructType(fields))


def session(master: str = "local[*]", conf: Mapping[str, str] | None = None) -> SparkSession:
    """A Spark session for scoring (or the running one). In local mode the Python workers
    run this interpreter (``PYSPARK_PYTHON``, unless set), so they import this genserve."""
    if master.startswith("local"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("genserve-score").master(master)
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


class _Output:
    """An output path on Spark's file system (HDFS, S3, local: Hadoop's ``FileSystem``), so
    a job writes beside it and renames into place on the cluster's storage too. Reaches the
    JVM through PySpark's py4j gateway (``_jvm``, ``_jsc``): Hadoop's rename has no Python
    API."""

    def __init__(self, spark: SparkSession, path: str) -> None:
        jvm = spark.sparkContext._jvm
        conf = spark.sparkContext._jsc.hadoopConfiguration()
        self.path = jvm.org.apache.hadoop.fs.Path(path)
        self.fs = self.path.getFileSystem(conf)
        name = f".{self.path.getName()}.{uuid.uuid4().hex[:12]}.tmp"
        self.tmp = jvm.org.apache.hadoop.fs.Path(self.path.getParent(), name)

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def commit(self) -> None:
        if self.fs.exists(self.path):
            self.fs.delete(self.path, True)
        if not self.fs.rename(self.tmp, self.path):
            raise DataError(f"could not move the finished output to {self.path.toString()}")

    def discard(self) -> None:
        self.fs.delete(self.tmp, True)


_WORKER_ERROR = re.compile(r"(?:DataError|ManifestError|InputError): (.+)")


def _worker_error(err: Exception) -> DataError | None:
    """The one-line reason a task failed with, when genserve raised it on an executor."""
    found = _WORKER_ERROR.search(str(err))
    return DataError(found.group(1).strip()) if found else None


def too_few_splits(spark: SparkSession, df: DataFrame, in_path: str | None = None) -> bool:
    """Whether ``df`` splits into fewer non-empty partitions than there are task slots.

    A local Parquet input counts its row groups: Spark cuts a small file into as many byte
    ranges as slots, but a row group is read whole by the range holding its start, so a
    file of one row group leaves every slot but one with nothing to score. Other inputs
    count their partitions."""
    slots = spark.sparkContext.defaultParallelism
    url = urlparse(in_path) if in_path is not None else None
    if url is not None and url.scheme in ("", "file"):
        local = url.path if url.scheme == "file" else in_path
        if Path(local).exists():
            return parquet_row_groups(local) < slots
    return df.rdd.getNumPartitions() < slots


def score_job(spark: SparkSession, model_dir: str | os.PathLike[str], *,
              in_path: str | None = None, in_table: str | None = None,
              out_path: str | None = None, out_table: str | None = None,
              cols: Sequence[str] | None = None, keep: Sequence[str] = (),
              on_bad_row: str = "error", overwrite: bool = False,
              target_fpr: float | None = None, per_dim: bool = False) -> dict[str, Any]:
    """Read Parquet (a file or a directory) or a table, score it, write Parquet or a table.

    Nothing appears at the output unless the whole job succeeds: the rows are written beside
    it (a hidden path, or a temporary table) and moved into place at the end; an existing
    output is refused unless ``overwrite``. Returns the counts of :class:`ScoreCounters` with
    ``out`` and ``seconds``.
    """
    if (in_path is None) == (in_table is None) or (out_path is None) == (out_table is None):
        raise DataError("name one input (--in or --in-table) and one output (--out or "
                        "--out-table)")
    if in_table is not None and not spark.catalog.tableExists(in_table):
        raise DataError(f"table '{in_table}' not found; tables: "
                        f"{', '.join(t.name for t in spark.catalog.listTables()) or 'none'}")
    if out_table is not None and spark.catalog.tableExists(out_table) and not overwrite:
        raise DataError(f"table '{out_table}' exists; pass --overwrite to replace it")
    output = None
    if out_path is not None:
        if out_format(out_path) != "parquet":
            raise DataError(f"cannot write '{out_path}': the Spark engine writes Parquet "
                            "(a directory ending in .parquet) or a table (--out-table)")
        output = _Output(spark, out_path)
        if output.exists() and not overwrite:
            raise DataError(f"output '{out_path}' exists; pass --overwrite to replace it")
    df = spark.table(in_table) if in_table is not None else spark.read.parquet(in_path)
    counters = ScoreCounters(spark)
    scored = score(df, model_dir, cols, keep, on_bad_row=on_bad_row, target_fpr=target_fpr,
                   per_dim=per_dim, counters=counters, spread=too_few_splits(spark, df, in_path))
    start = time.perf_counter()
    try:
        if output is not None:
            try:
                scored.write.parquet(output.tmp.toString())
                output.commit()
            except BaseException:
                output.discard()
                raise
        else:
            _write_table(spark, scored, out_table)
    except Exception as err:
        reason = _worker_error(err)
        if reason is not None:
            raise reason from None
        raise
    return {**counters.values(), "on_bad_row": on_bad_row,
            "out": out_path if out_path is not None else out_table,
            "seconds": round(time.perf_counter() - start, 3)}


def _write_table(spark: SparkSession, scored: DataFrame, name: str) -> None:
    tmp = f"{name}__genserve_{uuid.uuid4().hex[:12]}"
    try:
        scored.write.saveAsTable(tmp)
        spark.sql(f"DROP TABLE IF EXISTS {name}")
        spark.sql(f"ALTER TABLE {tmp} RENAME TO {name}")
    except BaseException:
        spark.sql(f"DROP TABLE IF EXISTS {tmp}")
        raise
