"""Write one benchmark's section of ``docs/BENCHMARKS.md``, leaving the other sections alone."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shlex
import sys
import tempfile
from collections.abc import Callable
from datetime import date
from pathlib import Path

__all__ = ["BENCHMARKS", "command_line", "machine_line", "markdown_table", "publish",
           "rerender", "write_results", "write_section"]

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
HEADER = """# genserve benchmarks

Every figure comes with the command that reproduced it. The machines are small (2 cores) and
shared: timings are medians of repeated runs, and comparisons are ratios measured side by side
in one run. Quality figures (log-likelihoods, W2) do not depend on load.
"""


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that reproduces a bench run: ``python -m MODULE`` and its arguments
    (``argv``, or this process's when ``None``), shell-quoted."""
    args = sys.argv[1:] if argv is None else argv
    return f"python -m {module} {shlex.join(args)}".strip()


def machine_line() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()},"
            f" measured {date.today().isoformat()}")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, markdown: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the block between ``<!-- BEGIN name -->`` and ``<!-- END name -->``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    path.parent.mkdir(parents=True, exist_ok=True)
    # Benchmarks write their sections from separate processes: hold an exclusive lock on the
    # folder from reading the file to replacing it, so no writer drops another's section.
    lock = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = path.read_text() if path.exists() else HEADER
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        text = pattern.sub(lambda _: block, text) if pattern.search(text) else (
            text.rstrip() + "\n\n" + block + "\n")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".BENCHMARKS.")
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        os.close(lock)


def publish(section: str, render: Callable[[dict], str], json_path: Path,
            payload: dict) -> str:
    """Write ``payload`` and its rendered ``section`` (:func:`write_results`); the markdown."""
    text = render(payload)
    write_results(section, text, json_path, payload)
    return text


def rerender(section: str, render: Callable[[dict], str], json_path: Path) -> None:
    """Rewrite ``section`` from the results already in ``json_path`` (a bench's ``--render``)."""
    publish(section, render, json_path, json.loads(json_path.read_text()))


def write_results(section: str, markdown: str, json_path: Path, payload: object) -> None:
    """Write ``payload`` to ``json_path`` atomically, then the ``section`` of BENCHMARKS.md."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    os.replace(tmp, json_path)
    write_section(section, markdown)
