"""Tables of rows from ``.csv``, ``.npy`` and ``.npz`` files: the one reader of training data
and of bulk scoring's input.

Every file is read as a stream of ``(rows, columns)`` float64 blocks (:func:`iter_table`), so
memory is bounded by one block whatever the file's size: CSV line by line, ``.npy``
memory-mapped, and an ``.npz``'s member ``X`` read sequentially from the archive.
:func:`read_table` collects the blocks (and an ``.npz``'s labels ``y``). The same checks, with
the same messages, hold for every caller: real numbers only, finite values, one width for
every row (and the model's, when one is named), at least one row. A CSV's delimiter (comma,
semicolon or tab) is sniffed, and a first row that is not all numbers is its header.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "t.csv"
    >>> _ = path.write_text("a;b\\n1;2\\n3;4\\n")
    >>> read_table(path).x.tolist(), read_table(path).columns
    ([[1.0, 2.0], [3.0, 4.0]], ['a', 'b'])
"""

from __future__ import annotations

import csv
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from numpy.lib import format as npformat

__all__ = ["SUFFIXES", "DataError", "Table", "csv_delimiter", "iter_table", "read_table"]

SUFFIXES = (".npy", ".npz", ".csv")
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
               dim: int | None = None,
               columns: list[str] | None = None) -> Iterator[np.ndarray]:
    """``(rows <= chunk_rows, columns)`` float64 blocks of a table file, in file order.

    Args:
        path: a ``.csv``, ``.npy`` or ``.npz`` (member ``X``) file.
        chunk_rows: rows per block (memory is bounded by one block).
        dim: the width a model expects (None: any width).
        columns: a list that receives a CSV's header cells.
    """
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"cannot read '{path}': a table file must end in .csv, .npy or .npz")
    if not path.is_file():
        raise DataError(f"data file '{path}' not found; check the path (cwd: {os.getcwd()})")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1; got {chunk_rows}")
    r = _Reader(path, dim)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        yield from _csv_blocks(r, columns if columns is not None else [], chunk_rows)
        return
    blocks = _npy_blocks(r, chunk_rows) if suffix == ".npy" else _npz_blocks(r, chunk_rows)
    try:
        yield from blocks
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DataError(f"could not read {path} as {suffix}: {err}") from None


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
