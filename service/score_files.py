"""The output files of bulk scoring: their format by suffix, CSV and Parquet writers, and
reading a CSV of scores back.

``open_sink(path, fmt, schema)`` returns a writer of record batches: CSV with floats printed
by ``repr`` (they parse back to the same floats), flags as ``true``/``false`` and nulls as
empty cells; Parquet in row groups of about ``ParquetSink.ROW_GROUP`` rows whatever the
batches' size. ``service.scoring`` writes every output through it (the single-process
engine and each Spark task alike).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from artifact.tables import DataError

__all__ = ["HEADER", "OUT_FORMATS", "Sink", "check_output", "open_sink", "out_format",
           "read_scores"]

HEADER = ("score", "percentile", "is_anomaly")
OUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def out_format(path: str | os.PathLike[str]) -> str:
    """``csv`` or ``parquet``, from an output path's suffix."""
    fmt = OUT_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise DataError(f"cannot write '{path}': the output must end in "
                        f"{', '.join(OUT_FORMATS)}")
    return fmt


def check_output(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Refuse an output path that exists unless ``overwrite``."""
    if Path(path).exists() and not overwrite:
        raise DataError(f"output '{path}' exists; pass --overwrite to replace it (it is "
                        "replaced only when the whole job succeeds)")


class Sink(Protocol):
    def write(self, batch: pa.RecordBatch) -> None: ...
    def close(self) -> None: ...


class CsvSink:
    """Floats printed with ``repr`` (they parse back to the same floats), flags as
    ``true``/``false``, nulls as empty cells."""

    def __init__(self, path: str, schema: pa.Schema) -> None:
        self.fh = open(path, "w", newline="")  # closed by close()
        self.writer = csv.writer(self.fh, lineterminator="\n")
        self.writer.writerow(schema.names)

    def write(self, batch: pa.RecordBatch) -> None:
        columns = [[_cell(v) for v in column.to_pylist()] for column in batch.columns]
        self.writer.writerows(zip(*columns, strict=True))

    def close(self) -> None:
        self.fh.close()


def _cell(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


class ParquetSink:
    """Row groups of about ``ROW_GROUP`` rows, whatever the batches' size (small row groups
    cost writing time and file size). Dictionary encoding only for text keys: on scores and
    numeric keys (nearly all values distinct) it quadruples the writing time for nothing.
    Float columns are stored uncompressed: Snappy does not shrink the scores' and
    percentiles' mantissas, and compressing them took most of the writing time."""

    ROW_GROUP = 65_536

    def __init__(self, path: str, schema: pa.Schema) -> None:
        text = [f.name for f in schema if pa.types.is_string(f.type)
                or pa.types.is_large_string(f.type) or pa.types.is_dictionary(f.type)]
        codec = {f.name: "none" if pa.types.is_floating(f.type) else "snappy" for f in schema}
        self.writer = pq.ParquetWriter(path, schema, use_dictionary=text or False,
                                       compression=codec)
        self.held: list[pa.RecordBatch] = []

    def write(self, batch: pa.RecordBatch) -> None:
        self.held.append(batch)
        if sum(b.num_rows for b in self.held) >= self.ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if self.held:
            self.writer.write_table(pa.Table.from_batches(self.held))
            self.held = []

    def close(self) -> None:
        self.flush()
        self.writer.close()



def open_sink(path: str, fmt: str, schema: pa.Schema) -> Sink:
    """A writer of ``schema``'s record batches to ``path`` in ``fmt`` (``csv``/``parquet``)."""
    return (CsvSink if fmt == "csv" else ParquetSink)(path, schema)


def read_scores(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a CSV written by ``score_file`` back: its ``score``, ``percentile`` and
    ``is_anomaly`` columns as arrays (NaN and False where a flagged bad row has none)."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        if not set(HEADER) <= set(header):
            raise DataError(f"{path}: header {header} lacks {list(HEADER)}")
        cols = list(zip(*reader, strict=True)) or [()] * len(header)
    by_name = dict(zip(header, cols, strict=True))
    return {"score": np.array([v or "nan" for v in by_name["score"]], dtype=np.float64),
            "percentile": np.array([v or "nan" for v in by_name["percentile"]],
                                   dtype=np.float64),
            "is_anomaly": np.array([v == "true" for v in by_name["is_anomaly"]], dtype=bool)}
