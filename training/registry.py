"""The one registry of model types: name -> family, summary and builder.

Every model, whatever its family, is an ``nn.Module`` with:

* ``family: str`` (a family of ``artifact.families``) and ``dim: int``;
* ``training_loss(x, generator) -> Tensor`` -- scalar loss on a batch ``x: (batch, dim)`` in
  model space (after preprocessing); ``generator`` is a ``torch.Generator`` or ``None``;
* ``validation_loss(x, generator) -> Tensor`` -- scalar; flows return the mean NLL;
* ``sample(n, generator=None, **options) -> Tensor`` -- ``(n, dim)`` in model space;
* ``log_prob_with_error(x, **options) -> numerics.likelihood.LikelihoodResult`` and
  ``log_prob(x, **options) -> Tensor`` -- ``(batch,)`` in model space;
* ``export_graphs() -> dict[name, ExportGraph]`` -- the tensor-in/tensor-out graphs its
  family serves (``training.export``), ``time_spec()`` and ``serving_defaults()`` -- the
  manifest fields its family needs.

A new model type is one :func:`register_model_type` call (a new family also registers its
vocabulary in ``artifact.families`` and a runtime in ``service.runtime``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from training.config import ModelConfig
from training.dfm import build_dfm
from training.diffusion import build_ddpm
from training.edm import build_edm
from training.ffjord import build_ffjord
from training.flow_matching import build_cfm, build_otcfm, build_si
from training.flows import (
    build_glow,
    build_iaf,
    build_maf,
    build_nice,
    build_nsf,
    build_nsf_ar,
    build_realnvp,
)
from training.flows.image import build_glow_image, build_realnvp_image
from training.flows.residual import build_resflow
from training.flows.tarflow import build_tarflow, build_tarflow_image
from training.rfm import build_rfm
from training.unet import build_cfm_image, build_ddpm_image, build_otcfm_image

__all__ = ["MODEL_TYPES", "ModelType", "build_model", "family_of", "is_image_model",
           "register_model_type", "trains_raw"]


@dataclass(frozen=True)
class ModelType:
    """A registered model type.

    Attributes:
        family: its family (``artifact.families``).
        summary: one line for ``--help``.
        build: ``(dim, ModelConfig) -> nn.Module``, an untrained model.
        image: it needs ``ModelConfig.image_shape`` (C, H, W); other types train on any
            ``(rows, dim)`` table.
        raw: it trains on the rows as they are, with no preprocessing (manifold rows).
        conditional: it can be conditioned on a label or a context
            (``ModelConfig.context_features``).
    """

    family: str
    summary: str
    build: Callable[[int, ModelConfig], nn.Module]
    image: bool = False
    raw: bool = False
    conditional: bool = False


def trains_raw(kind: str) -> bool:
    """Whether ``kind`` trains on rows as they are (no standardization): rows on a manifold
    or integer tokens, whose values mean what they are."""
    return _spec(kind).raw


def _conditional_flow(summary: str, build: Callable[[int, ModelConfig], nn.Module]
                      ) -> ModelType:
    """A flow whose conditioners can also see a label or a context."""
    return ModelType("flow", summary, build, conditional=True)


MODEL_TYPES: dict[str, ModelType] = {
    "nice": _conditional_flow("NICE: additive coupling + diagonal scale", build_nice),
    "realnvp": _conditional_flow("RealNVP: affine coupling, alternating masks", build_realnvp),
    "glow": _conditional_flow("Glow step: ActNorm + LU linear + affine coupling", build_glow),
    "maf": _conditional_flow("MAF: masked autoregressive affine (MADE)", build_maf),
    "iaf": _conditional_flow("IAF: inverse autoregressive affine (MADE)", build_iaf),
    "nsf": _conditional_flow("NSF: rational-quadratic spline coupling", build_nsf),
    "nsf_ar": _conditional_flow("NSF: rational-quadratic spline, autoregressive",
                                build_nsf_ar),
    "resflow": ModelType("flow", "residual flow: x + g(x), Lip(g) < 1; served log-det "
                         "exact to 64 dims, a cut series with Hutchinson's traces above",
                         build_resflow, conditional=True),
    "tarflow": ModelType("flow", "TarFlow: causal-transformer autoregressive flow over tokens",
                         build_tarflow, conditional=True),
    "ddpm": ModelType("diffusion", "VP-SDE diffusion (epsilon or v prediction)", build_ddpm,
                      conditional=True),
    "edm": ModelType("edm", "EDM: preconditioned denoiser, sigma steps, Heun sampler",
                     build_edm, conditional=True),
    "rfm": ModelType("rfm", "Riemannian flow matching on the sphere or the torus", build_rfm,
                     raw=True, conditional=True),
    "dfm": ModelType("dfm", "discrete flow matching over integer tokens (masked or uniform "
                     "source)", build_dfm, raw=True, conditional=True),
    "cfm": ModelType("flow_matching", "conditional flow matching, linear path", build_cfm,
                     conditional=True),
    "otcfm": ModelType("flow_matching", "CFM with minibatch exact OT pairs", build_otcfm,
                       conditional=True),
    "si": ModelType("flow_matching", "stochastic interpolant (noise gamma)", build_si,
                    conditional=True),
    # served as flow matching (the same velocity graphs and ODE runtime); trained by ML
    "ffjord": ModelType("flow_matching", "FFJORD: CNF by maximum likelihood through the ODE",
                        build_ffjord, conditional=True),
    "glow_image": ModelType("flow", "multi-scale Glow: squeeze, ActNorm, 1x1 conv, coupling",
                            build_glow_image, image=True, conditional=True),
    "realnvp_image": ModelType("flow", "multi-scale RealNVP: checkerboard/channel couplings",
                               build_realnvp_image, image=True, conditional=True),
    "tarflow_image": ModelType("flow", "TarFlow over image patches (causal transformer)",
                               build_tarflow_image, image=True, conditional=True),
    "ddpm_image": ModelType("diffusion", "VP-SDE diffusion with a small U-Net",
                            build_ddpm_image, image=True, conditional=True),
    "cfm_image": ModelType("flow_matching", "conditional flow matching with a small U-Net",
                           build_cfm_image, image=True, conditional=True),
    "otcfm_image": ModelType("flow_matching", "OT-CFM with a small U-Net", build_otcfm_image,
                             image=True, conditional=True),
}


def register_model_type(name: str, spec: ModelType) -> ModelType:
    """Add a model type (idempotent for an equal spec)."""
    known = MODEL_TYPES.get(name)
    if known is not None and known != spec:
        raise ValueError(f"model type {name!r} is already registered differently")
    MODEL_TYPES[name] = spec
    return spec


def is_image_model(kind: str) -> bool:
    return _spec(kind).image


def family_of(kind: str) -> str:
    return _spec(kind).family


def build_model(kind: str, dim: int, cfg: ModelConfig | None = None) -> nn.Module:
    """Build an untrained model of type ``kind`` for data of dimension ``dim``."""
    spec = _spec(kind)
    cfg = cfg or ModelConfig()
    if dim < 1:
        raise ValueError(f"a model needs dim >= 1 features, got dim={dim}")
    if cfg.context_features and not spec.conditional:
        kinds = ", ".join(k for k, t in MODEL_TYPES.items() if t.conditional)
        raise ValueError(f"{kind!r} cannot be conditioned on a label or context; conditional "
                         f"model types: {kinds}")
    return spec.build(dim, cfg)


def _spec(kind: str) -> ModelType:
    try:
        return MODEL_TYPES[kind]
    except KeyError:
        choices = ", ".join(MODEL_TYPES)
        raise ValueError(f"unknown model type {kind!r}; choose one of: {choices}") from None
