"""Tables of rows from ``.csv``, ``.npy``, ``.npz`` and Parquet files: the one reader of
training data and of bulk scoring's input.

Every file is read as a stream of ``(rows, columns)`` float64 blocks (:func:`iter_table`), so
memory is bounded by one block whatever the file's size: CSV line by line, ``.npy``
memory-mapped, an ``.npz``'s member ``X`` read sequentially from the archive, and Parquet (a
file or a directory of part files) by record batches, all its numeric columns in file order.
:func:`read_table` collects the blocks (and an ``.npz``'s labels ``y``). The same checks, with
the same messages, hold for every caller: real numbers only, finite values, one width for
every row (and the model's, when one is named), at least one row. A CSV's delimiter (comma,
semicolon or tab) is sniffed, and a first row that is not all numbers is its header.

Bulk scoring reads named columns with :func:`iter_batches` (Arrow record batches of any of
these formats, columns named by the CSV header, by Parquet's schema, or ``x1 .. xD``) and turns
a batch's feature columns into numbers with :func:`features`, which marks the rows it cannot
use (missing, not a number, NaN/Inf) instead of stopping, so the caller decides what a bad row
does.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = path.write_text("a;b\\n1;2\\n3;4\\n")
    >>> read_table(path).x.tolist(), read_table(path).columns
    ([[1.0, 2.0], [3.0, 4.0]], ['a', 'b'])
"""

from __future__ import annotations

import csv
import math
import os
import zipfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from numpy.lib import format as npformat

__all__ = ["FORMATS", "SUFFIXES", "DataError", "Features", "Table", "bad_value",
           "check_columns", "csv_delimiter", "features", "iter_batches", "iter_table",
           "numeric_columns", "read_table", "table_format", "table_schema"]

SUFFIXES = (".npy", ".npz", ".csv", ".parquet")
FORMATS = ("csv", "npy", "npz", "parquet")
CSV_DELIMITERS = ",;\t"
DEFAULT_CHUNK_ROWS = 65_536


class DataError(ValueError):
    """A data file or data set that cannot be used as given; the message says why and what
    to do."""


@dataclass
class Table:
    """A whole table: ``x: (rows, columns)`` float64, ``y: (rows,)`` labels of an ``.npz``
    (or None), and a CSV's header (or ``[]``)."""

    x: np.ndarray
    y: np.ndarray | None = None
    columns: list[str] = field(default_factory=list)


def csv_delimiter(fh: TextIO) -> str:
    """The delimiter of the open text file ``fh`` among comma, semicolon and tab, sniffed
    from its first 8 KiB (``csv.Sniffer``; ``fh`` is rewound); a comma when nothing decides
    (one column, or too little text)."""
    sample = fh.read(8192)
    fh.seek(0)
    try:
        return csv.Sniffer().sniff(sample, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","


class _Reader:
    """Checks shared by every format; ``dim`` is the width a model expects (or None)."""

    def __init__(self, path: Path, dim: int | None) -> None:
        self.path, self.dim = path, dim
        self.rows = 0

    def check_width(self, width: int) -> None:
        if self.dim is not None and width != self.dim:
            raise DataError(f"{self.path}: rows have {width} columns, but the model expects "
                            f"{self.dim}")

    def check_dtype(self, dtype: np.dtype, what: str) -> None:
        if dtype.kind not in "biuf":
            raise DataError(f"{self.path}: {what} has dtype {dtype}; store real numbers only")

    def check_shape(self, shape: tuple[int, ...], what: str) -> int:
        """The width of an array of ``shape`` (1-D: one column)."""
        if len(shape) not in (1, 2):
            raise DataError(f"{self.path}: {what} has shape {shape}; expected a 2D array "
                            "(rows, columns) or a 1D array (one column)")
        if shape[0] == 0 or (len(shape) == 2 and shape[1] == 0):
            raise DataError(f"{self.path}: {what} has shape {shape}; it needs at least one "
                            "row and one column")
        width = 1 if len(shape) == 1 else int(shape[1])
        self.check_width(width)
        return width

    def block(self, values: Any, width: int, lines: list[int] | None = None) -> np.ndarray:
        """``values`` as a finite float64 ``(rows, width)`` block; ``lines`` are the CSV
        line numbers of its rows (else rows are numbered from 1 in file order)."""
        block = np.asarray(values, dtype=np.float64).reshape(-1, width)
        bad = np.argwhere(~np.isfinite(block))
        if len(bad):
            r, c = bad[0]
            line = lines[r] if lines else self.rows + r + 1
            raise DataError(f"{self.path}: row {line}, column {c + 1} is {block[r, c]}; "
                            "NaN/Inf values are not allowed (remove or impute them)")
        self.rows += len(block)
        return block

    def none_read(self, found: str) -> DataError:
        return DataError(f"{self.path} has no data rows (found {found}); it needs at least "
                         "one row")


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _csv_blocks(r: _Reader, columns: list[str], chunk_rows: int) -> Iterator[np.ndarray]:
    rows: list[list[float]] = []
    lines: list[int] = []
    width, width_line = 0, 0
    with open(r.path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=csv_delimiter(fh))
        for cells in reader:
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue  # blank line
            if not width:
                width, width_line = len(cells), reader.line_num
                r.check_width(width)
                if not all(_is_number(cell) for cell in cells):
                    columns.extend(cells)
                    continue
            if len(cells) != width:
                raise DataError(f"{r.path}: row {reader.line_num} has {len(cells)} columns, "
                                f"expected {width} (as in row {width_line}); every row needs "
                                "the same columns")
            for column, cell in enumerate(cells, start=1):
                if not _is_number(cell):
                    name = f" ('{columns[column - 1]}')" if columns else ""
                    raise DataError(f"{r.path}: row {reader.line_num}, column {column}{name} "
                                    f"holds {cell!r}, which is not a number; only numeric "
                                    "columns are supported (drop or encode that column)")
            rows.append([float(cell) for cell in cells])
            lines.append(reader.line_num)
            if len(rows) == chunk_rows:
                yield r.block(rows, width, lines)
                rows, lines = [], []
    if rows:
        yield r.block(rows, width, lines)
    elif not r.rows:
        raise r.none_read("only a header" if columns else "nothing")


def _npy_blocks(r: _Reader, chunk_rows: int) -> Iterator[np.ndarray]:
    try:
        arr = np.load(r.path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"could not read {r.path} as .npy: {err}") from None
    r.check_dtype(arr.dtype, "the array")
    width = r.check_shape(arr.shape, "the array")
    for a in range(0, arr.shape[0], chunk_rows):
        yield r.block(arr[a:a + chunk_rows], width)


def _npz_blocks(r: _Reader, chunk_rows: int) -> Iterator[np.ndarray]:
    """Member ``X`` of an ``.npz`` (stored or deflated), read sequentially."""
    with zipfile.ZipFile(r.path) as zf:
        if "X.npy" not in zf.namelist():
            found = ", ".join(n.removesuffix(".npy") for n in zf.namelist()) or "none"
            raise DataError(f"{r.path} has no array named 'X' (found keys: {found}); save "
                            "it with numpy.savez(file, X=data, y=labels)")
        with zf.open("X.npy") as fh:
            major, _ = npformat.read_magic(fh)
            read_header = (npformat.read_array_header_1_0 if major == 1
                           else npformat.read_array_header_2_0)
            shape, fortran, dtype = read_header(fh)
            r.check_dtype(dtype, "array 'X'")
            width = r.check_shape(shape, "array 'X'")
            if not (fortran and width > 1):
                per_row = dtype.itemsize * width
                for a in range(0, shape[0], chunk_rows):
                    n = min(chunk_rows, shape[0] - a)
                    buf = fh.read(n * per_row)
                    if len(buf) != n * per_row:
                        raise DataError(f"{r.path}: 'X' is truncated at row {a + 1}")
                    yield r.block(np.frombuffer(buf, dtype=dtype), width)
                return
    with np.load(r.path, allow_pickle=False) as archive:  # column-major: rows not contiguous
        x = archive["X"]
        for a in range(0, len(x), chunk_rows):
            yield r.block(x[a:a + chunk_rows], width)


def iter_table(path: str | os.PathLike[str], chunk_rows: int = DEFAULT_CHUNK_ROWS, *,
               dim: int | None = None, columns: list[str] | None = None,
               in_format: str | None = None) -> Iterator[np.ndarray]:
    """``(rows <= chunk_rows, columns)`` float64 blocks of a table file, in file order.

    Args:
        path: a ``.csv``, ``.npy``, ``.npz`` (member ``X``) or Parquet file (or a directory of
            Parquet part files: every numeric column, in the schema's order).
        chunk_rows: rows per block (memory is bounded by one block).
        dim: the width a model expects (None: any width).
        columns: a list that receives a CSV's header cells (a Parquet file's column names).
        in_format: one of :data:`FORMATS` (None: from the suffix).
    """
    path = Path(path)
    fmt = table_format(path, in_format)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
    r = _Reader(path, dim)
    if fmt == "csv":
        yield from _csv_blocks(r, columns if columns is not None else [], chunk_rows)
        return
    if fmt == "parquet":
        yield from _parquet_blocks(r, columns if columns is not None else [], chunk_rows)
        return
    blocks = _npy_blocks(r, chunk_rows) if fmt == "npy" else _npz_blocks(r, chunk_rows)
    try:
        yield from blocks
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(f"could not read {path} as .{fmt}: {err}") from None


def table_format(path: str | os.PathLike[str], in_format: str | None = None) -> str:
    """The format of the table at ``path`` (one of :data:`FORMATS`): ``in_format`` when given,
    else from the suffix (a directory is a Parquet data set); the path must exist."""
    path = Path(path)
    if in_format is not None and in_format not in FORMATS:
        raise DataError(f"unknown input format {in_format!r}; choose one of "
                        f"{', '.join(FORMATS)}")
    if not path.exists():
        raise DataError(f"data file '{path}' not found; check the path (cwd: {os.getcwd()})")
    if in_format is not None:
        fmt = in_format
    elif path.is_dir():
        fmt = "parquet"
    elif path.suffix.lower() in (*SUFFIXES, ".pq"):
        fmt = "parquet" if path.suffix.lower() == ".pq" else path.suffix.lower()[1:]
    else:
        raise DataError(f"cannot read '{path}': a table file must end in .csv, .npy, .npz or "
                        ".parquet (or name its format with --in-format)")
    if path.is_dir() and fmt != "parquet":
        raise DataError(f"'{path}' is a directory; only a Parquet data set can be a directory")
    return fmt


def _parquet_files(path: Path) -> list[Path]:
    """A Parquet file, or a directory's part files in name order (names starting with ``_``
    or ``.`` are a writer's bookkeeping, e.g. ``_SUCCESS``, and are left out)."""
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not any(
        part.startswith(("_", ".")) for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"{path} is a directory without Parquet part files")
    return files


def parquet_row_groups(path: str | os.PathLike[str]) -> int:
    """The row groups of a Parquet file or data set directory: the finest split of it that a
    reader (Spark's included) can hand to separate tasks."""
    return sum(_parquet_file(f).metadata.num_row_groups for f in _parquet_files(Path(path)))


def _parquet_file(path: Path) -> pq.ParquetFile:
    """``path`` opened for reading row group by row group (``pre_buffer`` would read every
    row group of the file ahead: memory growing with the file, and slower here)."""
    try:
        return pq.ParquetFile(path, pre_buffer=False)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"could not read {path} as Parquet: {one_line(err)}") from None


def one_line(err: BaseException) -> str:
    """The first line of an Arrow error (its messages carry C++ context on later lines)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def numeric_columns(schema: pa.Schema) -> list[str]:
    """The names of ``schema``'s numeric columns (integer, float, decimal), in order."""
    return [f.name for f in schema if _is_numeric(f.type)]


def check_columns(schema: pa.Schema, names: list[str], what: str) -> None:
    """Raise ``DataError`` naming the missing ones and the available ones unless every name in
    ``names`` is a column of ``schema``; ``what`` says which list they came from."""
    missing = [n for n in names if n not in schema.names]
    if missing:
        raise DataError(f"{what} names columns that are not in the input: "
                        f"{', '.join(missing)}; available: {', '.join(schema.names)}")


def iter_batches(path: str | os.PathLike[str], chunk_rows: int = DEFAULT_CHUNK_ROWS, *,
                 in_format: str | None = None,
                 columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Arrow record batches of ``<= chunk_rows`` rows of a table, in file order.

    Parquet is read natively (a directory: its part files in name order), only ``columns``
    (None: all), one row group's columns at a time at most, so memory is bounded by the
    writer's row group size whatever the file's. CSV,
    NPY and NPZ are read by :func:`iter_table` (same checks and messages) into float64
    columns named by the CSV header, else ``x1 .. xD``.
    """
    path = Path(path)
    fmt = table_format(path, in_format)
    if fmt == "parquet":
        for file in _parquet_files(path):
            source = _parquet_file(file)
            if columns is not None:
                check_columns(source.schema_arrow, columns, "the column list")
            try:
                yield from source.iter_batches(batch_size=chunk_rows, columns=columns)
            except (pa.ArrowException, OSError) as err:
                raise DataError(f"could not read {file} as Parquet: {one_line(err)}") from None
        return
    header: list[str] = []
    for block in iter_table(path, chunk_rows, columns=header, in_format=fmt):
        names = header or [f"x{i + 1}" for i in range(block.shape[1])]
        batch = pa.RecordBatch.from_arrays(list(block.T), names=names)
        if columns is not None:
            check_columns(batch.schema, columns, "the column list")
            batch = batch.select(columns)
        yield batch


def table_schema(path: str | os.PathLike[str], in_format: str | None = None) -> pa.Schema:
    """The Arrow schema :func:`iter_batches` gives the table at ``path`` (a CSV, NPY or NPZ
    is checked up to its first data row here)."""
    fmt = table_format(path, in_format)
    if fmt == "parquet":
        return _parquet_file(_parquet_files(Path(path))[0]).schema_arrow
    with closing(iter_batches(path, 1, in_format=fmt)) as batches:
        return next(batches).schema


@dataclass
class Features:
    """A batch's feature columns as numbers: ``x: (rows, columns)`` float64 (NaN where a value
    is missing or not a number), ``bad: (rows,)`` rows that cannot be scored, and
    ``column: (rows,)`` each bad row's first bad column (an index into the names; -1 if
    fine)."""

    x: np.ndarray
    bad: np.ndarray
    column: np.ndarray


def _as_float(values: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    t = values.type
    if pa.types.is_float64(t) and values.null_count == 0:
        return values.to_numpy(zero_copy_only=False)  # no copy for a plain column
    if _is_numeric(t):
        return pc.cast(values, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            return pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:  # some cell is not a number: parse cell by cell
            return np.array([_number(v) for v in values.to_pylist()], dtype=np.float64)
    raise DataError(f"column '{name}' has type {t}; a feature column must hold numbers (or "
                    "text of numbers)")


def _number(cell: str | None) -> float:
    try:
        return float(cell) if cell is not None else math.nan
    except ValueError:
        return math.nan


def features(batch: pa.RecordBatch, names: list[str]) -> Features:
    """The columns ``names`` of ``batch`` as numbers, with the rows that cannot be scored."""
    x = np.empty((batch.num_rows, len(names)), dtype=np.float64)
    for j, name in enumerate(names):
        x[:, j] = _as_float(batch.column(name), name)
    # A row with a NaN or an Inf has a sum that is not finite (one matrix-vector product, a
    # sixth of the cost of testing every cell); only such rows, and finite rows whose sum
    # overflows, are tested cell by cell.
    with np.errstate(over="ignore", invalid="ignore"):
        suspect = np.flatnonzero(~np.isfinite(x @ np.ones(x.shape[1])))
    bad = np.zeros(len(x), dtype=bool)
    column = np.full(len(x), -1)
    if len(suspect):
        finite = np.isfinite(x[suspect])
        rows = ~finite.all(axis=1)
        bad[suspect[rows]] = True
        column[suspect[rows]] = np.argmin(finite[rows], axis=1)
    return Features(x, bad, column)


def bad_value(batch: pa.RecordBatch, name: str, row: int) -> str:
    """Why the value of column ``name`` in ``row`` of ``batch`` cannot be scored, in words."""
    value = batch.column(name)[row].as_py()
    if value is None:
        return f"column '{name}' is missing"
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return f"column '{name}' holds {value!r}, which is not a number"
    return f"column '{name}' is {float(value)}; NaN/Inf values cannot be scored"


def _parquet_blocks(r: _Reader, columns: list[str], chunk_rows: int) -> Iterator[np.ndarray]:
    """Every numeric column of a Parquet table, finite values only (as the other formats)."""
    names = numeric_columns(table_schema(r.path, "parquet"))
    if not names:
        raise DataError(f"{r.path} has no numeric columns; store the features as numbers")
    columns.extend(names)
    r.check_width(len(names))
    for batch in iter_batches(r.path, chunk_rows, in_format="parquet", columns=names):
        feats = features(batch, names)
        if feats.bad.any():
            i = int(np.argmax(feats.bad))
            name = names[feats.column[i]]
            raise DataError(f"{r.path}: row {r.rows + i + 1}: {bad_value(batch, name, i)} "
                            "(remove or impute it)")
        r.rows += batch.num_rows
        yield feats.x
    if not r.rows:
        raise r.none_read("no rows")


def read_table(path: str | os.PathLike[str], *, dim: int | None = None) -> Table:
    """The whole table of a file (``x``, an ``.npz``'s ``y``, a CSV's header)."""
    columns: list[str] = []
    blocks = list(iter_table(path, dim=dim, columns=columns))
    x = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    y = _labels(Path(path), len(x)) if Path(path).suffix.lower() == ".npz" else None
    return Table(x, y, columns)


def _labels(path: Path, rows: int) -> np.ndarray | None:
    with np.load(path, allow_pickle=False) as archive:
        if "y" not in archive.files:
            return None
        y = archive["y"]
    if y.ndim != 1 or len(y) != rows:
        raise DataError(f"{path}: 'y' has shape {y.shape}; expected ({rows},), one per row")
    return y
