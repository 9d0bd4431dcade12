"""What a conditional model is trained on: each row's label or context, beside its features.

:func:`condition_data` takes a loaded data set and ``--condition label|context`` (with
``--label-col`` / ``--context-cols`` for a table's columns) and returns the features without
those columns, each row's condition (a class index, or a raw context row) and the
:class:`artifact.conditions.ConditionSpec` fitted on the training rows (classes and their
priors, or the context's mean and std). The graphs' ``context`` input is built from them by
``artifact.conditions.context_rows``, the function the service calls too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from artifact.conditions import CONDITION_KINDS, ConditionSpec, class_names
from artifact.tables import DataError
from training.data import Dataset

__all__ = ["ConditionData", "condition_data"]


@dataclass(frozen=True)
class ConditionData:
    """A conditional data set.

    Attributes:
        x: ``(rows, dim)`` features (the condition's columns removed).
        columns: their names (empty when the data had none).
        values: ``(rows,)`` class indices (labels), or ``(rows, width)`` raw context rows.
        spec: the condition, fitted on the training rows.
    """

    x: np.ndarray
    columns: tuple[str, ...]
    values: np.ndarray
    spec: ConditionSpec


def _columns(data: Dataset, names: list[str], what: str) -> list[int]:
    if not data.columns:
        raise DataError(f"{what} names columns, but {data.source!r} has no column names; use "
                        "a CSV with a header or a Parquet file")
    missing = [n for n in names if n not in data.columns]
    if missing:
        raise DataError(f"{what}: no column {missing[0]!r} in {data.source!r}; its columns: "
                        f"{', '.join(data.columns)}")
    return [data.columns.index(n) for n in names]


def condition_data(data: Dataset, kind: str, train_rows: np.ndarray, *,
                   label_col: str | None = None,
                   context_cols: list[str] | None = None) -> ConditionData:
    """Split ``data`` into features and condition; fit the spec on ``train_rows``.

    Labels come from ``label_col`` (a table's column) or the set's own (a named set's, an
    ``.npz``'s ``y``); a context from ``context_cols``.
    """
    if kind not in CONDITION_KINDS:
        raise DataError(f"unknown condition {kind!r}; choose one of {', '.join(CONDITION_KINDS)}")
    if kind == "label" and context_cols:
        raise DataError("--context-cols goes with --condition context, not label")
    if kind == "context" and label_col:
        raise DataError("--label-col goes with --condition label, not context")
    x, columns = data.x, list(data.columns)
    taken = _columns(data, [label_col] if label_col else list(context_cols or []),
                     "--label-col" if label_col else "--context-cols") \
        if label_col or context_cols else []
    keep = [i for i in range(x.shape[1]) if i not in taken]
    if taken and not keep:
        raise DataError("no feature columns are left besides the condition's")
    features = x[:, keep]
    names = tuple(columns[i] for i in keep) if columns else ()
    if kind == "label":
        raw = x[:, taken[0]] if label_col else data.y
        if raw is None:
            raise DataError(f"{data.source!r} has no labels: give --label-col (a CSV or "
                            "Parquet column), or an .npz with 'y'")
        try:
            classes, index = class_names(raw)
        except ValueError as err:
            raise DataError(f"{data.source!r}: {err}") from None
        if len(classes) < 2:
            raise DataError(f"{data.source!r} has one class ({classes[0]}); a label model "
                            "needs at least 2")
        counts = np.bincount(index[train_rows], minlength=len(classes))
        spec = ConditionSpec(kind="label", width=len(classes), classes=classes,
                             priors=[float(c) for c in counts / counts.sum()],
                             null_token=len(classes), columns=[label_col] if label_col else [])
        return ConditionData(features, names, index, spec)
    if not context_cols:
        raise DataError("--condition context needs --context-cols (the context's columns)")
    values = x[:, taken]
    train = values[train_rows]
    std = train.std(0)
    spec = ConditionSpec(kind="context", width=len(taken), columns=list(context_cols),
                         context_mean=[float(v) for v in train.mean(0)],
                         context_std=[float(v) if v > 0 else 1.0 for v in std])
    return ConditionData(features, names, values, spec)
