"""Bulk scoring: a whole table's anomaly scores through the served runtime (``genserve
score``), one output row per input row, as CSV or Parquet.

The numbers are those ``POST /anomaly_score`` returns for the same rows. The input is read in
bounded record batches (``artifact.tables.iter_batches``: Parquet natively, CSV/NPY/NPZ
through the same reader as training data) and scored in graph calls of a fixed number of
rows aligned to the start of the file, so the output depends neither on the chunk size nor on
memory. :func:`score_batch` is the one step from an input batch to an output batch; the
single-process engine here and the Spark engine (``genserve.spark``) both call it.

Output columns: the kept key columns (``keep``), then ``score``, ``percentile``,
``is_anomaly``, and with ``on_bad_row="flag"`` a ``reason`` (null for scored rows). A row
whose feature values are missing, not numbers, NaN or Inf is a bad row: ``error`` stops at the
first one (naming its keys and column), ``skip`` leaves it out, ``flag`` writes it with null
scores and the reason.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa

from artifact.conditions import label_indices
from artifact.manifest import Manifest
from artifact.tables import (
    DataError,
    Features,
    bad_value,
    check_columns,
    features,
    iter_batches,
    numeric_columns,
    table_format,
    table_schema,
)
from service.progress import progress_bar
from service.runtime import InputError, ModelRuntime, open_runtime
from service.score_files import HEADER, check_output, open_sink, out_format

__all__ = ["ON_BAD_ROW", "REASON", "ScoreCounts", "ScorePlan", "plan_scoring", "read_ahead",
           "reblock", "score_batch", "score_file"]

REASON = "reason"
ON_BAD_ROW = ("error", "skip", "flag")

Rows = TypeVar("Rows", np.ndarray, pa.RecordBatch)


@dataclass(frozen=True)
class ScorePlan:
    """What one scoring job reads and writes, checked against the input's schema and the
    model before any row is read (:func:`plan_scoring`).

    Args:
        cols: the feature columns, in the order the model takes them.
        keep: key columns copied to the output before the scores.
        on_bad_row: ``error``, ``skip`` or ``flag`` (see the module docstring).
        target_fpr: flag at this false-positive rate instead of the calibrated one.
        per_dim: ``score`` as NLL per column (nats/dim); flags and percentiles unchanged.
        dim: the model's width (``per_dim``'s divisor).
        condition: a conditional model's label column or context columns (the names its
            manifest records), read beside the features.
        classes: a label model's class names.
    """

    cols: tuple[str, ...]
    keep: tuple[str, ...] = ()
    on_bad_row: str = "error"
    target_fpr: float | None = None
    per_dim: bool = False
    dim: int = 1
    condition: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()

    @property
    def read(self) -> list[str]:
        """The input columns a job reads: keys, then features and the condition's columns
        not already among them."""
        return list(dict.fromkeys((*self.keep, *self.cols, *self.condition)))

    @property
    def names(self) -> list[str]:
        """The columns of a batch's feature array: the features, then the condition's."""
        return [*self.cols, *self.condition]

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The output's schema for an input of ``schema``."""
        fields = [schema.field(k) for k in self.keep]
        fields += [pa.field("score", pa.float64()), pa.field("percentile", pa.float64()),
                   pa.field("is_anomaly", pa.bool_())]
        if self.on_bad_row == "flag":
            fields.append(pa.field(REASON, pa.string()))
        return pa.schema(fields)


def plan_scoring(schema: pa.Schema, manifest: Manifest, *, cols: Sequence[str] | None = None,
                 keep: Sequence[str] = (), on_bad_row: str = "error",
                 target_fpr: float | None = None, per_dim: bool = False) -> ScorePlan:
    """The plan for scoring a table of ``schema`` with the model of ``manifest``.

    ``cols`` defaults to the column names the manifest records, else every numeric column
    that is not a key, in the input's order. Raises ``DataError`` (one line: what is wrong,
    what is allowed) on an unknown mode, absent columns, a width other than the model's, key
    names that clash with the output's, or a model without anomaly calibration.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise DataError(f"unknown --on-bad-row {on_bad_row!r}; choose one of "
                        f"{', '.join(ON_BAD_ROW)}")
    if manifest.calibration is None:
        raise DataError(f"model '{manifest.name}' has no anomaly calibration; export it with "
                        "fit-anomaly or `genserve export` (which calibrates)")
    if target_fpr is not None and not 0.0 < target_fpr < 1.0:
        raise DataError(f"target_fpr must be in (0, 1); got {target_fpr}")
    keep = tuple(keep)
    check_columns(schema, list(keep), "--keep-cols")
    clash = [k for k in keep if k in (*HEADER, REASON)]
    if clash:
        raise DataError(f"--keep-cols {', '.join(clash)} would clash with the output columns "
                        f"{', '.join((*HEADER, REASON))}; rename them first")
    cond = manifest.condition
    condition: tuple[str, ...] = ()
    if cond is not None:
        if not cond.columns:
            raise DataError(f"model '{manifest.name}' is conditioned on a {cond.kind} but "
                            "records no column to read it from; train it from a table with "
                            "--label-col or --context-cols")
        check_columns(schema, cond.columns, f"the model's {cond.kind} column")
        condition = tuple(cond.columns)
    if cols is None:
        recorded = manifest.data.columns
        if recorded and all(c in schema.names for c in recorded):
            cols = recorded
        else:
            cols = [c for c in numeric_columns(schema) if c not in keep + condition]
        how = "; choose them with --cols"
    else:
        check_columns(schema, list(cols), "--cols")
        how = ""
    if len(cols) != manifest.dim:
        raise DataError(f"the selected rows have {len(cols)} columns, but the model expects "
                        f"{manifest.dim} ({', '.join(cols) or 'no numeric columns'}){how}")
    return ScorePlan(tuple(cols), keep, on_bad_row, target_fpr, per_dim, manifest.dim,
                     condition, tuple(cond.classes) if cond is not None else ())


@dataclass
class ScoreCounts:
    """Rows read, scored, bad (skipped or flagged by ``on_bad_row``) and anomalous."""

    rows: int = 0
    scored: int = 0
    bad: int = 0
    anomalies: int = 0

    def add(self, other: ScoreCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)


def _row_name(batch: pa.RecordBatch, plan: ScorePlan, row: int,
              locate: Callable[[int], str]) -> str:
    if plan.keep:
        return "row " + ", ".join(f"{k}={batch.column(k)[row].as_py()!r}" for k in plan.keep)
    return locate(row)


def score_batch(rt: ModelRuntime, batch: pa.RecordBatch, plan: ScorePlan, *,
                first_row: int = 0,
                locate: Callable[[int], str] = lambda i: f"row {i + 1}",
                feats: Features | None = None,
                ) -> tuple[pa.RecordBatch, ScoreCounts]:
    """One input batch's output batch (``plan.output_schema``) and counts.

    ``first_row``: the index of the batch's first row in its input; seeded draws (``denoise``
    noise, Hutchinson probes) are keyed by ``first_row + i``, so a row's score depends on its
    place in the file, never on how the file is cut into batches. ``locate(i)`` names the
    batch's row ``i`` in an error when there are no key columns (e.g. its line in the file).
    ``feats``: ``features(batch, plan.names)`` when the caller has it already (built ahead,
    in a reading thread). Raises ``DataError`` at the first bad row under
    ``on_bad_row="error"``.
    """
    names = plan.names
    feats = features(batch, names) if feats is None else feats
    bad, given = feats.bad, _condition(feats.x[:, plan.dim:], plan)
    unknown = np.zeros(len(bad), dtype=bool)
    if "labels" in given:  # a label that names no class cannot be scored either
        unknown = (given["labels"] < 0) & ~bad
        bad = bad | unknown
    n_bad = int(bad.sum())

    def why(i: int) -> str:
        if unknown[i]:
            return (f"column '{plan.condition[0]}' is {feats.x[i, plan.dim]:g}, not a class "
                    f"of the model (its classes: {', '.join(plan.classes)})")
        return bad_value(batch, names[feats.column[i]], i)

    if n_bad and plan.on_bad_row == "error":
        i = int(np.argmax(bad))
        raise DataError(f"{_row_name(batch, plan, i, locate)}: {why(i)}; choose --on-bad-row "
                        "skip or flag to score the other rows")
    good = ~bad
    x = feats.x[good, :plan.dim] if n_bad else feats.x[:, :plan.dim]
    given = {k: v[good] for k, v in given.items()} if n_bad else given
    scores = np.empty(0)
    percentile, flags = np.empty(0), np.empty(0, dtype=bool)
    if len(x):
        try:
            rows = first_row + (np.flatnonzero(good) if n_bad else np.arange(len(x)))
            res = rt.anomaly_score(x, target_fpr=plan.target_fpr, rows=rows, **given)
        except InputError as err:
            raise DataError(str(err)) from None
        scores = res.scores / plan.dim if plan.per_dim else res.scores
        percentile, flags = res.percentile, res.is_anomaly
    keys = [batch.column(k) for k in plan.keep]
    if n_bad and plan.on_bad_row == "skip":
        mask = pa.array(good)
        keys = [k.filter(mask) for k in keys]
    if n_bad and plan.on_bad_row == "flag":
        outs = [_spread(v, good) for v in (scores, percentile, flags)]
        arrays = [pa.array(v, mask=bad) for v in outs]
    else:
        arrays = [pa.array(scores), pa.array(percentile), pa.array(flags)]
    if plan.on_bad_row == "flag":
        reasons = [None] * batch.num_rows
        for i in np.flatnonzero(bad):
            reasons[i] = why(int(i))
        arrays.append(pa.array(reasons, type=pa.string()))
    out = pa.RecordBatch.from_arrays([*keys, *arrays],
                                     schema=plan.output_schema(batch.schema))
    counts = ScoreCounts(rows=batch.num_rows, scored=len(x), bad=n_bad,
                         anomalies=int(flags.sum()))
    return out, counts


def _condition(values: np.ndarray, plan: ScorePlan) -> dict[str, np.ndarray]:
    """The runtime's ``labels`` (class indices, -1 for none) or ``context`` of the rows whose
    condition columns hold ``values: (rows, width)``; ``{}`` for an unconditional model."""
    if not plan.condition:
        return {}
    if plan.classes:
        return {"labels": label_indices(list(plan.classes), values[:, 0])}
    return {"context": values}


def _spread(values: np.ndarray, good: np.ndarray) -> np.ndarray:
    full = np.zeros(len(good), dtype=values.dtype)
    full[good] = values
    return full


def reblock(chunks: Iterator[Rows], size: int) -> Iterator[Rows]:
    """Regroup a stream of row blocks (arrays or record batches) into blocks of exactly
    ``size`` rows (the last may be shorter), aligned to the start of the stream."""
    parts: list[Any] = []
    held = 0

    def joined() -> Any:
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if isinstance(parts[0], np.ndarray) else (
            pa.concat_batches(parts))

    for chunk in chunks:
        while len(chunk):
            take = chunk[: size - held]
            chunk = chunk[len(take):]
            parts.append(take)
            held += len(take)
            if held == size:
                yield joined()
                parts, held = [], 0
    if held:
        yield joined()


_END = object()


def read_ahead(items: Iterator[Rows], depth: int = 1) -> Iterator[Rows]:
    """``items``, drawn ``depth`` ahead in a thread: Arrow's Parquet decoding releases the
    GIL, so reading the next batch overlaps scoring this one. An error of ``items`` is
    raised here; the thread stops when the consumer does."""
    ready: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((_END, err))

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, err = ready.get()
            if err is not None:
                raise err
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()


@dataclass
class _Job:
    counts: ScoreCounts = field(default_factory=ScoreCounts)
    start: float = field(default_factory=time.perf_counter)


def score_file(
    model_dir: str | os.PathLike[str],
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    in_format: str | None = None,
    cols: Sequence[str] | None = None,
    keep: Sequence[str] = (),
    on_bad_row: str = "error",
    overwrite: bool = False,
    chunk_rows: int = 65_536,
    batch_rows: int = 4096,
    per_dim: bool = False,
    target_fpr: float | None = None,
    runtime: ModelRuntime | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every row of ``in_path`` with the artifact in ``model_dir``; write CSV or
    Parquet (by ``out_path``'s suffix), one line per input row in input order (``skip``
    leaves bad rows out).

    The output is written to a temporary file beside ``out_path`` and moved into place only
    when every row is scored: a failure or an interruption leaves no partial output, and an
    existing ``out_path`` (replaced only with ``overwrite``) untouched. The numbers are those
    of ``ModelRuntime.anomaly_score`` (what ``POST /anomaly_score`` returns for the same rows).

    Memory is bounded by ``max(chunk_rows, batch_rows)`` rows (and a Parquet input's row
    group). The input is read in chunks of ``chunk_rows`` and scored in graph calls of
    ``batch_rows`` rows aligned to the start of the file, so the output does not depend on
    ``chunk_rows`` at all, bit for bit. (Float32 graphs round a row's result slightly
    differently in batches of other sizes, ~1e-7 relative: the service, which batches
    requests together, agrees to that rounding.)

    Args:
        in_format: ``csv``, ``npy``, ``npz`` or ``parquet`` (None: from the suffix; a
            directory is a Parquet data set).
        cols: feature columns (None: see :func:`plan_scoring`).
        keep: key columns copied to the output.
        on_bad_row: ``error``, ``skip`` or ``flag``.
        overwrite: replace an existing ``out_path``.
        chunk_rows: rows read from the file at a time.
        batch_rows: rows per graph call.
        per_dim: report ``score`` as NLL per column (nats/dim).
        target_fpr: flag at this false-positive rate instead of the calibrated one.
        runtime: an open ``service.runtime.ModelRuntime`` to reuse (else opened here).
        progress: a progress bar (rows scored).
    Returns:
        ``{"rows", "scored", "bad", "anomalies", "on_bad_row", "threshold", "seconds", "out",
        "per_dim"}``.
    """
    if chunk_rows < 1 or batch_rows < 1:
        raise ValueError(f"chunk_rows and batch_rows must be >= 1; got {chunk_rows}, "
                         f"{batch_rows}")
    out_path = Path(out_path)
    fmt = out_format(out_path)
    check_output(out_path, overwrite)
    in_format = table_format(in_path, in_format)
    rt = runtime if runtime is not None else open_runtime(model_dir)
    schema = table_schema(in_path, in_format)
    plan = plan_scoring(schema, rt.manifest, cols=cols, keep=keep,
                        on_bad_row=on_bad_row, target_fpr=target_fpr, per_dim=per_dim)
    threshold = (rt.manifest.calibration.threshold if target_fpr is None
                 else rt.threshold_at(target_fpr))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    job = _Job()
    bar = progress_bar(desc="score", unit="rows", disable=not progress)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        sink = open_sink(tmp, fmt, plan.output_schema(schema))
        try:
            # reading, cutting into graph calls and building the feature arrays run in a
            # thread ahead of the scoring (Arrow and numpy release the GIL for most of it)
            blocks = reblock(iter_batches(in_path, chunk_rows, in_format=in_format,
                                          columns=plan.read), batch_rows)
            for batch, feats in read_ahead((b, features(b, plan.names)) for b in blocks):
                done = job.counts.rows
                out, counts = score_batch(rt, batch, plan, first_row=done, feats=feats,
                                          locate=lambda i, d=done: f"row {d + i + 1}")
                sink.write(out)
                job.counts.add(counts)
                bar.update(batch.num_rows)
        finally:
            sink.close()
        if job.counts.rows == 0:
            raise DataError(f"{in_path} has no data rows; it needs at least one row")
        if out_path.is_dir():  # an earlier Spark output, replaced as asked (--overwrite)
            shutil.rmtree(out_path)
        os.replace(tmp, out_path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, DataError) and not str(err).startswith(str(in_path)):
            raise DataError(f"{in_path}: {err}") from None
        raise
    finally:
        bar.close()
    scale = 1.0 / rt.dim if per_dim else 1.0
    return {**asdict(job.counts), "on_bad_row": on_bad_row, "threshold": threshold * scale,
            "seconds": round(time.perf_counter() - job.start, 3), "out": str(out_path),
            "per_dim": per_dim}
