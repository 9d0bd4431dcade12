"""Progress bars: one constructor, so ``TQDM_DISABLE`` works everywhere.

tqdm reads its ``TQDM_*`` environment variables only for arguments the caller did not pass,
and every bar here passes ``disable`` (from ``--no-progress`` / ``progress=False``); so
``progress_bar`` applies ``TQDM_DISABLE=1`` itself. Bars go to stderr (tqdm's default).
"""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar"]


def progress_bar(*, disable: bool = False, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(**kwargs)``, off when ``disable`` or ``TQDM_DISABLE`` is set truthy."""
    env = os.environ.get("TQDM_DISABLE", "").strip().lower()
    return tqdm(disable=disable or env in ("1", "true", "yes", "on"), dynamic_ncols=True, **kwargs)
