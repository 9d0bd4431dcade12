"""Conditional models: what a model is conditioned on, and the graphs' ``context`` input.

A conditional model is trained on rows with a class label (``kind="label"``) or a float
context vector of known width (``kind="context"``). Every exported graph then takes one more
input, ``context: (batch, width)``, which this module builds from what a client sends, the
same way at training, export and serve time (one function, :func:`context_rows`):

* a label ``y`` (a class index ``0 .. K-1``) becomes its one-hot row of width ``K``; the first
  linear layer of every conditioner, which sees that row, is the label's embedding. The
  null token ``K`` (classifier-free guidance's "no label") is the all-zero row.
* a context vector is standardized by the training context's mean and std.

The manifest's ``condition`` section (:class:`ConditionSpec`) records the kind, the class
names (or the context columns), the width, the null token and the class priors of the
training data, and, for labelled models, one anomaly calibration per class.

Example:
    >>> spec = ConditionSpec(kind="label", width=2, classes=["a", "b"], priors=[0.5, 0.5],
    ...                      null_token=2)
    >>> context_rows(spec, labels=np.array([1, 2])).tolist()
    [[0.0, 1.0], [0.0, 0.0]]
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from artifact.calibration import Calibration

__all__ = ["CONDITION_KINDS", "ConditionSpec", "class_names", "condition_rows", "context_rows",
           "label_index", "label_indices"]

CONDITION_KINDS = ("label", "context")
"""What a model can be conditioned on (``genserve train --condition``)."""


class ConditionSpec(BaseModel):
    """The manifest's ``condition`` section (and a checkpoint's).

    Attributes:
        kind: ``"label"`` (a class, one-hot) or ``"context"`` (a float vector).
        width: columns of the graphs' ``context`` input (the classes, or the context width).
        classes: label models: the class names, in index order.
        priors: label models: each class's share of the training rows (``log p(y)`` of the
            marginal likelihood).
        null_token: label models: the index of "no label" (``K``: the all-zero row), what a
            model trained with label dropout has learnt its unconditional field on.
        cfg_dropout: the probability a label was dropped to the null token in training (0: no
            classifier-free guidance).
        columns: the condition's column names in the training table, when it had them (a
            label model's one label column; a context model's context columns), which bulk
            scoring reads the condition from.
        context_mean: context models: the training context's per-column mean.
        context_std: context models: its per-column std (standardization of a context row).
        calibrations: label models: one anomaly calibration per class, on that class's
            validation rows (empty: the model-wide calibration serves every class).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["label", "context"]
    width: int = Field(ge=1)
    classes: list[str] = Field(default_factory=list)
    priors: list[float] = Field(default_factory=list)
    null_token: int | None = None
    cfg_dropout: float = Field(0.0, ge=0, lt=1)
    columns: list[str] = Field(default_factory=list)
    context_mean: list[float] = Field(default_factory=list)
    context_std: list[float] = Field(default_factory=list)
    calibrations: list[Calibration] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> ConditionSpec:
        if self.kind == "label":
            k = len(self.classes)
            if k < 2 or self.width != k or len(self.priors) != k:
                raise ValueError(f"a label condition needs >= 2 classes, width = classes and "
                                 f"one prior per class; got {k} classes, width {self.width}, "
                                 f"{len(self.priors)} priors")
            if self.null_token != k:
                raise ValueError(f"a label condition's null token is {k} (the classes' count)")
            if self.calibrations and len(self.calibrations) != k:
                raise ValueError(f"{len(self.calibrations)} class calibrations for {k} classes")
            if len(self.columns) > 1:
                raise ValueError(f"a label condition reads one column; got {self.columns}")
        else:
            if len(self.context_mean) != self.width or len(self.context_std) != self.width:
                raise ValueError(f"a context condition needs a mean and a std per column "
                                 f"(width {self.width})")
            if self.columns and len(self.columns) != self.width:
                raise ValueError(f"{len(self.columns)} context columns for width {self.width}")
            if self.cfg_dropout or self.calibrations or self.classes:
                raise ValueError("a context condition has no classes, label dropout or class "
                                 "calibrations")
        return self

    @property
    def guided(self) -> bool:
        """Whether it was trained with label dropout (``guidance`` applies)."""
        return self.cfg_dropout > 0


def class_names(values: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The sorted distinct labels of ``values: (rows,)`` as names, and each row's index."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.round(values)).any():
            raise ValueError("labels must be whole numbers or names; found fractions or NaN")
        values = values.astype(np.int64)
    distinct, index = np.unique(values, return_inverse=True)
    return [str(v) for v in distinct], index.astype(np.int64)


def label_index(classes: list[str], label: object) -> int | None:
    """The index in ``classes`` of ``label`` (a name, or an integer written as the name), or
    None."""
    if isinstance(label, bool) or not isinstance(label, int | str):
        return None
    try:
        return classes.index(str(label))
    except ValueError:
        return None


def label_indices(classes: list[str], values: np.ndarray) -> np.ndarray:
    """Each of ``values: (rows,)`` (numbers read from a table) as its class index, ``-1``
    where it names no class."""
    lookup = {name: k for k, name in enumerate(classes)}
    out = np.full(len(values), -1, dtype=np.int64)
    for i, v in enumerate(np.asarray(values, dtype=np.float64)):
        if np.isfinite(v) and v == np.round(v):
            out[i] = lookup.get(str(int(v)), -1)
    return out


def context_rows(spec: ConditionSpec, *, labels: np.ndarray | None = None,
                 context: np.ndarray | None = None) -> np.ndarray:
    """The graphs' ``context`` input ``(rows, width)`` float32.

    ``labels: (rows,)`` class indices (``spec.null_token``: the all-zero row), for a label
    model; ``context: (rows, width)`` raw context values, for a context model.
    """
    if spec.kind == "label":
        labels = np.asarray(labels, dtype=np.int64)
        eye = np.vstack([np.eye(spec.width, dtype=np.float32),
                         np.zeros((1, spec.width), dtype=np.float32)])
        return eye[labels]
    context = np.asarray(context, dtype=np.float64)
    mean, std = np.asarray(spec.context_mean), np.asarray(spec.context_std)
    return ((context - mean) / std).astype(np.float32)


def condition_rows(spec: ConditionSpec, values: np.ndarray) -> np.ndarray:
    """:func:`context_rows` of each row's condition as training keeps it: class indices
    ``(rows,)`` for a label model, raw context rows ``(rows, width)`` for a context model."""
    return context_rows(spec, **{"labels" if spec.kind == "label" else "context": values})
