"""Bulk scoring: a whole file's anomaly scores through the served runtime, one CSV row per
input row (``genserve score``).

The numbers are those ``POST /anomaly_score`` returns for the same rows. The file is read in
bounded chunks (``artifact.tables``) and scored in graph calls of a fixed number of rows
aligned to the start of the file, so the output depends neither on the chunk size nor on
memory.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from artifact.tables import DataError, iter_table
from service.progress import progress_bar
from service.runtime import InputError, ModelRuntime, open_runtime

__all__ = ["HEADER", "read_scores", "reblock", "score_file"]

HEADER = ("score", "percentile", "is_anomaly")


def _fmt(v: float) -> str:
    return repr(float(v))


def reblock(chunks: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Regroup a stream of row blocks into blocks of exactly ``size`` rows (the last may be
    shorter), aligned to the start of the stream."""
    parts: list[np.ndarray] = []
    held = 0
    for chunk in chunks:
        while len(chunk):
            take = chunk[: size - held]
            chunk = chunk[len(take):]
            parts.append(take)
            held += len(take)
            if held == size:
                yield parts[0] if len(parts) == 1 else np.concatenate(parts)
                parts, held = [], 0
    if held:
        yield parts[0] if len(parts) == 1 else np.concatenate(parts)


def score_file(
    model_dir: str | os.PathLike[str],
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    chunk_rows: int = 65_536,
    batch_rows: int = 4096,
    per_dim: bool = False,
    target_fpr: float | None = None,
    runtime: ModelRuntime | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score every row of ``in_path`` with the artifact in ``model_dir``; write a CSV.

    The output has the header ``score,percentile,is_anomaly`` and one line per input row, in
    input order; it is written to a temporary file beside ``out_path`` and moved into place
    only when every row is scored (a failure leaves no partial output and an existing
    ``out_path`` untouched). The numbers are those of ``ModelRuntime.anomaly_score`` (what
    ``POST /anomaly_score`` returns for the same rows), printed with ``repr`` so that they
    parse back to the same floats.

    Memory is bounded by ``max(chunk_rows, batch_rows)`` rows. The file is read in chunks of
    ``chunk_rows`` and scored in graph calls of ``batch_rows`` rows aligned to the start of
    the file, so the output does not depend on ``chunk_rows`` at all, bit for bit. (Float32
    graphs round a row's result slightly differently in batches of other sizes, ~1e-7
    relative: the service, which batches requests together, agrees to that rounding.)

    Args:
        chunk_rows: rows read from the file at a time.
        batch_rows: rows per graph call.
        per_dim: report ``score`` as NLL per column (nats/dim); flags and percentiles are
            unchanged.
        target_fpr: flag at this false-positive rate instead of the calibrated one.
        runtime: an open ``service.runtime.ModelRuntime`` to reuse (else opened here).
        progress: a progress bar (rows scored).
    Returns:
        ``{"rows", "flagged", "threshold", "seconds", "out", "per_dim"}``.
    """
    if chunk_rows < 1 or batch_rows < 1:
        raise ValueError(f"chunk_rows and batch_rows must be >= 1; got {chunk_rows}, "
                         f"{batch_rows}")
    rt = runtime if runtime is not None else open_runtime(model_dir)
    if rt.manifest.calibration is None:
        raise DataError(f"model '{rt.name}' has no anomaly calibration; export it with "
                        "fit-anomaly or `genserve export` (which calibrates)")
    threshold = (rt.manifest.calibration.threshold if target_fpr is None
                 else rt.threshold_at(target_fpr))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dim = rt.dim
    scale = 1.0 / dim if per_dim else 1.0
    rows = flagged = 0
    start = time.perf_counter()
    bar = progress_bar(desc="score", unit="rows", disable=not progress)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            fh.write(",".join(HEADER) + "\n")
            blocks = iter_table(in_path, chunk_rows, dim=dim)
            for block in reblock(blocks, batch_rows):
                try:
                    res = rt.anomaly_score(block, target_fpr=target_fpr)
                except InputError as err:
                    raise DataError(f"{in_path}: {err}") from None
                buf = io.StringIO()
                for s, p, a in zip(res.scores * scale, res.percentile, res.is_anomaly,
                                   strict=True):
                    buf.write(f"{_fmt(s)},{_fmt(p)},{'true' if a else 'false'}\n")
                fh.write(buf.getvalue())
                rows += len(block)
                flagged += int(res.is_anomaly.sum())
                bar.update(len(block))
        if rows == 0:
            raise DataError(f"{in_path} has no data rows; it needs at least one row")
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    return {"rows": rows, "flagged": flagged, "threshold": threshold * scale,
            "seconds": round(time.perf_counter() - start, 3), "out": str(out_path),
            "per_dim": per_dim}


def read_scores(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a ``score_file`` output back: ``{"score", "percentile", "is_anomaly"}`` arrays."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        if tuple(header) != HEADER:
            raise DataError(f"{path}: header {header} is not {list(HEADER)}")
        cols = list(zip(*reader, strict=True)) or [(), (), ()]
    return {"score": np.array(cols[0], dtype=np.float64),
            "percentile": np.array(cols[1], dtype=np.float64),
            "is_anomaly": np.array([v == "true" for v in cols[2]], dtype=bool)}

