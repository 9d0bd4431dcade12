"""Normalizing flows: one graph pass each way (``sample``: noise -> model space, ``log_prob``:
the exact log-density in model space); the ``latent`` anomaly score encodes a row
(``encode``: ``z = f(u)``) and measures its distance to the stored training latents.

A flow whose manifest serves ``hutchinson`` (a residual flow above 64 dims: its ``log_det``
section) has a ``log_prob(u, probe)`` graph that answers one probe's estimate: each row is
replicated once per probe (probe-major, as the ODE runtime's Hutchinson estimator does),
its Rademacher probes keyed by the row's seed and index (``numerics.likelihood``), and the
answer is their mean with its standard error."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from artifact.manifest import Manifest
from artifact.scores import LATENTS_FILE
from numerics.likelihood import probe_mean, rademacher_probes
from numerics.neighbours import knn_mean_distance
from service.runtime.base import ModelRuntime, SeededRows, register_runtime

__all__ = ["FlowRuntime"]


@register_runtime("flow")
class FlowRuntime(ModelRuntime):
    def __init__(self, directory: str | Path, manifest: Manifest, **options: Any) -> None:
        super().__init__(directory, manifest, **options)
        self.latents = (load_file(str(self.directory / LATENTS_FILE))["z"]
                        if manifest.score_kind == "latent" else None)

    def _kind_score(self, kind: str, u: np.ndarray, seeds: np.ndarray,
                    rows: np.ndarray) -> np.ndarray:
        (z,) = self.call("encode", u)
        return knn_mean_distance(z, self.latents, self.manifest.anomaly.neighbours)

    def _generate(self, z: np.ndarray, requests: Sequence[SeededRows], solver: str,
                  steps: int | None, cond: np.ndarray | None = None) -> np.ndarray:
        (u,) = self.call("sample", z, *_given(cond))
        return u

    def _log_prob(self, u: np.ndarray, method: str, steps: int | None, solver: str | None,
                  probes: int | None, seeds: np.ndarray, rows: np.ndarray,
                  cond: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray | None, int]:
        if method == "hutchinson":
            return self._probed_log_prob(u, probes or self.manifest.defaults.probes, seeds,
                                         rows)
        (lp,) = self.call("log_prob", u, *_given(cond))
        return lp.astype(np.float64), None, 1

    def _probed_log_prob(self, u: np.ndarray, probes: int, seeds: np.ndarray,
                         rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """The mean over ``probes`` keyed Rademacher probes of the ``log_prob(u, probe)``
        graph's estimates, its standard error, and one graph call."""
        batch, dim = u.shape
        e = rademacher_probes(seeds, rows, probes, dim).reshape(probes * batch, dim)
        (lp,) = self.call("log_prob", np.tile(u, (probes, 1)), e)
        mean, se = probe_mean(np.asarray(lp, dtype=np.float64).reshape(probes, batch))
        return mean, se, 1


def _given(cond: np.ndarray | None) -> tuple[np.ndarray, ...]:
    """The ``context`` input of a conditional model's graphs; nothing for another."""
    return () if cond is None else (cond,)
