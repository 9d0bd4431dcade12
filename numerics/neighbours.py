"""Nearest-neighbour distances to a fixed bank of points (the ``latent`` anomaly score).

Plain numpy, in blocks of rows so memory stays bounded; a row's answer depends only on the
row and the bank, never on its batch.
"""

from __future__ import annotations

import numpy as np

__all__ = ["knn_mean_distance"]

BLOCK = 1024


def knn_mean_distance(z: np.ndarray, bank: np.ndarray, k: int) -> np.ndarray:
    """``(rows,)``: mean Euclidean distance from each row of ``z: (rows, dim)`` to its ``k``
    nearest rows of ``bank: (n, dim)`` (``k < n``)."""
    bank = np.asarray(bank, dtype=np.float64)
    sq_bank = (bank * bank).sum(1)
    out = np.empty(len(z))
    for a in range(0, len(z), BLOCK):
        block = np.asarray(z[a:a + BLOCK], dtype=np.float64)
        d2 = (block * block).sum(1)[:, None] - 2.0 * block @ bank.T + sq_bank[None, :]
        near = np.partition(np.maximum(d2, 0.0), k - 1, axis=1)[:, :k]
        out[a:a + BLOCK] = np.sqrt(near).mean(1)
    return out
