"""A table of events to score with the committed breast-cancer model: keys, 30 features (one
stored as text), planted bad rows; shared by the single-process and Spark scoring tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
from sklearn.datasets import load_breast_cancer

MODEL = Path(__file__).resolve().parents[1] / "exported_models" / "breast-cancer-maf"
FEATURES = [f"f{i}" for i in range(30)]
TEXT = "f5"  # a feature column stored as text, so that a cell can be "n/a"
# id -> (column, planted value): missing, not a number, NaN, Inf
BAD = {17: ("f3", None), 407: (TEXT, "n/a"), 1005: ("f11", float("nan")),
       1509: ("f20", float("inf")), 2003: (TEXT, None)}


def events(copies: int = 4, seed: int = 0) -> pa.Table:
    """``copies`` jittered copies of scikit-learn's breast-cancer rows (569 each; malignant
    rows are the model's anomalies), keys ``id`` (``0, 1, ...``) and ``site``, the rows of
    :data:`BAD` planted."""
    rng = np.random.default_rng(seed)
    x = load_breast_cancer().data
    x = np.concatenate([x * (1 + 0.01 * rng.normal(size=x.shape)) for _ in range(copies)])
    n = len(x)
    cols: dict[str, pa.Array] = {"id": pa.array(np.arange(n)),
                                 "site": pa.array([f"s{i % 3}" for i in range(n)])}
    for j, name in enumerate(FEATURES):
        values: list = [repr(float(v)) for v in x[:, j]] if name == TEXT else list(x[:, j])
        for row, (column, planted) in BAD.items():
            if column == name:
                values[row] = planted
        cols[name] = pa.array(values, type=pa.string() if name == TEXT else pa.float64())
    return pa.table(cols)
