r"""Discrete flow matching over integer tokens; family ``"dfm"``.

Gat, Remez, Shaul, Kreuk, Chen, Synnaeve, Adi & Lipman, "Discrete flow matching" (2024).
Rows are ``D`` tokens in ``[0, V)``. The factorized probability path mixes each token of the
data (``t = 0``) with a source token (``t = 1``): ``x_t^i = x^i`` with probability ``1 - t``,
else a draw of the source, which is either the mask token ``V`` (masked / absorbing source)
or uniform on ``[0, V)``. A network gives the factorized denoiser ``p(x^i | x_t)`` (its
``log_softmax`` is the exported ``denoiser`` graph, ``(batch, D, V)``), trained by cross
entropy on the corrupted tokens.

Sampling is the CTMC's Euler step over the rates (``numerics.discrete``): from ``t`` to
``s < t`` each token that may still move (every token for the uniform source, the masked ones
for the masked source) is redrawn from the denoiser with probability ``(t - s) / t``.

Likelihood: an evidence lower bound. The masked source's (Shi et al. 2024, "Simplified and
generalized masked diffusion", eq. 4; with ``alpha_t = 1 - t``) ``log p(x) >= int_0^1 1/t
E[sum_{i masked} log p(x^i | x_t)] dt``, whose time integral is done exactly: a set of ``k``
masked tokens has weight ``1/k`` (``numerics.discrete.masked_elbo``). The network sees no
time for the masked source (its optimal denoiser does not depend on it). The uniform source's
is the continuous-time bound of the CTMC down to ``t_eps`` followed by one redraw of every
token (the path KL to the conditional path; ``numerics.discrete.uniform_elbo``), its time
integral estimated at stratified times.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from artifact.manifest import Defaults, TensorSpec, TokenSpec
from numerics import discrete
from training.config import ModelConfig
from training.graphs import ExportGraph
from training.nets import drop_context

__all__ = ["DiscreteFlowMatching", "build_dfm"]


class _Denoiser(nn.Module):
    """Tokens ``(batch, D)`` (floats holding integers, ``V`` = mask) and ``t: (batch,)`` ->
    log-probabilities ``(batch, D, V)``: one-hot inputs, an MLP, a softmax per token. A
    conditional denoiser's input layer also sees each row's ``context: (batch, C)``."""

    def __init__(self, dim: int, vocab: int, hidden: int, layers: int, timed: bool,
                 context_features: int = 0) -> None:
        super().__init__()
        self.dim, self.vocab, self.timed = dim, vocab, timed
        widths = [dim * (vocab + 1) + (8 if timed else 0) + context_features] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:],
                                                                    strict=True))
        self.output = nn.Linear(hidden, dim * vocab)
        self.register_buffer("classes", torch.arange(vocab + 1, dtype=torch.float32))
        self.register_buffer("frequencies", math.pi * torch.arange(1, 5, dtype=torch.float32))

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        # one-hot by comparison (ONNX-friendly; no integer casts or scatter)
        one_hot = (x[..., None] == self.classes.to(x.dtype)).to(x.dtype).flatten(1)
        if self.timed:
            angles = t[:, None] * self.frequencies.to(x.dtype)
            one_hot = torch.cat([one_hot, torch.cos(angles), torch.sin(angles)], -1)
        if context is not None:
            one_hot = torch.cat([one_hot, context.to(x.dtype)], -1)
        h = one_hot
        for layer in self.hidden:
            h = nn.functional.silu(layer(h))
        logits = self.output(h).reshape(-1, self.dim, self.vocab)
        return torch.log_softmax(logits, -1)


class _DenoiserGraph(nn.Module):
    def __init__(self, model: DiscreteFlowMatching) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.model.denoiser(x, t)


class _ConditionalDenoiserGraph(_DenoiserGraph):
    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        return self.model.denoiser(x, t, context)


class DiscreteFlowMatching(nn.Module):
    """A factorized denoiser over ``D`` tokens of ``V`` values, source ``"mask"`` or
    ``"uniform"``.

    Example:
        >>> model = build_dfm(4, ModelConfig(hidden_features=16, vocab=3))
        >>> x = model.sample(5, steps=4)
        >>> x.shape, bool(((x >= 0) & (x < 3) & (x == x.round())).all())
        (torch.Size([5, 4]), True)
    """

    family = "dfm"
    likelihood_method = "elbo"

    def __init__(self, dim: int, vocab: int, source: str, hidden: int, layers: int,
                 context_features: int = 0, cfg_dropout: float = 0.0) -> None:
        super().__init__()
        if source not in discrete.SOURCES:
            raise ValueError(f"unknown source {source!r}; choose one of "
                             f"{', '.join(discrete.SOURCES)}")
        self.kind, self.dim, self.vocab, self.source = "dfm", dim, vocab, source
        # a conditional model's context width, and its label dropout (classifier-free guidance)
        self.context_features, self.cfg_dropout = context_features, cfg_dropout
        self.denoiser = _Denoiser(dim, vocab, hidden, layers, timed=source == "uniform",
                                  context_features=context_features)

    def _tokens(self, x: Tensor) -> Tensor:
        return x.round()

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None,
                      context: Tensor | None = None) -> Tensor:
        """Cross entropy of the denoiser on the corrupted tokens of ``x_t``, ``t ~ U(0, 1)``
        (for the uniform source, on every token: a kept token is a corrupted one's twin),
        given a conditional model's ``context``."""
        x = self._tokens(x)
        t = torch.rand(len(x), generator=generator, dtype=x.dtype, device=x.device)
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        v = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_t, corrupted = discrete.corrupt(x, t, u, v, self.vocab, self.source)
        log_p = self.denoiser(x_t, t, drop_context(context, self.cfg_dropout, generator))
        picked = log_p.gather(-1, x.long()[..., None])[..., 0]
        weight = corrupted.to(x.dtype) if self.source == "mask" else torch.ones_like(x)
        return -(picked * weight).sum() / weight.sum().clamp(min=1.0)

    validation_loss = training_loss

    def sample(self, n: int, generator: torch.Generator | None = None, steps: int | None = 32,
               solver: str = "ctmc", context: Tensor | None = None,
               guidance: float | None = None) -> Tensor:
        """``(n, D)`` token rows (float tensors of whole numbers) by ``steps`` Euler steps of
        the CTMC from the source at ``t = 1`` (given ``context: (n, C)``, guided with weight
        ``guidance``)."""
        if solver not in discrete.DFM_SOLVERS:
            raise ValueError(f"unknown DFM solver {solver!r}; choose one of "
                             f"{', '.join(discrete.DFM_SOLVERS)}")
        p = next(self.parameters())
        gen = generator if generator is not None else torch.Generator().manual_seed(
            int(torch.randint(2**62, (1,))))

        def uniform(shape: tuple[int, ...]) -> Tensor:
            return torch.rand(shape, generator=gen, dtype=torch.float64).to(p.dtype)

        start = discrete.source_tokens(uniform((n, self.dim)), self.vocab, self.source)
        with torch.no_grad():
            denoiser = discrete.conditioned_denoiser(self.denoiser, context, guidance)
            return discrete.ctmc_sample(denoiser, start, steps or 32, uniform, self.source)

    def log_prob_with_error(self, x: Tensor, probes: int = 4, seed: int = 0,
                            steps: int | None = None, context: Tensor | None = None,
                            **_: object) -> discrete.ElboResult:
        """The source's ELBO per row (``numerics.discrete.elbo``), nats; ``steps``: the
        uniform source's time nodes (``numerics.discrete.ELBO_NODES`` by default); a
        conditional model's bound on ``log p(x | context)``."""
        with torch.no_grad():
            return discrete.elbo(discrete.conditioned_denoiser(self.denoiser, context),
                                 self._tokens(x), self.vocab, self.source, probes=probes,
                                 nodes=steps, seed=seed)

    def log_prob(self, x: Tensor, **options: object) -> Tensor:
        return self.log_prob_with_error(x, **options).log_prob

    def export_graphs(self) -> dict[str, ExportGraph]:
        """``denoiser``, with a ``context`` input last when the model is conditional."""
        d, c = self.dim, self.context_features
        inputs = [TensorSpec(name="x", shape=["batch", d]),
                  TensorSpec(name="time", shape=["batch"])]
        if c:
            inputs.append(TensorSpec(name="context", shape=["batch", c]))
        return {"denoiser": ExportGraph(
            (_ConditionalDenoiserGraph if c else _DenoiserGraph)(self), inputs,
            [TensorSpec(name="log_probs", shape=["batch", d, self.vocab])])}

    def time_spec(self) -> None:
        return None

    def token_spec(self) -> TokenSpec:
        return TokenSpec(vocab=self.vocab, source=self.source)

    def serving_defaults(self) -> Defaults:
        return Defaults(solver="ctmc", steps=32, method="elbo", probes=4)


def build_dfm(dim: int, cfg: ModelConfig) -> DiscreteFlowMatching:
    """Untrained DFM over ``dim`` tokens of ``cfg.vocab`` values, ``cfg.source``."""
    if cfg.vocab is None:
        raise ValueError("dfm needs the number of token values: integer data with known "
                         "levels (a named discrete set) or --vocab V")
    return DiscreteFlowMatching(dim, cfg.vocab, cfg.source, cfg.hidden_features,
                                cfg.hidden_layers, cfg.context_features, cfg.cfg_dropout)
