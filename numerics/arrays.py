"""One code path for numpy arrays and torch tensors: the array module of a value, and
conversions between the two.

``array_namespace`` looks torch up in ``sys.modules`` instead of importing it, so code that
only ever sees numpy arrays (the service) never loads torch.
"""

from __future__ import annotations

import contextlib
import sys
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["Array", "array_namespace", "asarray_like", "no_grad", "to_numpy"]

Array = Any
"""A ``numpy.ndarray`` or a ``torch.Tensor``."""


def array_namespace(x: Array) -> ModuleType:
    """The array module of ``x``: ``torch`` for a ``torch.Tensor``, else ``numpy``.

    Torch is looked up in ``sys.modules`` rather than imported: if nobody imported torch,
    ``x`` cannot be a tensor, so the service never pays for (or needs) torch.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return torch
    return np


def asarray_like(a: Any, like: Array) -> Array:
    """``a`` (array-like) as an array of the same kind, dtype and device as ``like``."""
    xp = array_namespace(like)
    if xp is np:
        return np.asarray(to_numpy(a), dtype=like.dtype)
    return xp.as_tensor(a, dtype=like.dtype, device=like.device)


def to_numpy(a: Any) -> np.ndarray:
    """``a`` as a numpy array (tensors are detached and copied to the CPU)."""
    if array_namespace(a) is np:
        return np.asarray(a)
    return a.detach().cpu().numpy()


def no_grad(x: Array) -> contextlib.AbstractContextManager:
    """``torch.no_grad()`` when ``x`` is a tensor, a no-op context for numpy."""
    xp = array_namespace(x)
    return contextlib.nullcontext() if xp is np else xp.no_grad()
