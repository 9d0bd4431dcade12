"""Discrete flow matching: integer tokens sampled by the CTMC's Euler steps over the exported
``denoiser`` graph, and scored by the source's evidence lower bound (``numerics.discrete``:
masked or uniform; for the uniform source ``steps`` sets the bound's time nodes)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from numerics.discrete import (
    conditioned_denoiser,
    ctmc_sample,
    elbo,
    normal_to_uniform,
    source_tokens,
)
from service.runtime.base import (
    ModelRuntime,
    SeededRows,
    SegmentedNoise,
    register_runtime,
)

__all__ = ["DiscreteRuntime"]


@register_runtime("dfm")
class DiscreteRuntime(ModelRuntime):
    """Rows of ``dim`` tokens in ``[0, vocab)``; ``/log_likelihood`` answers the ELBO."""

    @property
    def vocab(self) -> int:
        return self.manifest.tokens.vocab

    def _denoiser(self, x: np.ndarray, t: np.ndarray, *context: np.ndarray) -> np.ndarray:
        (log_p,) = self.call("denoiser", x, t, *context)
        return log_p.astype(np.float64)

    def _generate(self, z: np.ndarray, requests: Sequence[SeededRows], solver: str,
                  steps: int | None, cond: np.ndarray | None = None,
                  guidance: float | None = None) -> np.ndarray:
        noise = SegmentedNoise(requests)  # per request seed: batching never changes a row
        start = source_tokens(normal_to_uniform(z), self.vocab, self.manifest.tokens.source)
        return ctmc_sample(conditioned_denoiser(self._denoiser, cond, guidance), start,
                           steps or 32, lambda shape: normal_to_uniform(noise(shape)),
                           self.manifest.tokens.source)

    def _log_prob(self, u: np.ndarray, method: str, steps: int | None, solver: str | None,
                  probes: int | None, seeds: np.ndarray, rows: np.ndarray,
                  cond: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray | None, int]:
        res = elbo(conditioned_denoiser(self._denoiser, cond), np.round(u), self.vocab,
                   self.manifest.tokens.source, probes=probes or self.manifest.defaults.probes,
                   nodes=steps, seed=seeds, rows=rows)
        return res.log_prob, res.std_error, res.nfe
