"""Convolutional flows for images: RealNVP and Glow with multi-scale factor-out.

Every layer is a :class:`training.flows.base.Transform` over ``(batch, C, H, W)`` tensors
(``ladj: (batch,)``); :class:`ImageFlow` composes them into levels and is itself a ``Flow`` over
flat rows ``(batch, C*H*W)`` (C-order), so the one training loop, preprocessing, evaluation
and export plumbing see the same ``(batch, dim)`` rows as for vector flows.

Dinh et al. 2017, "Density estimation using Real NVP" (checkerboard / channel masks,
squeeze, multi-scale factor-out); Kingma & Dhariwal 2018, "Glow" (ActNorm, invertible 1x1
convolution in LU form, affine coupling).

Example:
    >>> from training.config import ModelConfig
    >>> flow = build_glow_image(64, ModelConfig(image_shape=(1, 8, 8), transforms=2))
    >>> flow.log_prob(torch.randn(5, 64)).shape
    torch.Size([5])
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from training.config import ModelConfig
from training.flows.base import Compose, Flow, Transform
from training.flows.linear import LULinear

__all__ = [
    "ActNorm2d",
    "AffineCoupling2d",
    "FrozenConv1x1",
    "ImageFlow",
    "InvertibleConv1x1",
    "ResNet",
    "Squeeze",
    "build_glow_image",
    "build_realnvp_image",
    "checkerboard_mask",
    "image_shape_of",
]

LOG_SCALE_BOUND = 3.0


def _per_row(x: Tensor, value: Tensor) -> Tensor:
    return x.new_zeros(x.shape[0]) + value


class Squeeze(Transform):
    """Space-to-depth: ``(batch, C, H, W) -> (batch, 4C, H/2, W/2)``, volume preserving.

    Dinh et al. 2017, Sec. 3.6: each 2x2 block of pixels becomes 4 channels.

    Example:
        >>> y, ladj = Squeeze()(torch.randn(2, 1, 4, 4))  # y: (2, 4, 2, 2), ladj == 0
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return y.reshape(n, c * 4, h // 2, w // 2), x.new_zeros(n)

    def inverse(self, y: Tensor) -> Tensor:
        n, c4, h, w = y.shape
        x = y.reshape(n, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(n, c4 // 4, h * 2, w * 2)


class ActNorm2d(Transform):
    """Per-channel ``y = (x + b) * exp(s)``; ``ladj = H W sum(s)`` (Glow, Sec. 3.1).

    Data-dependent initialisation on the first training batch (zero mean, unit variance
    per channel); the ``initialized`` buffer travels with the ``state_dict``.

    Args:
        channels: ``C``.

    Example:
        >>> y, ladj = ActNorm2d(2)(3 + torch.randn(16, 2, 4, 4))
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-(std + 1e-6).log())
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self.initialize(x.detach())
        pixels = x.shape[2] * x.shape[3]
        return (x + self.bias) * self.log_scale.exp(), _per_row(x, pixels * self.log_scale.sum())

    def inverse(self, y: Tensor) -> Tensor:
        return y * (-self.log_scale).exp() - self.bias


class InvertibleConv1x1(LULinear):
    """Invertible 1x1 convolution ``y[:, :, i, j] = W x[:, :, i, j]`` with ``W = P L U``.

    Glow, Sec. 3.2: :class:`~training.flows.linear.LULinear`'s parametrisation (same
    parameters, same random-rotation start, same triangular-solve inverse) applied at every
    pixel, so ``log|det J| = H W sum(log|diag U|)``. ``frozen`` returns a
    :class:`FrozenConv1x1` whose inverse weight is a precomputed buffer (ONNX has no solver).

    Args:
        channels: ``C``.

    Example:
        >>> conv = InvertibleConv1x1(4)
        >>> y, ladj = conv(torch.randn(2, 4, 3, 3))
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pixels = x.shape[2] * x.shape[3]
        y = nn.functional.conv2d(x, self.weight()[:, :, None, None])
        return y, _per_row(x, pixels * self.log_abs_diag.sum())

    def inverse(self, y: Tensor) -> Tensor:
        return nn.functional.conv2d(y, self.inverse_weight()[:, :, None, None])

    @torch.no_grad()
    def frozen(self) -> FrozenConv1x1:
        return FrozenConv1x1(self.weight(), self.inverse_weight(), self.log_abs_diag.sum())


class FrozenConv1x1(Transform):
    """A fixed 1x1 convolution with precomputed inverse: ``InvertibleConv1x1.frozen()``.

    Args:
        weight: ``W: (C, C)``; inverse_weight: ``W^{-1}``; log_abs_det: scalar ``log|det W|``.
    """

    def __init__(self, weight: Tensor, inverse_weight: Tensor, log_abs_det: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone()[:, :, None, None])
        self.register_buffer("inverse_weight", inverse_weight.detach().clone()[:, :, None, None])
        self.register_buffer("log_abs_det", log_abs_det.detach().clone())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pixels = x.shape[2] * x.shape[3]
        return nn.functional.conv2d(x, self.weight), _per_row(x, pixels * self.log_abs_det)

    def inverse(self, y: Tensor) -> Tensor:
        return nn.functional.conv2d(y, self.inverse_weight)


class ResNet(nn.Module):
    """Small convolutional ResNet ``(batch, in, H, W) -> (batch, out, H, W)``, no norm layers.

    3x3 input conv, ``blocks`` residual blocks (ReLU, 3x3 conv, ReLU, 3x3 conv, skip), ReLU and
    a zero-initialised 3x3 output conv (so a fresh coupling is the identity; Glow, Sec. 3.3).

    Args:
        in_channels, out_channels, hidden: channel counts; blocks: residual blocks.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden: int, blocks: int) -> None:
        super().__init__()
        self.input = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(hidden, hidden, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(hidden, hidden, 3, padding=1),
            )
            for _ in range(blocks)
        )
        self.output = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.input(x)
        for block in self.blocks:
            h = h + block(h)
        return self.output(torch.relu(h))


def checkerboard_mask(height: int, width: int, parity: int) -> Tensor:
    """``(1, 1, H, W)`` float mask, 1 on the kept pixels: ``(i + j) % 2 == parity % 2``."""
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return (((i + j) % 2) == parity % 2).to(torch.get_default_dtype())[None, None]


class AffineCoupling2d(Transform):
    """Affine coupling on images with a checkerboard or channel mask (RealNVP, Sec. 3.4-3.5).

    ``y = x_a + (1 - m) (x exp(s(x_a)) + t(x_a))`` with ``x_a = m x`` for a checkerboard
    mask ``m``; for the channel mask, the first half of the channels (``parity`` 0; the
    second half for ``parity`` 1) conditions the other half. ``s`` is soft-clamped to
    ``+-3`` by ``3 tanh(. / 3)``; ``ladj`` sums ``s`` over the moved elements.

    Args:
        shape: ``(C, H, W)`` of the input.
        mask: ``"checkerboard"`` or ``"channel"`` (needs an even ``C``).
        parity: which half is kept.
        hidden: ResNet width; blocks: residual blocks.
        context_features: ``C'`` context columns the ResNet also sees, each as a constant
            plane beside the kept channels (``s(x_a, c)``, ``t(x_a, c)``; 0: unconditional).

    Example:
        >>> layer = AffineCoupling2d((2, 4, 4), "channel", 0, hidden=8, blocks=1)
        >>> y, ladj = layer(torch.randn(3, 2, 4, 4))
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        mask: str,
        parity: int,
        hidden: int = 32,
        blocks: int = 1,
        context_features: int = 0,
    ) -> None:
        super().__init__()
        c, h, w = shape
        if mask == "checkerboard":
            self.register_buffer("mask", checkerboard_mask(h, w, parity))
            in_c, out_c = c, 2 * c
        elif mask == "channel":
            if c % 2:
                raise ValueError(f"a channel mask needs an even number of channels, got {c}")
            in_c, out_c = c // 2, c
        else:
            raise ValueError(f"unknown mask {mask!r}; choose 'checkerboard' or 'channel'")
        self.kind, self.parity, self.half = mask, parity % 2, c // 2
        self.conditional = context_features > 0
        self.net = ResNet(in_c + context_features, out_c, hidden, blocks)

    def _log_scale_and_shift(self, x_a: Tensor,
                             context: Tensor | None) -> tuple[Tensor, Tensor]:
        if context is not None:
            planes = context[:, :, None, None].expand(-1, -1, *x_a.shape[2:]).to(x_a.dtype)
            x_a = torch.cat([x_a, planes], dim=1)
        raw_s, t = self.net(x_a).chunk(2, dim=1)
        return LOG_SCALE_BOUND * torch.tanh(raw_s / LOG_SCALE_BOUND), t

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x[:, : self.half], x[:, self.half :]
        return (b, a) if self.parity else (a, b)

    def _merge(self, kept: Tensor, moved: Tensor) -> Tensor:
        return torch.cat([moved, kept] if self.parity else [kept, moved], dim=1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.kind == "checkerboard":
            s, t = self._log_scale_and_shift(x * self.mask, context)
            s, t = s * (1 - self.mask), t * (1 - self.mask)
            return x * s.exp() + t, s.sum(dim=(1, 2, 3))
        kept, moved = self._split(x)
        s, t = self._log_scale_and_shift(kept, context)
        return self._merge(kept, moved * s.exp() + t), s.sum(dim=(1, 2, 3))

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        if self.kind == "checkerboard":
            s, t = self._log_scale_and_shift(y * self.mask, context)
            s, t = s * (1 - self.mask), t * (1 - self.mask)
            return (y - t) * (-s).exp()
        kept, moved = self._split(y)
        s, t = self._log_scale_and_shift(kept, context)
        return self._merge(kept, (moved - t) * (-s).exp())


class ImageFlow(Flow):
    """Multi-scale flow over images, presented as a ``Flow`` over flat rows.

    Level ``k`` maps its input ``(batch, C_k, H_k, W_k)`` through ``transforms[k]`` (a
    :class:`~training.flows.base.Compose`, which may squeeze); then, except after the last
    level, the first half of the channels is factored out: it goes straight to the standard
    normal base (RealNVP, Sec. 3.6) and the rest enters level ``k + 1``. ``z`` is the
    concatenation of the factored parts, flattened, then the last level's output:
    ``(batch, C*H*W)``.

    Args:
        shape: ``(C, H, W)`` of one image.
        levels: one :class:`~training.flows.base.Compose` per scale.
        factor_out: channels factored out after each level (0 for none), same length.
        context_features: a conditional flow's context width (its couplings see the
            context; 0: unconditional).
    """

    def __init__(
        self, shape: tuple[int, int, int], levels: list[Compose], factor_out: list[int],
        context_features: int = 0,
    ) -> None:
        super().__init__(math.prod(shape), levels, context_features)
        self.image_shape = tuple(shape)
        self.factor_out = list(factor_out)
        self._out_shapes = self._trace_shapes()

    @torch.no_grad()
    def _trace_shapes(self) -> list[tuple[int, ...]]:
        """Shape after each level (before factoring out), from one eval-mode dry run."""
        shapes = []
        x = torch.zeros(1, *self.image_shape)
        for level, k in zip(self.transforms, self.factor_out, strict=True):
            for t in level.transforms:
                x = _shape_only(t, x)
            shapes.append(tuple(x.shape[1:]))
            x = x[:, k:]
        return shapes

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        h = x.reshape(x.shape[0], *self.image_shape)
        ladj = x.new_zeros(x.shape[0])
        parts = []
        for level, k in zip(self.transforms, self.factor_out, strict=True):
            h, step = level(h, context)
            ladj = ladj + step
            parts.append(h[:, :k].flatten(1))
            h = h[:, k:]
        parts.append(h.flatten(1))
        return torch.cat(parts, dim=1), ladj

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        sizes = [k * math.prod(s[1:]) for s, k in zip(self._out_shapes, self.factor_out,
                                                        strict=True)]
        h = z[:, sum(sizes):].reshape(z.shape[0], *self._last_shape())
        offset = sum(sizes)
        for level, k, shape, size in reversed(
            list(zip(self.transforms, self.factor_out, self._out_shapes, sizes, strict=True))
        ):
            offset -= size
            factored = z[:, offset : offset + size].reshape(z.shape[0], k, *shape[1:])
            h = level.inverse(torch.cat([factored, h], dim=1), context)
        return h.flatten(1)

    def _last_shape(self) -> tuple[int, ...]:
        c, *rest = self._out_shapes[-1]
        return (c - self.factor_out[-1], *rest)


def _shape_only(t: Transform, x: Tensor) -> Tensor:
    """Output of ``t`` on a dummy input (only its shape is used); Squeeze changes it."""
    if isinstance(t, Squeeze):
        return t(x)[0]
    return x


def image_shape_of(kind: str, dim: int, cfg: ModelConfig) -> tuple[int, int, int]:
    """``cfg.image_shape`` checked against ``dim`` (the error says what to set)."""
    if cfg.image_shape is None:
        raise ValueError(
            f"{kind!r} is an image model and needs ModelConfig.image_shape=[C, H, W] "
            f"(train it on an image data set such as 'digits_image')"
        )
    shape = tuple(int(v) for v in cfg.image_shape)
    if math.prod(shape) != dim:
        raise ValueError(f"image_shape {list(shape)} has {math.prod(shape)} values, but the "
                         f"data has dim={dim}")
    return shape  # type: ignore[return-value]


def _check_scales(kind: str, shape: tuple[int, int, int], scales: int) -> None:
    _, h, w = shape
    if h % (2**scales) or w % (2**scales):
        raise ValueError(f"{kind!r} squeezes {scales} times: H and W ({h}, {w}) must be "
                         f"divisible by {2**scales}; lower ModelConfig.scales")


def build_glow_image(dim: int, cfg: ModelConfig) -> ImageFlow:
    """Glow (Kingma & Dhariwal 2018, Fig. 2): ``cfg.scales`` levels of squeeze and
    ``cfg.transforms`` steps (ActNorm, 1x1 conv, channel-mask affine coupling with a ResNet of
    width ``hidden_features`` and ``hidden_layers`` blocks), half the channels factored out
    between levels."""
    shape = image_shape_of("glow_image", dim, cfg)
    _check_scales("glow_image", shape, cfg.scales)
    c, h, w = shape
    levels, factor_out = [], []
    for level in range(cfg.scales):
        c, h, w = c * 4, h // 2, w // 2
        steps: list[Transform] = [Squeeze()]
        for i in range(cfg.transforms):
            steps += [
                ActNorm2d(c),
                InvertibleConv1x1(c),
                AffineCoupling2d((c, h, w), "channel", i, cfg.hidden_features, cfg.hidden_layers,
                                 cfg.context_features),
            ]
        levels.append(Compose(steps))
        last = level == cfg.scales - 1
        factor_out.append(0 if last else c // 2)
        c = c if last else c - c // 2
    return ImageFlow(shape, levels, factor_out, cfg.context_features)


def build_realnvp_image(dim: int, cfg: ModelConfig) -> ImageFlow:
    """RealNVP (Dinh et al. 2017, Sec. 3.6): per level ``cfg.transforms`` checkerboard
    couplings, squeeze, ``cfg.transforms`` channel couplings, factor out half; the last level
    is checkerboard couplings only (``transforms + 1``). ActNorm stands in for batch norm."""
    shape = image_shape_of("realnvp_image", dim, cfg)
    _check_scales("realnvp_image", shape, cfg.scales - 1)
    c, h, w = shape
    width, blocks = cfg.hidden_features, cfg.hidden_layers

    def couplings(mask: str, count: int, offset: int = 0) -> list[Transform]:
        out: list[Transform] = []
        for i in range(count):
            out += [ActNorm2d(c), AffineCoupling2d((c, h, w), mask, i + offset, width, blocks,
                                                   cfg.context_features)]
        return out

    levels, factor_out = [], []
    for _ in range(cfg.scales - 1):
        steps = couplings("checkerboard", cfg.transforms)
        c, h, w = c * 4, h // 2, w // 2
        steps += [Squeeze(), *couplings("channel", cfg.transforms)]
        levels.append(Compose(steps))
        factor_out.append(c // 2)
        c -= c // 2
    levels.append(Compose(couplings("checkerboard", cfg.transforms + 1)))
    factor_out.append(0)
    return ImageFlow(shape, levels, factor_out, cfg.context_features)
