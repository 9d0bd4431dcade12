"""The one registry of model types (no string dispatch anywhere else).

Every model, whatever its family, is an ``nn.Module`` with:

* ``family: str`` -- ``"flow"``, ``"diffusion"`` or ``"flow_matching"``; ``dim: int``.
* ``training_loss(x, generator) -> Tensor`` -- scalar loss on a batch ``x: (batch, dim)`` in
  model space (after preprocessing); ``generator`` is a ``torch.Generator`` or ``None``.
* ``validation_loss(x, generator) -> Tensor`` -- scalar; flows return the mean NLL.
* ``sample(n, generator=None, **options) -> Tensor`` -- ``(n, dim)`` in model space.
* ``log_prob(x, **options) -> Tensor`` -- ``(batch,)`` in model space.

Flows add ``forward(x) -> (z, ladj)`` and ``inverse(z) -> x``. Diffusion and flow matching
add ``velocity(x, t)``, ``velocity_div(x, t) -> (v, div)`` and ``velocity_jvp(x, t, e) ->
(v, jvp)`` with ``t: (batch,)`` in the shared time convention (t = 0 data, t = 1 noise), and
``t_min`` (where likelihood integration starts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from training.config import ModelConfig

__all__ = ["ALL_MODEL_TYPES", "IMAGE_MODEL_TYPES", "MODEL_TYPES", "ModelSpec", "build_model",
           "family_of", "is_image_model"]


@dataclass(frozen=True)
class ModelSpec:
    family: str
    summary: str
    builder: Callable[[str, int, ModelConfig], nn.Module]


def _flow(kind: str, dim: int, cfg: ModelConfig) -> nn.Module:
    from training.flows import build_flow

    return build_flow(kind, dim, cfg)


def _diffusion(kind: str, dim: int, cfg: ModelConfig) -> nn.Module:
    from training.diffusion import build_diffusion

    return build_diffusion(kind, dim, cfg)


def _flow_matching(kind: str, dim: int, cfg: ModelConfig) -> nn.Module:
    from training.flow_matching import build_flow_matching

    return build_flow_matching(kind, dim, cfg)


MODEL_TYPES: dict[str, ModelSpec] = {
    "nice": ModelSpec("flow", "NICE: additive coupling + diagonal scale", _flow),
    "realnvp": ModelSpec("flow", "RealNVP: affine coupling, alternating masks", _flow),
    "glow": ModelSpec("flow", "Glow step: ActNorm + LU linear + affine coupling", _flow),
    "maf": ModelSpec("flow", "MAF: masked autoregressive affine (MADE)", _flow),
    "iaf": ModelSpec("flow", "IAF: inverse autoregressive affine (MADE)", _flow),
    "nsf": ModelSpec("flow", "NSF: rational-quadratic spline coupling", _flow),
    "nsf_ar": ModelSpec("flow", "NSF: rational-quadratic spline, autoregressive", _flow),
    "ddpm": ModelSpec("diffusion", "VP-SDE diffusion (epsilon or v prediction)", _diffusion),
    "cfm": ModelSpec("flow_matching", "conditional flow matching, linear path", _flow_matching),
    "otcfm": ModelSpec("flow_matching", "CFM with minibatch exact OT pairs", _flow_matching),
    "si": ModelSpec("flow_matching", "stochastic interpolant (noise gamma)", _flow_matching),
}


def _image(kind: str, dim: int, cfg: ModelConfig) -> nn.Module:
    from training.flows.image import IMAGE_FLOW_BUILDERS, build_image_flow

    if kind in IMAGE_FLOW_BUILDERS:
        return build_image_flow(kind, dim, cfg)
    from training.unet import build_image_velocity_model

    return build_image_velocity_model(kind, dim, cfg)


# Image models need ModelConfig.image_shape (C, H, W); kept apart from MODEL_TYPES, whose
# every entry trains on any (rows, dim) table.
IMAGE_MODEL_TYPES: dict[str, ModelSpec] = {
    "glow_image": ModelSpec("flow", "multi-scale Glow: squeeze, ActNorm, 1x1 conv, coupling",
                            _image),
    "realnvp_image": ModelSpec("flow", "multi-scale RealNVP: checkerboard/channel couplings",
                               _image),
    "ddpm_image": ModelSpec("diffusion", "VP-SDE diffusion with a small U-Net", _image),
    "cfm_image": ModelSpec("flow_matching", "conditional flow matching with a small U-Net",
                           _image),
    "otcfm_image": ModelSpec("flow_matching", "OT-CFM with a small U-Net", _image),
}
ALL_MODEL_TYPES: dict[str, ModelSpec] = MODEL_TYPES | IMAGE_MODEL_TYPES


def is_image_model(kind: str) -> bool:
    return kind in IMAGE_MODEL_TYPES


def family_of(kind: str) -> str:
    return _spec(kind).family


def build_model(kind: str, dim: int, cfg: ModelConfig | None = None) -> nn.Module:
    """Build an untrained model of type ``kind`` for data of dimension ``dim``."""
    return _spec(kind).builder(kind, dim, cfg or ModelConfig())


def _spec(kind: str) -> ModelSpec:
    try:
        return ALL_MODEL_TYPES[kind]
    except KeyError:
        choices = ", ".join(sorted(ALL_MODEL_TYPES))
        raise ValueError(f"unknown model type {kind!r}; choose one of: {choices}") from None
