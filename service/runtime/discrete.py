"""Discrete flow matching: integer tokens sampled by the CTMC's Euler steps over the exported
``denoiser`` graph, and scored by the source's evidence lower bound (``numerics.discrete``:
masked or uniform; for the uniform source ``steps`` sets the bound's time nodes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from numerics.discrete import ctmc_sample, elbo, normal_to_uniform, source_tokens
from numerics.guidance import guided_log_probs
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

    def _given(self, cond: np.ndarray | None, guidance: float | None = None,
               ) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """The denoiser given each row's context rows ``cond: (rows, C)``, tiled over the
        replicas of the rows (stacked replica-major) the sampler and the bounds send; with
        ``guidance`` the conditional and null-token rows run in one graph call and combine as
        ``numerics.guidance.guided_log_probs``."""
        if cond is None:
            return self._denoiser
        if guidance is None:
            return lambda x, t: self._denoiser(x, t, np.tile(cond, (len(x) // len(cond), 1)))
        both = np.concatenate([cond, np.zeros_like(cond)])

        def guided_denoiser(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            lp = self._denoiser(np.concatenate([x, x]), np.concatenate([t, t]), both)
            return guided_log_probs(lp[:len(x)], lp[len(x):], guidance)

        return guided_denoiser

    def _generate(self, z: np.ndarray, requests: Sequence[SeededRows], solver: str,
                  steps: int | None, cond: np.ndarray | None = None,
                  guidance: float | None = None) -> np.ndarray:
        noise = SegmentedNoise(requests)  # per request seed: batching never changes a row
        start = source_tokens(normal_to_uniform(z), self.vocab, self.manifest.tokens.source)
        return ctmc_sample(self._given(cond, guidance), start, steps or 32,
                           lambda shape: normal_to_uniform(noise(shape)),
                           self.manifest.tokens.source)

    def _log_prob(self, u: np.ndarray, method: str, steps: int | None, solver: str | None,
                  probes: int | None, seeds: np.ndarray, rows: np.ndarray,
                  cond: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray | None, int]:
        res = elbo(self._given(cond), np.round(u), self.vocab, self.manifest.tokens.source,
                   probes=probes or self.manifest.defaults.probes, nodes=steps, seed=seeds,
                   rows=rows)
        return res.log_prob, res.std_error, res.nfe
