"""Argument groups several commands share: the fields of ``ModelConfig`` and ``TrainConfig``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from artifact.conditions import CONDITION_KINDS

__all__ = ["add_condition_args", "add_model_args", "add_progress_arg", "add_train_args",
           "pick"]


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("architecture (fields of ModelConfig; unset = the default)")
    g.add_argument("--hidden", dest="hidden_features", type=int, help="hidden layer width "
                   "(the model type's default: training/config.py)")
    g.add_argument("--layers", dest="hidden_layers", type=int, help="hidden layers per network")
    g.add_argument("--transforms", type=int, help="flows: number of flow steps")
    g.add_argument("--bins", type=int, help="spline flows: bins")
    g.add_argument("--tail-bound", dest="tail_bound", type=float, help="spline interval [-B, B]")
    g.add_argument("--schedule", choices=["linear", "cosine"], help="diffusion noise schedule")
    g.add_argument("--prediction", choices=["epsilon", "v"], help="diffusion target")
    g.add_argument("--sigma-min", dest="sigma_min", type=float, help="flow matching sigma_min")
    g.add_argument("--gamma", type=float, help="stochastic interpolant noise level")
    g.add_argument("--ode-rtol", dest="ode_rtol", type=float, help="ffjord: solver rtol (1e-3)")
    g.add_argument("--ode-atol", dest="ode_atol", type=float, help="ffjord: solver atol (1e-3)")
    g.add_argument("--kinetic-energy", dest="kinetic_energy", type=float,
                   help="ffjord: RNODE kinetic-energy weight (0)")
    g.add_argument("--jacobian-norm", dest="jacobian_norm", type=float,
                   help="ffjord: RNODE Jacobian Frobenius-norm weight (0)")
    g.add_argument("--lipschitz", type=float, help="resflow: Lipschitz coefficient < 1 (0.97)")
    g.add_argument("--fixed-point-iterations", dest="fixed_point_iterations", type=int,
                   help="resflow: unrolled fixed-point iterations of the served inverse (50)")
    g.add_argument("--series-terms", dest="series_terms", type=int,
                   help="resflow above 64 dims: power-series terms of the served log-det (24)")
    g.add_argument("--token-size", dest="token_size", type=int,
                   help="tarflow: values per token, a divisor of the dimension (1)")
    g.add_argument("--patch-size", dest="patch_size", type=int,
                   help="tarflow_image: patch side, a divisor of H and W (2)")
    g.add_argument("--heads", type=int, help="tarflow: attention heads (2)")
    g.add_argument("--noise-std", dest="noise_std", type=float,
                   help="tarflow: training noise level; samples denoised by one score step (0)")
    g.add_argument("--sigma-data", dest="sigma_data", type=float,
                   help="EDM: sigma_data of the preconditioning (0.5)")
    g.add_argument("--edm-data-std", dest="edm_data_std", type=float,
                   help="EDM: std of the rows the model sees (1: standardized)")
    g.add_argument("--edm-sigma-min", dest="edm_sigma_min", type=float,
                   help="EDM: smallest sigma (0.002)")
    g.add_argument("--edm-sigma-max", dest="edm_sigma_max", type=float,
                   help="EDM: largest sigma (3 edm_data_std)")
    g.add_argument("--rho", type=float, help="EDM: sigma steps uniform in sigma^(1/rho) (2)")
    g.add_argument("--p-mean", dest="p_mean", type=float, help="EDM: training ln-sigma mean")
    g.add_argument("--p-std", dest="p_std", type=float, help="EDM: training ln-sigma std")
    g.add_argument("--s-churn", dest="s_churn", type=float, help="EDM stochastic sampler churn")
    g.add_argument("--s-tmin", dest="s_tmin", type=float, help="EDM: lowest churned sigma")
    g.add_argument("--s-tmax", dest="s_tmax", type=float, help="EDM: highest churned sigma")
    g.add_argument("--s-noise", dest="s_noise", type=float, help="EDM: churn noise inflation")
    g.add_argument("--manifold", choices=["sphere", "torus"],
                   help="rfm: rows on the unit sphere, or angles of the torus")
    g.add_argument("--manifold-tolerance", dest="manifold_tolerance", type=float,
                   help="rfm: how far a served row may be off the manifold (1e-4)")
    g.add_argument("--vocab", type=int, help="dfm: token values 0..V-1 (default: the data's)")
    g.add_argument("--source", choices=["mask", "uniform"], help="dfm: source (mask)")


def add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (fields of TrainConfig)")
    g.add_argument("--steps", type=int, help="optimizer steps (default 2000)")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="minibatch rows (256)")
    g.add_argument("--lr", type=float, help="peak learning rate (1e-3; 3e-3 for ddpm, cfm, "
                   "otcfm)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW decay (0)")
    g.add_argument("--warmup", dest="warmup_steps", type=int, help="warmup steps (100)")
    g.add_argument("--grad-clip", dest="grad_clip", type=float, help="max gradient norm (5)")
    g.add_argument("--ema", dest="ema_decay", type=float, help="EMA decay, e.g. 0.999 (off; "
                   "0.999 for ddpm, cfm, otcfm)")
    g.add_argument("--eval-every", dest="eval_every", type=int, help="steps between evals")
    g.add_argument("--patience", type=int, help="evals without improvement before stopping")
    g.add_argument("--seed", type=int, help="seed for initialisation and batches (0)")
    g.add_argument("--threads", type=int, help="torch CPU threads while training (1; 0: every "
                   "core, for large networks on a machine of your own)")
    g.add_argument("--dist-backend", dest="dist_backend", choices=["auto", "gloo", "nccl"],
                   help="data-parallel backend under torchrun (auto: nccl with CUDA, else gloo)")
    g.add_argument("--device", choices=["cpu", "cuda", "auto"],
                   help="one process's device (cpu; auto: CUDA when torch sees it)")
    g.add_argument("--amp", choices=["auto", "off", "bf16"],
                   help="bfloat16 autocast of the loss (auto: on CUDA for diffusion and flow "
                        "matching)")


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (or set TQDM_DISABLE=1)")


def add_condition_args(p: argparse.ArgumentParser) -> None:
    """``--condition label|context``, ``--label-col`` and ``--context-cols``."""
    g = p.add_argument_group("conditional models (artifact/conditions.py)")
    g.add_argument("--condition", choices=CONDITION_KINDS, help="condition on each row's "
                   "label (a named set's or an .npz's own, or --label-col) or context "
                   "(--context-cols)")
    g.add_argument("--label-col", dest="label_col", metavar="C",
                   help="the label's column of a CSV or Parquet file (not a feature)")
    g.add_argument("--context-cols", dest="context_cols", nargs="+", metavar="C",
                   help="the context's columns of a CSV or Parquet file (not features)")
    g.add_argument("--cfg-dropout", dest="cfg_dropout", type=float, metavar="P",
                   help="diffusion, flow matching with --condition label: drop a row's label "
                   "to the null token with probability P in training, so /sample can take "
                   "'guidance' (classifier-free guidance; 0.1-0.2 is usual)")


def pick(ns: argparse.Namespace, fields: Sequence[str]) -> dict[str, Any]:
    """The options of ``ns`` named in ``fields`` that were given on the command line."""
    return {f: getattr(ns, f) for f in fields if getattr(ns, f, None) is not None}
