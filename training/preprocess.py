"""Invertible preprocessing whose log-determinant is counted.

A model sees ``u`` and reports ``log p_u(u)``; the user's data are ``x``. With
``(u, ladj) = preprocessor(x)``, where ``ladj = log|det du/dx|``, the density in the user's
units is

    log p_x(x) = log p_u(u) + ladj.

Every step is a small ``nn.Module`` with ``forward(x) -> (u, ladj)`` and ``inverse(u) -> x``;
its parameters are buffers, so a ``state_dict`` restores it into a module built by
``Preprocessor.from_config``. Forward and inverse hold no Python branch on data values, so
they export to ONNX (eval mode).

Example:
    >>> cfg = PreprocessConfig(standardize=True)
    >>> pre = Preprocessor.fit(cfg, x_train, levels=None).eval()
    >>> u, ladj = pre(torch.as_tensor(x_test))
    >>> log_px = model.log_prob(u) + ladj
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import PreprocessConfig
from training.data import DataError, check_levels
from training.flows.base import Compose, Transform

__all__ = ["STD_FLOOR", "Dequantize", "Logit", "Preprocessor", "Standardize", "Step"]

STD_FLOOR = 1e-8
"""Standardize divides by ``max(std, STD_FLOOR)``: a constant column stays invertible, but its
log-likelihood is dominated by ``-log(STD_FLOOR)`` per such column; drop constant columns."""


def _buffer(value: Any, dtype: torch.dtype | None) -> Tensor:
    return torch.as_tensor(value, dtype=dtype or torch.get_default_dtype()).clone()


def _per_row(x: Tensor, value: Tensor) -> Tensor:
    """A scalar log-det broadcast to ``(batch,)`` without branching on data."""
    return x.new_zeros(x.shape[0]) + value


class Step(Transform):
    """A preprocessing step: an elementwise bijection that also describes itself for the
    manifest. Its parameters are buffers of ``dtype`` (a keyword of every step; default
    ``torch.get_default_dtype()``)."""

    def describe(self) -> dict[str, Any]:
        """JSON-able ``{"type": ..., parameters...}`` (for the export manifest)."""
        raise NotImplementedError


class Standardize(Step):
    """``u = (x - mean) / std``; ``ladj = -sum(log std)``.

    Args:
        mean: ``(dim,)``.
        std: ``(dim,)``, positive.

    Example:
        >>> t = Standardize(torch.zeros(2), torch.full((2,), 2.0))
        >>> u, ladj = t(torch.ones(5, 2))  # u = 0.5, ladj = -2 log 2
    """

    def __init__(
        self,
        mean: Tensor | np.ndarray,
        std: Tensor | np.ndarray,
        *,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", _buffer(mean, dtype))
        self.register_buffer("std", _buffer(std, dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x - self.mean) / self.std, _per_row(x, -torch.log(self.std).sum())

    def inverse(self, u: Tensor) -> Tensor:
        return u * self.std + self.mean

    def describe(self) -> dict[str, Any]:
        return {"type": "standardize", "mean": self.mean.tolist(), "std": self.std.tolist()}

    def frozen(self) -> Step:
        """The same map as one inference-mode batch norm per direction, for export.

        ONNX Runtime's CPU kernels run ``x - mean`` with a ``(dim,)`` operand as a loop over
        rows (7x eager torch's time at 4096 rows of 2 columns); its BatchNormalization kernel
        is one vectorised pass (docs/BENCHMARKS.md, graph runtimes).
        """
        return _BatchNormStandardize(self.mean, self.std, dtype=self.mean.dtype)


class _BatchNormStandardize(Standardize):
    """:class:`Standardize` as ``batch_norm`` (eval): forward ``(x - mean) * (1 / std)``,
    inverse ``u * std + mean``, both with unit variance and ``eps = 0``, so no square root."""

    def _stats(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``t``, mean, std and ones in the dtype ``(t - mean) / std`` would compute in."""
        dtype = torch.promote_types(t.dtype, self.mean.dtype)
        mean, std = self.mean.to(dtype), self.std.to(dtype)
        return t.to(dtype), mean, std, torch.ones_like(mean)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, mean, std, one = self._stats(x)
        u = F.batch_norm(x, mean, one, weight=1 / std, bias=torch.zeros_like(mean), eps=0.0)
        return u, _per_row(x, -torch.log(self.std).sum())

    def inverse(self, u: Tensor) -> Tensor:
        u, mean, std, one = self._stats(u)
        return F.batch_norm(u, torch.zeros_like(mean), one, weight=std, bias=mean, eps=0.0)


class Dequantize(Step):
    """Uniform dequantization of integers ``x in 0..levels-1``: ``u = (x + noise) / levels``.

    ``noise ~ U(0, 1)`` is drawn from ``generator`` in training mode (or whenever a generator
    is given; training mode without one falls back to torch's default generator); in eval mode
    without one, ``noise = 0.5`` (the cell midpoint), so evaluation and exported graphs are
    deterministic. ``ladj = -dim * log(levels)``.

    With noise, ``E_noise[log p_v(x + noise)] <= log P(x)``: the log-likelihood of the
    dequantized density is a lower bound on the discrete log-mass (Theis et al. 2016, "A note
    on the evaluation of generative models", Sec. 3.1). ``inverse`` returns the continuous
    value ``u * levels - 0.5``; round it to get integers (the caller decides).

    Args:
        levels: number of integer values, ``>= 2``.
    """

    def __init__(self, levels: int, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.register_buffer("levels", _buffer(float(levels), dtype))

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``x: (batch, dim)``; ``noise: (batch, dim)`` in [0, 1) overrides the generator."""
        if noise is None:
            if self.training or generator is not None:
                noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
            else:
                noise = torch.full_like(x, 0.5)
        return (x + noise) / self.levels, _per_row(x, -x.shape[1] * torch.log(self.levels))

    def inverse(self, u: Tensor) -> Tensor:
        return u * self.levels - 0.5

    def describe(self) -> dict[str, Any]:
        return {"type": "dequantize", "levels": round(self.levels.item())}


class Logit(Step):
    """``u = logit(s)``, ``s = alpha + (1 - 2 alpha) y`` for ``y in [0, 1]``.

    ``du/dy = (1 - 2 alpha) / (s (1 - s))`` per coordinate, so
    ``ladj = sum(log(1 - 2 alpha) - log s - log(1 - s))`` (Dinh et al. 2017, RealNVP, Sec. 4.1).

    Args:
        alpha: in ``(0, 0.5)``; keeps ``s`` away from 0 and 1.
    """

    def __init__(self, alpha: float, *, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.register_buffer("alpha", _buffer(alpha, dtype))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.alpha + (1 - 2 * self.alpha) * x
        log_s, log_1ms = torch.log(s), torch.log1p(-s)
        ladj = (torch.log1p(-2 * self.alpha) - log_s - log_1ms).sum(-1)
        return log_s - log_1ms, ladj

    def inverse(self, u: Tensor) -> Tensor:
        return (torch.sigmoid(u) - self.alpha) / (1 - 2 * self.alpha)

    def describe(self) -> dict[str, Any]:
        return {"type": "logit", "alpha": self.alpha.item()}


class Preprocessor(Compose):
    """The composition dequantize -> logit -> standardize (each step optional).

    Build it with ``fit`` (statistics from the training split) or ``from_config`` (unfitted,
    right shapes, for ``load_state_dict``); both take a ``dtype`` for the buffers. A new module
    is in training mode (noisy dequantization): call ``.eval()`` to evaluate or export.

    Args:
        steps: the deterministic steps (logit, standardize), applied in order.
        dim: number of columns.
        levels: integer data takes values ``0..levels-1``; ``None`` for continuous data.
        dequantize: the first step, whose noise comes from ``forward``'s arguments.
    """

    def __init__(self, steps: list[Step], dim: int, levels: int | None = None,
                 dequantize: Dequantize | None = None) -> None:
        super().__init__(steps)
        self.dim = dim
        self.levels = levels
        self.dequantize = dequantize
        self._register_load_state_dict_pre_hook(_read_step_layout, with_module=True)

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``x: (batch, dim)`` in data units -> ``u: (batch, dim)``, ``ladj: (batch,)``.

        ``generator`` / ``noise`` reach the dequantization step (see ``Dequantize``).
        """
        if self.dequantize is None:
            return super().forward(x)
        y, ladj = self.dequantize(x, generator=generator, noise=noise)
        u, rest = super().forward(y)
        return u, ladj + rest

    def inverse(self, u: Tensor) -> Tensor:
        """``u: (batch, dim) -> x: (batch, dim)``, continuous (integer data are not rounded)."""
        y = super().inverse(u)
        return y if self.dequantize is None else self.dequantize.inverse(y)

    def describe(self) -> list[dict[str, Any]]:
        """JSON-able list of the steps in the order ``forward`` applies them."""
        first = [] if self.dequantize is None else [self.dequantize.describe()]
        return first + [step.describe() for step in self.transforms]

    def frozen(self) -> Preprocessor:
        """An equivalent copy for export (eval mode), every step in its frozen form."""
        steps = [step.frozen() for step in self.transforms]
        return Preprocessor(copy.deepcopy(steps), self.dim, self.levels,
                            copy.deepcopy(self.dequantize)).eval()

    @classmethod
    def from_config(
        cls,
        cfg: PreprocessConfig,
        dim: int,
        levels: int | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> Preprocessor:
        """An unfitted preprocessor (identity statistics) of the right shapes.

        ``dtype`` of the buffers defaults to ``torch.get_default_dtype()``.
        """
        levels = _resolve_levels(cfg, levels)
        steps: list[Step] = []
        if cfg.logit_alpha is not None:
            steps.append(Logit(cfg.logit_alpha, dtype=dtype))
        if cfg.standardize:
            steps.append(Standardize(torch.zeros(dim), torch.ones(dim), dtype=dtype))
        dequantize = Dequantize(levels, dtype=dtype) if cfg.dequantize else None
        return cls(steps, dim, levels, dequantize)

    @classmethod
    def fit(
        cls,
        cfg: PreprocessConfig,
        x_train: np.ndarray,
        levels: int | None = None,
        *,
        dtype: torch.dtype | None = None,
    ) -> Preprocessor:
        """Fit on ``x_train: (rows, dim)`` in data units.

        Standardize takes the mean and (population) std of the training data as they reach it:
        after dequantization at the cell midpoint and after the logit, computed in float64;
        ``std`` is floored at ``STD_FLOOR``. Buffers take ``dtype`` (default dtype if None).
        """
        x = _check_train(x_train)
        pre = cls.from_config(cfg, x.shape[1], levels, dtype=dtype)
        if cfg.dequantize:
            check_levels(x, pre.levels, "x_train")
        elif cfg.logit_alpha is not None and (x.min() < 0 or x.max() > 1):
            raise DataError(
                "logit_alpha needs data in [0, 1]: set dequantize=True with levels for "
                f"integer data, or rescale (found values in [{x.min()}, {x.max()}])"
            )
        if cfg.standardize:
            pre._fit_standardize(x)
        return pre

    def _fit_standardize(self, x: np.ndarray) -> None:
        before = copy.deepcopy(list(self.transforms)[:-1])
        head = Preprocessor(before, self.dim, self.levels, copy.deepcopy(self.dequantize))
        with torch.no_grad():  # eval mode: dequantized at the cell midpoint
            u, _ = head.double().eval()(torch.as_tensor(x, dtype=torch.float64))
        self.transforms[-1].mean.copy_(u.mean(0))
        self.transforms[-1].std.copy_(u.std(0, correction=0).clamp_min(STD_FLOOR))


def _resolve_levels(cfg: PreprocessConfig, levels: int | None) -> int | None:
    if levels is not None and cfg.levels is not None and levels != cfg.levels:
        raise ValueError(f"levels={levels} disagrees with the config's levels={cfg.levels}")
    levels = cfg.levels if levels is None else levels
    if cfg.dequantize and levels is None:
        raise ValueError("dequantize=True needs levels (integer data take values 0..levels-1)")
    return levels


def _check_train(x_train: np.ndarray) -> np.ndarray:
    x = np.asarray(x_train, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"x_train must be (rows, dim) with rows >= 1, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError("x_train holds NaN/Inf; validate it with training.data.load_data")
    return x


def _read_step_layout(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Read the ``steps.N`` layout of format-1 checkpoints (dequantize, logit, standardize
    in one list) into ``dequantize`` and ``transforms.M``."""
    shift = 1 if module.dequantize is not None else 0
    for key in [k for k in state if k.startswith(prefix + "steps.")]:
        index, rest = key[len(prefix) + len("steps."):].split(".", 1)
        i = int(index) - shift
        target = f"{prefix}dequantize.{rest}" if i < 0 else f"{prefix}transforms.{i}.{rest}"
        state[target] = state.pop(key)
