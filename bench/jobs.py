"""Run benchmark units one after another or side by side in worker processes."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

__all__ = ["run_jobs"]


def run_jobs(
    fn: Callable[..., Any],
    jobs: Iterable[Sequence[Any]],
    workers: int,
    report: Callable[[Any], None],
) -> None:
    """Call ``fn(*args)`` for every ``args`` in ``jobs`` and hand each result to ``report``.

    ``workers <= 1``: in this process, in order. Otherwise ``workers`` processes (``fn`` and its
    arguments must pickle), results reported as they complete; ``report`` always runs here.
    """
    if workers <= 1:
        for args in jobs:
            report(fn(*args))
        return
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(fn, *args) for args in jobs]
        for fut in as_completed(futures):
            report(fut.result())
