r"""TarFlow: a transformer autoregressive flow over a sequence of tokens.

Zhai et al., "Normalizing flows are capable generative models", 2024. A row is cut into
``T`` tokens of ``C`` values: vectors into consecutive chunks of ``token_size``
(``tarflow``), ``[C, H, W]`` images into ``patch_size x patch_size`` patches
(``tarflow_image``, ``C * p^2`` values per token). Each block is a small causal transformer
that reads the tokens before ``i`` (the sequence shifted right by one) and gives an affine
map of token ``i``: ``z_i = (x_i - mu_i(x_<i)) exp(-alpha_i(x_<i))`` (data -> noise), so the
Jacobian is block-triangular and ``log |det| = -sum alpha``: the exact log-likelihood in one
pass per block. The token order is reversed between blocks. Sampling inverts a block token by
token (``T`` transformer passes per block: the sequence length, not the dimension, sets the
passes), unrolled in the exported ``sample`` graph. Each pass feeds the transformer only the
newest token and keeps every layer's keys and values of the earlier ones (a KV cache): step
``i`` costs one token's projections and MLP and attention over ``i + 1`` keys, not a pass
over the whole prefix. Unrolled, the cache is a tensor per layer that grows by one token per
step, each step's shape fixed, so the ONNX graph holds it as plain ``Concat``s.
``TarBlock.kv_cache = False`` re-runs the whole prefix instead (the parity reference and
the benchmark's baseline: docs/BENCHMARKS.md).

Training adds Gaussian noise of standard deviation ``noise_std`` (``ModelConfig``, model
space) to every batch, so the flow models the slightly smoothed density; a sample is then
denoised in one score step ``x + noise_std^2 grad log p(x)`` (Tweedie's formula, the
paper's sec. 2.4). The exported graphs hold no autograd, so the score is taken by central
differences of ``log p`` (``2 D`` extra passes in one batch, step :data:`SCORE_STEP`), the
same arithmetic eagerly and in the graph. The manifest records ``noise_std`` as its
``noise`` section (``artifact.manifest.NoiseSpec``), which ``/models`` shows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from artifact.manifest import NoiseSpec
from numerics.likelihood import standard_normal_log_prob
from training.config import ModelConfig
from training.flows.base import Flow, Transform

__all__ = ["CausalTransformer", "KVCache", "TarBlock", "TarFlow", "build_tarflow",
           "build_tarflow_image", "patch_order"]

ALPHA_BOUND = 4.0
"""``alpha = B tanh(raw / B)``: log-scales stay within ``(-B, B)``, smooth near zero."""
SCORE_STEP = 1e-2
"""Central-difference step of the denoising score (model space, float32-safe)."""


KVCache = list[tuple[Tensor, Tensor]]
"""Per layer, the keys and values ``(batch, heads, P, width / heads)`` of ``P`` tokens."""


class CausalTransformer(nn.Module):
    """Pre-LayerNorm transformer over ``(batch, T, C)`` tokens with a causal mask, written
    with plain matmuls (ONNX-friendly). Output ``(batch, T, 2C)`` at position ``i`` depends
    on input positions ``<= i``; the last projection starts at zero.

    Given a ``cache`` (a list, empty at first), ``x`` holds the tokens after the ``P``
    cached ones: they sit at positions ``P ..``, attend to the cached keys and values and
    their own, and append theirs to the cache; the output is theirs only. Feeding a
    sequence in pieces gives what one pass over it gives.

    Example:
        >>> net = CausalTransformer(4, 2, 8, 1, 2)
        >>> x, cache = torch.randn(3, 4, 2), []
        >>> pieces = torch.cat([net(x[:, i:i + 1], cache) for i in range(4)], 1)
        >>> bool(torch.allclose(pieces, net(x), atol=1e-6))
        True
    """

    def __init__(self, tokens: int, size: int, width: int, layers: int, heads: int,
                 context_features: int = 0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"tarflow: hidden width {width} is not divisible by {heads} "
                             "attention heads")
        self.heads = heads
        self.embed = nn.Linear(size, width)
        # a conditional flow's context, embedded and added to every token (like the position)
        self.embed_context = nn.Linear(context_features, width) if context_features else None
        self.position = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.norms1 = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.qkv = nn.ModuleList(nn.Linear(width, 3 * width) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.norms2 = nn.ModuleList(nn.LayerNorm(width) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                               nn.Linear(2 * width, width))
                                 for _ in range(layers))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 2 * size)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        mask = torch.full((tokens, tokens), -1e9).triu(1)  # additive: no look ahead
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor, cache: KVCache | None = None,
                context: Tensor | None = None) -> Tensor:
        b, t, _ = x.shape
        past = cache[0][0].shape[2] if cache else 0
        h = self.embed(x) + self.position[past:past + t]
        if self.embed_context is not None:
            if context is None:
                raise ValueError("this TarFlow is conditional: it needs a context")
            h = h + self.embed_context(context)[:, None, :]
        width = h.shape[-1]
        dh = width // self.heads
        mask = self.mask[past:past + t, :past + t]
        for layer, (norm1, qkv, proj, norm2, mlp) in enumerate(zip(
                self.norms1, self.qkv, self.proj, self.norms2, self.mlp, strict=True)):
            q, k, v = qkv(norm1(h)).reshape(b, t, 3, self.heads, dh).permute(2, 0, 3, 1, 4)
            if cache is not None:
                if past:
                    k = torch.cat([cache[layer][0], k], 2)
                    v = torch.cat([cache[layer][1], v], 2)
                    cache[layer] = (k, v)
                else:
                    cache.append((k, v))
            scores = q @ k.transpose(-1, -2) / math.sqrt(dh) + mask
            attended = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(b, t, width)
            h = h + proj(attended)
            h = h + mlp(norm2(h))
        return self.out(self.out_norm(h))


class TarBlock(Transform):
    """One autoregressive affine block over ``tokens`` tokens of ``size`` values; with
    ``reverse`` it reads the tokens in reverse order."""

    kv_cache: bool = True
    """Sample with the KV cache (False: re-run the whole prefix at every step)."""

    def __init__(self, tokens: int, size: int, width: int, layers: int, heads: int,
                 reverse: bool, context_features: int = 0) -> None:
        super().__init__()
        self.tokens, self.size, self.reverse = tokens, size, reverse
        self.conditional = context_features > 0
        self.net = CausalTransformer(tokens, size, width, layers, heads, context_features)

    def _affine(self, out: Tensor) -> tuple[Tensor, Tensor]:
        """The transformer's output ``(..., 2C)`` as ``(mu, alpha)``, each ``(..., C)``."""
        mu, raw = out[..., : self.size], out[..., self.size:]
        return mu, ALPHA_BOUND * torch.tanh(raw / ALPHA_BOUND)

    def _params(self, seq: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(mu, alpha)`` of every token from the tokens before it; ``seq: (b, T, C)``."""
        shifted = torch.cat([torch.zeros_like(seq[:, :1]), seq[:, :-1]], 1)
        return self._affine(self.net(shifted, context=context))

    def _tokens(self, x: Tensor) -> Tensor:
        seq = x.reshape(-1, self.tokens, self.size)
        return seq.flip(1) if self.reverse else seq

    def _flat(self, seq: Tensor) -> Tensor:
        return (seq.flip(1) if self.reverse else seq).reshape(-1, self.tokens * self.size)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        seq = self._tokens(x)
        mu, alpha = self._params(seq, context)
        z = (seq - mu) * torch.exp(-alpha)
        return self._flat(z), -alpha.sum((1, 2))

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        z = self._tokens(y)
        if not self.kv_cache:
            return self._flat(self._inverse_prefix(z, context))
        cache: KVCache = []
        token, tokens = torch.zeros_like(z[:, :1]), []
        for i in range(self.tokens):  # token i needs tokens < i: T passes, unrolled
            # the shifted input's token i
            mu, alpha = self._affine(self.net(token, cache, context))
            token = z[:, i:i + 1] * torch.exp(alpha) + mu
            tokens.append(token)
        return self._flat(torch.cat(tokens, 1))

    def _inverse_prefix(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """The inverse without a cache: every step re-runs the transformer on the whole
        (zero-padded) sequence, ``z: (b, T, C)`` -> ``x: (b, T, C)``."""
        x = torch.zeros_like(z)
        for i in range(self.tokens):
            mu, alpha = self._params(x, context)
            token = z[:, i] * torch.exp(alpha[:, i]) + mu[:, i]
            x = torch.cat([x[:, :i], token[:, None], x[:, i + 1:]], 1)
        return x


class TarFlow(Flow):
    """TarFlow blocks over a token layout (a fixed permutation of the row), with noise
    augmentation in training and one-step denoising of samples (module docstring).

    Args:
        dim: features ``D``.
        blocks: the :class:`TarBlock` steps.
        order: ``(D,)`` the permutation that lays a row out as tokens (identity for
            vectors, patch-major for images).
        noise_std: training noise in model space (0: none, and no denoising).
    """

    def __init__(self, dim: int, blocks: list[TarBlock], order: Tensor,
                 noise_std: float = 0.0, context_features: int = 0) -> None:
        super().__init__(dim, blocks, context_features)
        self.noise_std = noise_std
        self.register_buffer("order", order)
        self.register_buffer("unorder", torch.argsort(order))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return super().forward(x[:, self.order], context)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        x = super().inverse(y, context)[:, self.unorder]
        return self.denoise(x, context) if self.noise_std > 0 else x

    def score(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``grad log p(x)`` (``| context``) by central differences: ``(batch, D)``, one
        batched pass."""
        b, d = x.shape
        step = SCORE_STEP * torch.eye(d, dtype=x.dtype, device=x.device)
        points = torch.cat([(x[:, None, :] + step).reshape(b * d, d),
                            (x[:, None, :] - step).reshape(b * d, d)], 0)
        each = None if context is None else context.repeat_interleave(d, 0).repeat(2, 1)
        lp = self.log_prob(points, each).reshape(2, b, d)
        return (lp[0] - lp[1]) / (2 * SCORE_STEP)

    def noise_spec(self) -> NoiseSpec | None:
        """The manifest's record of the training noise (none without it)."""
        return NoiseSpec(std=self.noise_std) if self.noise_std > 0 else None

    def denoise(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Tweedie's one step ``x + noise_std^2 grad log p(x)``."""
        return x + self.noise_std**2 * self.score(x, context)

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None,
                      context: Tensor | None = None) -> Tensor:
        if self.noise_std > 0 and self.training:
            x = x + self.noise_std * torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                                 device=x.device)
        return -self.log_prob(x, context).mean()

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        z, ladj = self(x, context)
        return standard_normal_log_prob(z) + ladj


def _blocks(tokens: int, size: int, cfg: ModelConfig) -> list[TarBlock]:
    return [TarBlock(tokens, size, cfg.hidden_features, cfg.hidden_layers, cfg.heads,
                     reverse=bool(i % 2), context_features=cfg.context_features)
            for i in range(cfg.transforms)]


def build_tarflow(dim: int, cfg: ModelConfig) -> TarFlow:
    """Vectors cut into ``dim / cfg.token_size`` tokens of ``cfg.token_size`` values."""
    if dim % cfg.token_size:
        raise ValueError(f"tarflow: token size {cfg.token_size} does not divide the "
                         f"dimension {dim}; use a divisor of {dim}")
    return TarFlow(dim, _blocks(dim // cfg.token_size, cfg.token_size, cfg),
                   torch.arange(dim), cfg.noise_std, cfg.context_features)


def patch_order(shape: tuple[int, int, int], patch: int) -> Tensor:
    """``(C*H*W,)`` indices into a C-order row that list it patch by patch (row-major
    patches), each patch's values channel, then row, then column."""
    c, h, w = shape
    index = torch.arange(c * h * w).reshape(c, h // patch, patch, w // patch, patch)
    return index.permute(1, 3, 0, 2, 4).reshape(-1)


def build_tarflow_image(dim: int, cfg: ModelConfig) -> TarFlow:
    """``[C, H, W]`` images cut into ``cfg.patch_size`` square patches."""
    if cfg.image_shape is None:
        raise ValueError("tarflow_image needs image_shape (C, H, W)")
    c, h, w = cfg.image_shape
    p = cfg.patch_size
    if h % p or w % p:
        raise ValueError(f"tarflow_image: patch size {p} does not divide the {h}x{w} image; "
                         "use a common divisor of its height and width")
    if c * h * w != dim:
        raise ValueError(f"image_shape {cfg.image_shape} has {c * h * w} values, not {dim}")
    return TarFlow(dim, _blocks((h // p) * (w // p), c * p * p, cfg),
                   patch_order((c, h, w), p), cfg.noise_std, cfg.context_features)
