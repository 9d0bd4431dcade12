"""Typed configuration: one Pydantic model per configured thing.

`ModelConfig` holds every architecture knob of every model type; a builder reads the fields
it needs and ignores the rest, so one JSON shape describes any checkpoint.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["EDM_SIGMA_MAX_PER_DATA_STD", "OWN_RATE_TYPES", "ModelConfig", "PreprocessConfig",
           "TrainConfig", "candidate_lr", "default_model_config", "default_train_config"]

EDM_SIGMA_MAX_PER_DATA_STD = 3.0
"""EDM's default largest sigma in units of the rows' std (``edm_data_std``). Starting the
PF-ODE there from ``N(0, (sigma_max^2 + edm_data_std^2) I)`` treats the data as Gaussian beyond
it: a small likelihood error, against far better few-step samples than the paper's sigma_max 80
(docs/BENCHMARKS.md, "EDM next to DDPM and OT-CFM", has both, with the exact denoiser)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Architecture of one model. Field names are shared across families."""

    hidden_features: int = Field(64, ge=1, le=4096, description="width of hidden layers")
    hidden_layers: int = Field(2, ge=1, le=16, description="hidden layers per network")
    transforms: int = Field(5, ge=1, le=64, description="flow: number of flow steps")
    bins: int = Field(8, ge=2, le=128, description="spline flows: bins per dimension")
    tail_bound: float = Field(5.0, gt=0, description="spline flows: [-B, B] spline interval")
    # diffusion
    # cosine + v: with linear + epsilon the probability-flow ODE samplers land far off the
    # data on small MLPs (docs/BENCHMARKS.md, "Diffusion and flow matching"); DDPM is unhurt.
    schedule: Literal["linear", "cosine"] = "cosine"
    prediction: Literal["epsilon", "v"] = "v"
    beta_min: float = Field(0.1, gt=0)
    beta_max: float = Field(20.0, gt=0)
    t_min: float = Field(1e-3, ge=0, lt=0.5, description="diffusion: smallest time integrated")
    # flow matching
    sigma_min: float = Field(0.0, ge=0, lt=1)
    gamma: float = Field(0.0, ge=0, description="stochastic interpolant noise level")
    time_embedding: int = Field(16, ge=2, le=256, description="Fourier features of t")
    # FFJORD (training/ffjord.py): the adaptive solver trained through, and RNODE weights
    ode_rtol: float = Field(1e-3, gt=0, lt=1, description="ffjord: training solver rtol")
    ode_atol: float = Field(1e-3, gt=0, lt=1, description="ffjord: training solver atol")
    kinetic_energy: float = Field(0.0, ge=0, description="ffjord: weight of int |v|^2 dt")
    jacobian_norm: float = Field(0.0, ge=0, description="ffjord: weight of int |dv/dx|_F^2 dt")
    # residual flows (training/flows/residual.py)
    lipschitz: float = Field(0.9, gt=0, lt=1, description="resflow: Lipschitz coefficient "
                             "of each spectrally normalised layer; must be < 1 to invert")
    fixed_point_iterations: int = Field(50, ge=1, le=1000,
                                        description="resflow: unrolled inverse iterations")
    # Above 64 dims the served log-det is a truncated power series: 24 terms cut it at
    # D L^25 / (25 (1 - L)) nats per block, 4e-3 nats at D = 80 for L = 0.9^3 (the default
    # coefficient over three layers), below Hutchinson's standard error at 8 probes; each
    # term costs one forward-mode product through g.
    series_terms: int = Field(24, ge=1, le=200, description="resflow above 64 dims: "
                              "power-series terms of the served log-det")
    # TarFlow (training/flows/tarflow.py)
    token_size: int = Field(1, ge=1, description="tarflow: values per token (divides dim)")
    patch_size: int = Field(2, ge=1, description="tarflow_image: patch side (divides H, W)")
    heads: int = Field(2, ge=1, le=64, description="tarflow: attention heads")
    noise_std: float = Field(0.0, ge=0, lt=1, description="tarflow: training noise "
                             "(model space); samples are denoised by one score step")
    # EDM (Karras et al. 2022): sigma range, rows' std, preconditioning, rho steps, log-normal
    # training sigmas and the stochastic sampler's churn. sigma_min, sigma_data, P_mean, P_std
    # and the churn are the paper's; sigma_max and rho are not (the paper's 80 and 7 are for
    # images): sigma_max = EDM_SIGMA_MAX_PER_DATA_STD * edm_data_std and rho = 2 put the few
    # steps of an 8-16 NFE Heun sampler where low-dimensional data's trajectories bend.
    # sigma_data = 0.5 is below the standardized rows' std on purpose: at sigma_data = the
    # rows' std the skip connection is the best linear denoiser, F's target has no linear
    # part, and on symmetric data (8gaussians) training sits at F = 0 for most of its steps.
    # The evidence, on bench.suite's tuning half: docs/BENCHMARKS.md, "EDM defaults on the
    # tuning half" (python -m bench.edm_tune).
    edm_sigma_min: float = Field(0.002, gt=0, lt=1, description="EDM: smallest sigma")
    edm_sigma_max: float | None = Field(None, gt=0, le=1e4, description="EDM: largest sigma "
                                        "(None: EDM_SIGMA_MAX_PER_DATA_STD * edm_data_std)")
    edm_data_std: float = Field(1.0, gt=0, description="EDM: std of the rows the model sees "
                                "(1: standardized); the base is N(0, sigma_max^2 + "
                                "edm_data_std^2)")
    sigma_data: float = Field(0.5, gt=0, description="EDM: sigma_data of the preconditioning "
                              "(c_skip, c_out, c_in)")
    rho: float = Field(2.0, gt=0, le=100, description="EDM: sigma steps uniform in sigma^(1/rho)")
    p_mean: float = Field(-1.2, ge=-10, le=10, description="EDM: mean of log sigma in training")
    p_std: float = Field(1.2, gt=0, le=10, description="EDM: std of log sigma in training")
    s_churn: float = Field(0.0, ge=0, description="EDM stochastic sampler: churn")
    s_tmin: float = Field(0.0, ge=0, description="EDM stochastic sampler: lowest churned sigma")
    s_tmax: float | None = Field(None, ge=0, description="EDM stochastic sampler: highest "
                                 "churned sigma (None: no bound)")
    s_noise: float = Field(1.0, gt=0, description="EDM stochastic sampler: noise inflation")
    # Riemannian flow matching: the manifold of the rows, and how far a served row may be off it
    manifold: Literal["sphere", "torus"] | None = Field(
        None, description="rfm: rows on the unit sphere in R^dim, or dim angles of the torus")
    manifold_tolerance: float = Field(1e-4, gt=0, le=0.1,
                                      description="rfm: served rows' distance to the manifold")
    # discrete flow matching
    vocab: int | None = Field(None, ge=2, le=4096, description="dfm: tokens take values "
                              "0..vocab-1 (default: the data's levels)")
    source: Literal["mask", "uniform"] = Field("mask", description="dfm: source of the path")
    # image models (training/flows/image.py, training/unet.py)
    image_shape: tuple[int, int, int] | None = Field(
        None, description="image models: (C, H, W) of one row; dim = C*H*W (C-order)"
    )
    scales: int = Field(2, ge=1, le=6, description="image models: multi-scale levels")
    # conditional models (artifact/conditions.py): 0 is unconditional
    context_features: int = Field(0, ge=0, le=4096, description="conditional models: width "
                                  "of the context every conditioner sees (labels: classes)")
    cfg_dropout: float = Field(0.0, ge=0, lt=1, description="diffusion, flow matching: "
                               "share of training rows whose label is dropped to the null "
                               "token (classifier-free guidance; 0: none)")

    @property
    def edm_sigma_top(self) -> float:
        """EDM's largest sigma: ``edm_sigma_max``, or ``EDM_SIGMA_MAX_PER_DATA_STD *
        edm_data_std`` when that is None."""
        if self.edm_sigma_max is not None:
            return self.edm_sigma_max
        return EDM_SIGMA_MAX_PER_DATA_STD * self.edm_data_std

    @model_validator(mode="after")
    def _edm_ranges(self) -> ModelConfig:
        if not self.edm_sigma_min < self.edm_sigma_top:
            raise ValueError(f"EDM needs edm_sigma_min < edm_sigma_max, got "
                             f"{self.edm_sigma_min} and {self.edm_sigma_top}")
        if self.s_tmax is not None and self.s_tmax < self.s_tmin:
            raise ValueError(f"EDM needs s_tmin <= s_tmax, got {self.s_tmin} and {self.s_tmax}")
        return self


class PreprocessConfig(_Strict):
    """Invertible preprocessing fitted on the training split; its log-det is always counted."""

    standardize: bool = True
    dequantize: bool = Field(False, description="add U(0,1) noise to integer data (train time)")
    levels: int | None = Field(None, ge=2, description="integer data takes values 0..levels-1")
    logit_alpha: float | None = Field(None, gt=0, lt=0.5, description="logit(alpha+(1-2a)u)")


class TrainConfig(_Strict):
    """The one training loop's settings (the same for every family)."""

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float | None = Field(5.0, gt=0)
    ema_decay: float | None = Field(None, gt=0, lt=1)
    eval_every: int = Field(250, ge=1)
    max_seconds: float | None = Field(None, gt=0, description="wall-clock limit of the loop: "
                                      "the learning-rate schedule runs on whichever of steps "
                                      "and seconds is spent first, then training stops")
    patience: int | None = Field(None, ge=1, description="evals without improvement to stop")
    seed: int = Field(0, ge=0)
    progress: bool = True
    threads: int = Field(1, ge=0, le=1024, description="torch CPU threads while training (0: "
                         "torch's default, every core): one is as fast for these networks and "
                         "several times faster when other processes share the cores")
    dist_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="data-parallel backend under torchrun (auto: nccl with CUDA)")
    device: Literal["cpu", "cuda", "auto"] = Field(
        "cpu", description="one process's device (auto: CUDA when torch sees it); under "
        "torchrun the backend decides (nccl: cuda:LOCAL_RANK)")
    amp: Literal["auto", "off", "bf16"] = Field(
        "auto", description="bfloat16 autocast of the training loss's forward pass (auto: on "
        "CUDA for the models that declare it safe, the continuous-time families; off "
        "elsewhere, flows sum log-determinants that need float32)")


# --------------------------------------------------------------------------- defaults
# What `genserve train` uses when nothing is given (issue #30): chosen on the tuning half of
# bench/suite.py only (docs/bench/defaults_tune.json: mean validation gap of nsf / nsf_ar /
# maf 0.34 / 0.31 / 0.40 nats at width 128 against 0.38 / 0.35 / 0.50 at 64; otcfm's mean W2
# excess at 16 NFE 0.00 at 3 x 256 with lr 3e-3 and EMA against 0.36 at 2 x 64), confirmed
# on its other half (docs/BENCHMARKS.md, "Defaults on data nobody tuned for"). A model type
# not named here takes the class defaults above.

_FLOW = {"hidden_features": 128, "hidden_layers": 2, "transforms": 5}
_FIELD = {"hidden_features": 256, "hidden_layers": 3}
_FIELD_TRAIN = {"lr": 3e-3, "ema_decay": 0.999}
# edm takes the same network and schedule (bench.edm_tune, "The network and schedule")
# resflow: the flows' network with a Lipschitz coefficient of 0.97 and lr 4e-2 (its
# spectrally normalised blocks learn slowly at 1e-3: mean validation gap 0.16 nats against
# 1.37 at lr 1e-3 and coefficient 0.9, docs/bench/defaults_tune_resflow.json)
_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "nsf": _FLOW, "nsf_ar": _FLOW, "maf": _FLOW, "resflow": _FLOW | {"lipschitz": 0.97},
    "ddpm": _FIELD, "cfm": _FIELD, "otcfm": _FIELD, "edm": _FIELD,
}
# ffjord: its class network (64 x 2) at lr 1e-2 (mean validation gap 0.17 nats against 0.68
# at 1e-3, docs/bench/defaults_tune_ffjord*.json; not run on the confirmation half)
_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "resflow": {"lr": 4e-2}, "ffjord": {"lr": 1e-2},
    "ddpm": _FIELD_TRAIN, "cfm": _FIELD_TRAIN, "otcfm": _FIELD_TRAIN, "edm": _FIELD_TRAIN,
}


def default_model_config(model_type: str, dim: int, **given: Any) -> ModelConfig:
    """The default architecture of ``model_type`` on ``dim``-D rows, ``given`` fields on top.

    Widths are a rule of the dimension: at least the tuned width, and at least ``4 dim`` so
    that an autoregressive network has room for every input it conditions on."""
    fields = dict(_MODEL_DEFAULTS.get(model_type, {}))
    if "hidden_features" in fields:
        fields["hidden_features"] = min(max(fields["hidden_features"], 4 * dim), 1024)
    return ModelConfig(**(fields | given))


def default_train_config(model_type: str, **given: Any) -> TrainConfig:
    """The default training schedule of ``model_type``, ``given`` fields on top."""
    return TrainConfig(**(_TRAIN_DEFAULTS.get(model_type, {}) | given))


# Model types that start training at a near-stationary point (residual blocks at the
# identity, so the flow is the rows' Gaussian fit; FFJORD's near-zero velocity) and hardly
# leave it at the flows' rate of 1e-3 (bench.resflow_ablation, bench.ffjord_rate). A trainer
# that sets one rate for all its candidates (fit-anomaly's plans) gives these their own.
OWN_RATE_TYPES = ("resflow", "ffjord")


def candidate_lr(model_type: str, shared_lr: float) -> float:
    """The rate ``model_type`` trains at where its trainer sets ``shared_lr`` for every
    candidate: its own default rate for :data:`OWN_RATE_TYPES`, ``shared_lr`` otherwise."""
    return default_train_config(model_type).lr if model_type in OWN_RATE_TYPES else shared_lr
