"""Normalizing flows: one graph pass each way (``sample``: noise -> model space, ``log_prob``:
the exact log-density in model space)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.runtime.base import ModelRuntime, SeededRows, register_runtime

__all__ = ["FlowRuntime"]


@register_runtime("flow")
class FlowRuntime(ModelRuntime):
    def _generate(self, z: np.ndarray, requests: Sequence[SeededRows], solver: str,
                  steps: int | None) -> np.ndarray:
        (u,) = self.call("sample", z)
        return u

    def _log_prob(self, u: np.ndarray, method: str, steps: int | None, solver: str | None,
                  probes: int | None, seeds: np.ndarray, rows: np.ndarray,
                  ) -> tuple[np.ndarray, None, int]:
        (lp,) = self.call("log_prob", u)
        return lp.astype(np.float64), None, 1
