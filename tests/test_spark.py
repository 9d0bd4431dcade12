"""Bulk scoring on Apache Spark (local mode): the same rows, keys, scores and flags as the
single-process engine in every bad-row mode; a DataFrame through ``genserve.spark.score``;
the runtime loaded once per Python worker; nothing at the output unless the job succeeds."""

from __future__ import annotations

import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from events import BAD, FEATURES, MODEL, events

from artifact.manifest import ManifestError
from artifact.tables import DataError, parquet_row_groups
from cli import main
from genserve.spark import ScoreCounters, score, score_job, too_few_splits
from service.runtime import open_runtime
from service.scoring import score_file

# one Spark session (a JVM) per test process: these tests share one process (make test runs
# pytest-xdist with --dist loadgroup)
pytestmark = pytest.mark.xdist_group("spark")


@pytest.fixture(scope="module")
def parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spark-events") / "events.parquet"
    pq.write_table(events(), path)
    return path


def names_a_planted_row(message: str) -> None:
    """``message`` stops at one of the planted bad rows and names its column."""
    found = re.search(r"row id=(\d+)\b.*?column '(\w+)'", message)
    assert found is not None, message
    row, column = int(found.group(1)), found.group(2)
    assert row in BAD and BAD[row][0] == column, message


def model_copy(tmp_path: Path) -> Path:
    """The breast-cancer model under a name no Spark worker has loaded yet."""
    return Path(shutil.copytree(MODEL, tmp_path / f"bc-{uuid.uuid4().hex[:8]}"))


@pytest.mark.parametrize("mode", ["error", "skip", "flag"])
def test_spark_equals_single_process(spark, parquet: Path, tmp_path: Path, mode: str) -> None:
    one, dist = tmp_path / "one.parquet", tmp_path / "spark.parquet"
    options = dict(cols=FEATURES, keep=["id", "site"], on_bad_row=mode)
    if mode == "error":
        with pytest.raises(DataError) as single:
            score_file(MODEL, parquet, one, **options)
        with pytest.raises(DataError) as spread:
            score_job(spark, MODEL, in_path=str(parquet), out_path=str(dist), **options)
        # the file is spread over the task slots, each task stopping at its first bad row:
        # the job names one of them, as the single-process engine words it; nothing is written
        assert "row id=17, site='s2': column 'f3' is missing" in str(single.value)
        names_a_planted_row(str(spread.value))
        assert list(tmp_path.iterdir()) == []
        return
    a = score_file(MODEL, parquet, one, **options)
    b = score_job(spark, MODEL, in_path=str(parquet), out_path=str(dist), **options)
    for key in ("rows", "scored", "bad", "anomalies"):
        assert a[key] == b[key], key
    assert b["bad"] == len(BAD) and b["batches"] >= 8  # batches of 256 rows
    x, y = pq.read_table(one), pq.read_table(dist).sort_by("id")
    assert x.schema.names == y.schema.names
    assert x.num_rows == (2276 if mode == "flag" else 2276 - len(BAD))
    for name in ("id", "site", "is_anomaly", *(["reason"] if mode == "flag" else [])):
        assert x.column(name).to_pylist() == y.column(name).to_pylist(), name
    for name in ("score", "percentile"):  # graph calls of 256 rows, not 4096: float32 rounding
        np.testing.assert_allclose(y.column(name).to_numpy(zero_copy_only=False),
                                   x.column(name).to_numpy(zero_copy_only=False), rtol=1e-5)


def test_dataframe_scored_with_one_runtime_load_per_worker(spark, tmp_path: Path) -> None:
    table = events().select(["id", *FEATURES[::-1]])  # columns in another order
    clean = table.filter(pa.array(~np.isin(np.arange(table.num_rows), list(BAD))))
    df = spark.createDataFrame(clean.to_pandas()).repartition(6)
    model = model_copy(tmp_path)
    counters = ScoreCounters(spark)
    rows = score(df, model, cols=FEATURES, keep=["id"], counters=counters).collect()
    counts = counters.values()
    # two cores: at most two Python workers, each loading the model once for all batches
    assert 1 <= counts["loads"] <= 2 and counts["batches"] >= 6
    assert counts["rows"] == counts["scored"] == clean.num_rows == len(rows)
    rows.sort(key=lambda r: r["id"])
    x = np.column_stack([np.asarray(clean.column(f).to_pylist(), dtype=np.float64)
                         for f in FEATURES])
    expected = open_runtime(model).anomaly_score(x)
    np.testing.assert_allclose([r["score"] for r in rows], expected.scores, rtol=1e-5)
    assert [r["is_anomaly"] for r in rows] == expected.is_anomaly.tolist()
    assert [r["id"] for r in rows] == clean.column("id").to_pylist()


def test_an_input_of_fewer_splits_than_slots_is_spread(spark, parquet: Path,
                                                        tmp_path: Path) -> None:
    """A Parquet file of one row group has one non-empty split whatever Spark's byte ranges
    say: scoring it as it is leaves every task slot but one idle. ``score_job`` spreads such
    an input round-robin over the slots, and the scores do not change."""
    slots = spark.sparkContext.defaultParallelism
    assert slots >= 2, "the suite's Spark session runs local[2]"
    assert parquet_row_groups(parquet) == 1
    df = spark.read.parquet(str(parquet))
    assert too_few_splits(spark, df, str(parquet))
    assert too_few_splits(spark, df, "file://" + str(parquet))
    groups = tmp_path / "groups.parquet"
    pq.write_table(events(), groups, row_group_size=500)  # 5 row groups
    assert not too_few_splits(spark, spark.read.parquet(str(groups)), str(groups))
    assert too_few_splits(spark, df.coalesce(1)) and not too_few_splits(spark, df.repartition(4))

    table = events()
    clean = table.filter(pa.array(~np.isin(np.arange(table.num_rows), list(BAD))))
    df = spark.createDataFrame(clean.to_pandas()).coalesce(1)
    model = model_copy(tmp_path)
    spread = score(df, model, cols=FEATURES, keep=["id"], spread=True)
    kept = score(df, model, cols=FEATURES, keep=["id"])
    assert spread.rdd.getNumPartitions() == slots
    assert kept.rdd.getNumPartitions() == 1
    a = sorted(spread.collect(), key=lambda r: r["id"])
    b = sorted(kept.collect(), key=lambda r: r["id"])
    assert [r["id"] for r in a] == [r["id"] for r in b] == clean.column("id").to_pylist()
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], rtol=1e-5)


def _slow(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        time.sleep(0.5)
        yield batch


def test_cancelled_job_leaves_no_output(spark, parquet: Path, tmp_path: Path) -> None:
    df = spark.read.parquet(str(parquet)).repartition(8)
    df.mapInArrow(_slow, df.schema).createOrReplaceTempView("slow_events")
    out = tmp_path / "scores.parquet"
    failure: list[BaseException] = []

    def job() -> None:
        try:
            score_job(spark, MODEL, in_table="slow_events", out_path=str(out), cols=FEATURES,
                      keep=["id"], on_bad_row="skip")
        except BaseException as err:  # noqa: BLE001 (the test inspects it)
            failure.append(err)

    worker = threading.Thread(target=job)
    worker.start()
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".scores.parquet.*.tmp/_temporary")):
        assert worker.is_alive() and time.monotonic() < deadline, "the job never started"
        time.sleep(0.1)
    spark.sparkContext.cancelAllJobs()
    worker.join(120)
    assert failure and not worker.is_alive()
    assert not out.exists() and not list(tmp_path.glob(".scores.parquet.*"))


def test_refused_before_any_job(spark, parquet: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture) -> None:
    df = spark.read.parquet(str(parquet))
    broken = model_copy(tmp_path)
    (broken / "log_prob.onnx").write_bytes(b"not the exported graph")
    tracker = spark.sparkContext.statusTracker()
    jobs = len(tracker.getJobIdsForGroup())
    with pytest.raises(ManifestError, match="log_prob.onnx fails its sha256 check"):
        score(df, broken, cols=FEATURES)
    with pytest.raises(DataError, match="--cols names columns that are not in the input: "
                                        "nope; available: id, site, f0"):
        score(df, MODEL, cols=[*FEATURES[:29], "nope"])
    assert len(tracker.getJobIdsForGroup()) == jobs  # no job ran
    # through the command line (a session that is running is used, and left running)
    out = tmp_path / "scores.parquet"
    base = ["score", "--engine", "spark", "--model", str(MODEL), "--in", str(parquet),
            "--out", str(out), "--cols", ",".join(FEATURES), "--keep-cols", "id"]
    assert main([*base, "--on-bad-row", "skip", "--no-progress",
                 "--spark-conf", "spark.sql.execution.arrow.maxRecordsPerBatch=512"]) == 0
    assert pq.read_table(out).num_rows == 2276 - len(BAD)
    assert main([*base, "--on-bad-row", "skip"]) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"error: output '{out}' exists; pass --overwrite to replace it")
    assert main([*base, "--overwrite"]) == 2  # a bad row; the earlier output stays
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("genserve score: error: row id=") and err.endswith(
        "; choose --on-bad-row skip or flag to score the other rows"), err
    names_a_planted_row(err)
    assert pq.read_table(out).num_rows == 2276 - len(BAD)
    # a table in, a table out
    df.createOrReplaceTempView("events_view")
    assert main(["score", "--engine", "spark", "--model", str(MODEL), "--in-table",
                 "events_view", "--out-table", "scored", "--cols", ",".join(FEATURES),
                 "--keep-cols", "id", "--on-bad-row", "flag"]) == 0
    scored = spark.table("scored")
    assert scored.count() == 2276 and scored.filter("reason IS NOT NULL").count() == len(BAD)
    assert spark.sparkContext.getConf().get("spark.master") == "local[2]"  # still running
