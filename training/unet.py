"""A small convolutional U-Net velocity / noise network with hand-written forward-mode
derivatives, and the image diffusion and flow-matching models built on it.

Like :class:`training.nets.TimeMLP`, the network exposes ``forward(x, t)``, ``jvp(x, t, e)``
and ``divergence(x, t)`` on flat rows ``x: (batch, C*H*W)`` (C-order), reshaped inside to
``(batch, C, H, W)``. Every operation is written once over a primal ``h`` and an optional
stack of tangents ``dh: (batch, K, ...)``: a convolution is linear, so the tangent goes
through the same convolution without its bias; SiLU multiplies the tangent by its
derivative; up-sampling, concatenation and skips are linear. The time embedding has no
tangent. There are no normalisation layers, so no hand-written norm JVP is needed; the
result exports to ONNX without autograd (Ronneberger et al. 2015, "U-Net"; Ho et al. 2020,
"DDPM", appendix B, for the time-conditioned residual blocks).

Example:
    >>> net = UNet((1, 8, 8), channels=8, time_embedding=8, levels=1)
    >>> x, t = torch.randn(3, 64), torch.rand(3)
    >>> net(x, t).shape, net.divergence(x, t)[1].shape
    (torch.Size([3, 64]), torch.Size([3]))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812

from numerics.schedules import make_schedule
from training.config import ModelConfig
from training.diffusion import DiffusionModel
from training.flow_matching import (
    ConditionalFlowMatcher,
    ExactOptimalTransportMatcher,
    FlowMatchingModel,
)
from training.flows.image import image_shape_of
from training.nets import VelocityModel, conditioned, silu_derivative

__all__ = ["UNet", "build_cfm_image", "build_ddpm_image", "build_otcfm_image"]

Dual = tuple[Tensor, Tensor | None]
"""A primal ``(batch, C, H, W)`` and its tangents ``(batch, K, C, H, W)`` (or ``None``)."""


def _over_tangents(fn: object, dh: Tensor | None) -> Tensor | None:
    """Apply a linear image map ``fn`` to every tangent of ``dh: (batch, K, C, H, W)``."""
    if dh is None:
        return None
    out = fn(dh.flatten(0, 1))  # type: ignore[operator]
    return out.reshape(dh.shape[0], dh.shape[1], *out.shape[1:])


def conv(layer: nn.Conv2d, h: Tensor, dh: Tensor | None) -> Dual:
    """Convolution; the tangent goes through the same weights without the bias."""
    tangent = _over_tangents(
        lambda v: F.conv2d(v, layer.weight, None, layer.stride, layer.padding), dh
    )
    return layer(h), tangent


def silu(h: Tensor, dh: Tensor | None) -> Dual:
    return F.silu(h), None if dh is None else silu_derivative(h)[:, None] * dh


def upsample(h: Tensor, dh: Tensor | None) -> Dual:
    """Nearest-neighbour 2x up-sampling (linear)."""
    up = lambda v: F.interpolate(v, scale_factor=2.0, mode="nearest")  # noqa: E731
    return up(h), _over_tangents(up, dh)


def concat(a: Dual, b: Dual) -> Dual:
    h = torch.cat([a[0], b[0]], dim=1)
    return h, None if a[1] is None else torch.cat([a[1], b[1]], dim=2)


class ResBlock(nn.Module):
    """``skip(x) + conv2(silu(conv1(silu(x)) + W temb))``; ``skip`` is 1x1 when widths differ."""

    def __init__(self, in_channels: int, out_channels: int, embedding: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embedding, out_channels)
        self.skip = (
            nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )

    def forward(self, h: Tensor, dh: Tensor | None, temb: Tensor) -> Dual:
        a, da = conv(self.conv1, *silu(h, dh))
        a = a + self.time(temb)[:, :, None, None]  # constant in x: no tangent
        b, db = conv(self.conv2, *silu(a, da))
        s, ds = (h, dh) if self.skip is None else conv(self.skip, h, dh)
        return s + b, None if dh is None else ds + db


class UNet(nn.Module):
    """Time-conditioned U-Net ``f(x, t)`` on flat image rows, with forward-mode JVP.

    ``levels`` down-samplings (stride-2 3x3 convs, width doubling, capped at 4x), one
    residual block per resolution on the way down and up, skip connections by
    concatenation, a middle block, and a zero-initialised output conv.

    Arguments:
        shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``2**levels``.
        channels: width at full resolution.
        time_embedding: Fourier features of ``t`` (as in ``TimeMLP``), then a SiLU layer.
        levels: number of down-samplings.
        context_features: ``C`` context columns (a label's one-hot row or a standardized
            context: conditional models; 0: none), embedded by a linear layer and added to
            the time embedding that every residual block sees (the class embedding of Ho &
            Salimans' guided U-Nets). Constant in ``x``, so it carries no tangent.
    """

    def __init__(
        self, shape: tuple[int, int, int], channels: int = 32, time_embedding: int = 16,
        levels: int = 2, context_features: int = 0,
    ) -> None:
        super().__init__()
        c, h, w = shape
        if h % (2**levels) or w % (2**levels):
            raise ValueError(f"a U-Net with {levels} down-samplings needs H and W divisible by "
                             f"{2**levels}, got {h}x{w}; lower ModelConfig.scales")
        self.image_shape, self.dim = tuple(shape), math.prod(shape)
        k = torch.arange(time_embedding)
        dtype = torch.get_default_dtype()
        self.register_buffer("frequencies", math.pi * (k // 2 + 1).to(dtype))
        self.register_buffer("phases", (k % 2).to(dtype) * (math.pi / 2))
        emb = 4 * channels
        self.embed = nn.Linear(time_embedding, emb)
        self.context_features = context_features
        self.embed_context = nn.Linear(context_features, emb) if context_features else None
        widths = [channels * min(2**i, 4) for i in range(levels + 1)]
        self.input = nn.Conv2d(c, channels, 3, padding=1)
        self.down_blocks = nn.ModuleList(ResBlock(wd, wd, emb) for wd in widths[:-1])
        pairs = list(zip(widths[:-1], widths[1:], strict=True))
        self.downs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in pairs)
        self.middle = ResBlock(widths[-1], widths[-1], emb)
        self.ups = nn.ModuleList(nn.Conv2d(b, a, 3, padding=1) for a, b in pairs)
        self.up_blocks = nn.ModuleList(ResBlock(2 * wd, wd, emb) for wd in widths[:-1])
        self.output = nn.Conv2d(channels, c, 3, padding=1)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def embed_time(self, t: Tensor) -> Tensor:
        """``t: (batch,)`` -> ``(batch, 4 * channels)``."""
        return F.silu(self.embed(torch.cos(t[:, None] * self.frequencies - self.phases)))

    def _run(self, x: Tensor, t: Tensor, dx: Tensor | None,
             context: Tensor | None = None) -> Dual:
        """``x: (batch, D)``, tangents ``dx: (batch, K, D)`` or ``None`` (``context: (batch,
        C)``) -> flat outputs."""
        shape = self.image_shape
        h = x.reshape(x.shape[0], *shape)
        dh = None if dx is None else dx.reshape(dx.shape[0], dx.shape[1], *shape)
        temb = self.embed_time(t)
        if self.embed_context is not None:
            if context is None:
                raise ValueError(f"this U-Net is conditional: it needs a context of "
                                 f"{self.context_features} columns")
            temb = temb + self.embed_context(context)
        h, dh = conv(self.input, h, dh)
        skips = []
        for block, down in zip(self.down_blocks, self.downs, strict=True):
            h, dh = block(h, dh, temb)
            skips.append((h, dh))
            h, dh = conv(down, h, dh)
        h, dh = self.middle(h, dh, temb)
        for block, up, skip in zip(
            reversed(self.up_blocks), reversed(self.ups), reversed(skips), strict=True
        ):
            h, dh = conv(up, *upsample(h, dh))
            h, dh = block(*concat((h, dh), skip), temb)
        h, dh = conv(self.output, *silu(h, dh))
        return h.flatten(1), None if dh is None else dh.flatten(2)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None) -> Tensor:
        """``x: (batch, D)``, ``t: (batch,)`` (``context: (batch, C)``) -> ``(batch, D)``."""
        return self._run(x, t, None, context)[0]

    def jvp(self, x: Tensor, t: Tensor, e: Tensor,
            context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Output and ``(d f / d x) e``, all ``(batch, D)``."""
        out, tangent = self._run(x, t, e[:, None, :], context)
        return out, tangent[:, 0, :]

    def divergence(self, x: Tensor, t: Tensor,
                   context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Output ``(batch, D)`` and exact ``tr(d f / d x)``: ``(batch,)``, with all ``D``
        basis tangents pushed at once (``D`` times a forward pass)."""
        eye = torch.eye(self.dim, dtype=x.dtype, device=x.device)
        out, jacobian = self._run(x, t, eye[None].expand(x.shape[0], -1, -1), context)
        return out, (jacobian * eye).sum(dim=(-2, -1))


def _traced_by_probes(model: VelocityModel) -> VelocityModel:
    """Image models' likelihood defaults to Hutchinson's estimate: an exact trace costs
    ``dim`` network passes per step."""
    model.likelihood_method = "hutchinson"
    return model


def _unet(dim: int, cfg: ModelConfig, kind: str) -> UNet:
    shape = image_shape_of(kind, dim, cfg)
    return UNet(shape, cfg.hidden_features, cfg.time_embedding, cfg.scales,
                cfg.context_features)


def build_ddpm_image(dim: int, cfg: ModelConfig) -> DiffusionModel:
    """Untrained VP-SDE diffusion with a :class:`UNet` (width ``cfg.hidden_features``,
    ``cfg.scales`` down-samplings) on ``cfg.image_shape`` images."""
    schedule = make_schedule(cfg.schedule, beta_min=cfg.beta_min, beta_max=cfg.beta_max)
    return _traced_by_probes(conditioned(DiffusionModel(
        dim, _unet(dim, cfg, "ddpm_image"), schedule, cfg.prediction, cfg.t_min, "ddpm_image"),
        cfg))


def build_cfm_image(dim: int, cfg: ModelConfig) -> FlowMatchingModel:
    """Untrained conditional flow matching with a :class:`UNet`."""
    return _traced_by_probes(conditioned(FlowMatchingModel(
        "cfm_image", dim, _unet(dim, cfg, "cfm_image"), ConditionalFlowMatcher(cfg.sigma_min)),
        cfg))


def build_otcfm_image(dim: int, cfg: ModelConfig) -> FlowMatchingModel:
    """Untrained OT-CFM with a :class:`UNet`."""
    return _traced_by_probes(conditioned(FlowMatchingModel(
        "otcfm_image", dim, _unet(dim, cfg, "otcfm_image"),
        ExactOptimalTransportMatcher(cfg.sigma_min)), cfg))
