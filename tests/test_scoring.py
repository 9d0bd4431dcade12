"""Bulk scoring in one process with Parquet in and out: key columns carried, feature columns
chosen, bad rows stopped at, skipped or flagged, nothing half-written (``genserve score``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from events import BAD, FEATURES, MODEL, TEXT, events

from artifact.tables import DataError, features, iter_table
from cli import main
from service.runtime import ModelRuntime, open_runtime
from service.score_files import read_scores
from service.scoring import score_file


def clean_rows(table: pa.Table) -> np.ndarray:
    """The features of ``table``'s rows that are not planted bad rows, ``(rows, 30)``."""
    good = ~np.isin(np.arange(table.num_rows), list(BAD))
    return np.column_stack([np.asarray(table.column(f).to_pylist(), dtype=object)[good]
                            .astype(np.float64) for f in FEATURES])


@pytest.fixture(scope="module")
def table() -> pa.Table:
    return events()


@pytest.fixture(scope="module")
def parquet(table: pa.Table, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("events") / "events.parquet"
    pq.write_table(table, path, row_group_size=1000)
    return path


def test_parquet_in_every_bad_row_mode(table: pa.Table, parquet: Path, tmp_path: Path) -> None:
    """Keys carried, scores those of the runtime, bad rows stopped at, skipped or flagged."""
    rt = open_runtime(MODEL)
    expected = rt.anomaly_score(clean_rows(table))
    good_ids = [i for i in range(table.num_rows) if i not in BAD]
    out = tmp_path / "scores.parquet"
    with pytest.raises(DataError, match="row id=17, site='s2': column 'f3' is missing; "
                                        "choose --on-bad-row skip or flag"):
        score_file(MODEL, parquet, out, cols=FEATURES, keep=["id", "site"], runtime=rt)
    assert list(tmp_path.iterdir()) == []  # nothing at the output, no temporary left

    info = score_file(MODEL, parquet, out, cols=FEATURES, keep=["id"], on_bad_row="skip",
                      chunk_rows=300, runtime=rt)
    assert (info["rows"], info["scored"], info["bad"]) == (table.num_rows, len(good_ids), 5)
    got = pq.read_table(out)
    assert got.column_names == ["id", "score", "percentile", "is_anomaly"]
    assert got.column("id").to_pylist() == good_ids
    np.testing.assert_allclose(got.column("score").to_numpy(), expected.scores, rtol=1e-6)
    np.testing.assert_array_equal(got.column("is_anomaly").to_numpy(), expected.is_anomaly)
    assert info["anomalies"] == int(expected.is_anomaly.sum()) > 0

    flagged = tmp_path / "flagged.csv"
    info = score_file(MODEL, parquet, flagged, cols=FEATURES, keep=["id", "site"],
                      on_bad_row="flag", runtime=rt)
    assert (info["rows"], info["scored"], info["bad"]) == (table.num_rows, len(good_ids), 5)
    lines = flagged.read_text().splitlines()
    assert lines[0] == "id,site,score,percentile,is_anomaly,reason"
    assert lines[18] == "17,s2,,,,column 'f3' is missing"
    assert lines[408] == f"407,s2,,,,\"column '{TEXT}' holds 'n/a', which is not a number\""
    assert lines[1006] == "1005,s0,,,,column 'f11' is nan; NaN/Inf values cannot be scored"
    assert lines[1510] == "1509,s0,,,,column 'f20' is inf; NaN/Inf values cannot be scored"
    back = read_scores(flagged)
    bad = np.isin(np.arange(table.num_rows), list(BAD))
    assert np.isnan(back["score"][bad]).all() and not back["is_anomaly"][bad].any()
    np.testing.assert_array_equal(back["score"][~bad], got.column("score").to_numpy())


def test_columns_chosen_by_name_or_by_type(table: pa.Table, tmp_path: Path) -> None:
    """Default features: every numeric column that is not a key, in the file's order; named
    ones in the order given; absent names listed with the available ones."""
    numeric = table.set_column(table.column_names.index(TEXT), TEXT,
                               pa.array([float(v) if v not in (None, "n/a") else None
                                         for v in table.column(TEXT).to_pylist()]))
    clean = numeric.filter(pa.array(~np.isin(np.arange(numeric.num_rows), list(BAD))))
    src = tmp_path / "clean.data"  # no suffix: the format is named
    pq.write_table(clean.select(["id", *FEATURES[::-1], "site"]), src)
    rt = open_runtime(MODEL)
    expected = rt.anomaly_score(clean_rows(table)).scores
    score_file(MODEL, src, tmp_path / "named.parquet", in_format="parquet", cols=FEATURES,
               keep=["site"], runtime=rt)
    got = pq.read_table(tmp_path / "named.parquet")
    np.testing.assert_allclose(got.column("score").to_numpy(), expected, rtol=1e-6)
    assert got.column("site").to_pylist() == clean.column("site").to_pylist()
    # by type: id is numeric but kept, so the 30 features are what remains (reversed here)
    reordered = tmp_path / "reordered.parquet"
    pq.write_table(clean.select(["id", *FEATURES, "site"]), reordered)
    score_file(MODEL, reordered, tmp_path / "typed.csv", keep=["id"], runtime=rt)
    np.testing.assert_allclose(read_scores(tmp_path / "typed.csv")["score"], expected,
                               rtol=1e-6)
    # the whole numeric table, read as training data would be: 31 columns with the key
    assert next(iter_table(reordered, 10)).shape == (10, 31)
    cases = {
        "absent": (dict(cols=[*FEATURES[:29], "f99"]),
                   "--cols names columns that are not in the input: f99; available: id, f0"),
        "width": (dict(cols=FEATURES[:3]), "the selected rows have 3 columns, but the model "
                                           "expects 30"),
        "untyped": (dict(), "the selected rows have 31 columns, but the model expects 30 "
                            r"\(id, f0, .*\); choose them with --cols"),
        "key": (dict(keep=["when"]), "--keep-cols names columns that are not in the input: "
                                     "when"),
        "mode": (dict(on_bad_row="ignore"), "unknown --on-bad-row 'ignore'; choose one of "
                                            "error, skip, flag"),
    }
    for name, (options, message) in cases.items():
        with pytest.raises(DataError, match=message):
            score_file(MODEL, reordered, tmp_path / f"{name}.parquet", runtime=rt, **options)
        assert not (tmp_path / f"{name}.parquet").exists()
    (tmp_path / "taken.parquet").write_text("an earlier result\n")
    with pytest.raises(DataError, match="exists; pass --overwrite to replace it"):
        score_file(MODEL, reordered, tmp_path / "taken.parquet", keep=["id"], runtime=rt)
    score_file(MODEL, reordered, tmp_path / "taken.parquet", keep=["id"], overwrite=True,
               runtime=rt)
    assert pq.read_table(tmp_path / "taken.parquet").num_rows == clean.num_rows


def interrupted(real: ModelRuntime, at: int) -> tuple[ModelRuntime, list[int]]:
    """``real``, interrupted (as by Ctrl-C) at its ``at``-th anomaly_score call; and the
    sizes of the calls it got."""
    calls: list[int] = []

    class Interrupted(type(real)):  # type: ignore[misc]
        def anomaly_score(self, x: np.ndarray, **options: object):  # type: ignore[override]
            calls.append(len(x))
            if len(calls) == at:
                raise KeyboardInterrupt
            return super().anomaly_score(x, **options)

    rt = Interrupted.__new__(Interrupted)
    rt.__dict__.update(real.__dict__)
    return rt, calls


def test_interrupted_job_leaves_no_output(parquet: Path, tmp_path: Path) -> None:
    rt, calls = interrupted(open_runtime(MODEL), at=3)
    out = tmp_path / "scores.parquet"
    out.write_bytes(b"an earlier result")
    with pytest.raises(KeyboardInterrupt):
        score_file(MODEL, parquet, out, cols=FEATURES, on_bad_row="skip", batch_rows=500,
                   overwrite=True, runtime=rt)
    assert len(calls) == 3  # two batches were written to the temporary file
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == b"an earlier result"


def test_command_line(parquet: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "scores.parquet"
    base = ["score", "--model", str(MODEL), "--in", str(parquet), "--out", str(out)]
    assert main([*base, "--cols", ",".join(FEATURES), "--keep-cols", "id",
                 "--on-bad-row", "flag", "--no-progress"]) == 0
    counts = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (counts["rows"], counts["bad"], counts["on_bad_row"]) == (2276, 5, "flag")
    assert pq.read_table(out).column("reason").null_count == 2276 - 5
    assert main([*base, "--keep-cols", "id,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genserve score: error: ") and "\n" not in err
    assert "exists; pass --overwrite" in err  # the output is checked first
    assert main([*base, "--overwrite", "--keep-cols", "id,nope"]) == 2
    assert "--keep-cols names columns that are not in the input: nope; available: id, site" \
        in capsys.readouterr().err
    # --engine spark without pyspark: how to install it, exit 2
    monkeypatch.setitem(sys.modules, "pyspark", None)
    monkeypatch.setitem(sys.modules, "pyspark.sql", None)
    monkeypatch.setitem(sys.modules, "genserve.spark", None)
    assert main([*base, "--overwrite", "--engine", "spark"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("genserve score: error: --engine spark needs pyspark, which is not "
                   "installed; install it with pip install 'genserve[spark]' (and a Java 17+ "
                   "runtime)")


def test_features_find_every_row_that_cannot_be_scored() -> None:
    """Rows are screened by their sum and tested cell by cell only when it is not finite: a
    NaN, +Inf or -Inf anywhere in a row (or +Inf and -Inf together, whose sum is NaN) marks
    it, naming its first such column, while finite rows whose sum overflows stay good."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 7))
    planted = {3: (2, np.nan), 50: (0, np.inf), 51: (6, -np.inf), 120: (4, np.nan)}
    for row, (col, value) in planted.items():
        x[row, col] = value
    x[77, 1], x[77, 5] = np.inf, -np.inf  # sum NaN; first bad column 1
    x[150, :] = 1e308  # finite cells, sum overflows: a good row
    x[151, 0], x[151, 1] = -1e308, -1e308
    names = [f"c{j}" for j in range(7)]
    feats = features(pa.RecordBatch.from_arrays(list(x.T), names=names), names)
    expected = {**{r: c for r, (c, _) in planted.items()}, 77: 1}
    assert sorted(np.flatnonzero(feats.bad)) == sorted(expected)
    assert {int(r): int(feats.column[r]) for r in np.flatnonzero(feats.bad)} == expected
    assert (feats.column[~feats.bad] == -1).all()
    np.testing.assert_array_equal(feats.x[~feats.bad], x[~feats.bad])
