"""``genserve train`` (fit any model of any family) and ``genserve reflow``."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from artifact.families import FAMILIES
from cli.options import add_condition_args, add_model_args, add_progress_arg, add_train_args, pick
from training.auto import AUTO, AUTO_CANDIDATES, fit_auto
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import ModelConfig, TrainConfig, default_train_config
from training.distributed import is_main_process, strip_option, torchrun_command
from training.fit import fit
from training.reflow import reflow_checkpoint
from training.registry import MODEL_TYPES, family_of

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fit a model to a named data set or a file")
    p.add_argument("--model", required=True, metavar="TYPE", help="; ".join(
        f"{k} ({v.family}{', images' if v.image else ''})" for k, v in MODEL_TYPES.items())
        + f"; {AUTO}: train {', '.join(AUTO_CANDIDATES)} with their defaults and keep the best "
        "validation log-likelihood")
    p.add_argument("--budget-s", dest="budget_s", type=float, help=f"--model {AUTO}: wall-clock "
                   "seconds for all candidates together (each stops at its share)")
    p.add_argument("--family", choices=sorted(FAMILIES),
                   help="optional check that --model belongs to this family")
    p.add_argument("--data", required=True, help="named set (see `genserve data --list`) "
                   "or a .npy/.npz/.csv file")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--rows", type=int, help="rows to generate for named toy sets")
    p.add_argument("--data-seed", type=int, default=0, help="seed of generated data sets")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")
    add_progress_arg(p)
    p.add_argument("--distributed", type=int, metavar="N", help="data-parallel training on N "
                   "local processes (torchrun; gloo on CPU, nccl on GPU); --batch-size is global")
    add_model_args(p)
    add_train_args(p)
    add_condition_args(p)
    p.set_defaults(run=train)

    p = sub.add_parser("reflow", help="rectified-flow reflow of a flow-matching checkpoint "
                       "(straighter paths: good samples in 1-2 steps)")
    p.add_argument("checkpoint", help="trained cfm/otcfm/si checkpoint")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--pairs", type=int, default=20000, help="noise/sample pairs (20000)")
    p.add_argument("--pair-steps", type=int, default=32, help="RK4 steps per pair (32)")
    p.add_argument("--u-shape", type=float, default=0.0,
                   help="U-shaped training times p(t) ~ cosh(a(2t-1)), more weight where 1-2 "
                        "step samplers read the field (0 = uniform; docs/BENCHMARKS.md uses 4)")
    add_progress_arg(p)
    add_train_args(p)
    p.set_defaults(run=reflow)


def train(ns: argparse.Namespace) -> int:
    if ns.distributed and ns.distributed > 1 and "WORLD_SIZE" not in os.environ:
        # the same command on N local processes under torchrun, which sets WORLD_SIZE
        cmd = torchrun_command(strip_option(ns.argv, "--distributed"), ns.distributed)
        return subprocess.call(cmd)
    if ns.budget_s is not None and (ns.model != AUTO or ns.budget_s <= 0):
        raise ValueError(f"--budget-s takes seconds > 0 and goes with --model {AUTO}; for one "
                         "model type bound its --steps")
    if ns.model == AUTO and ns.condition is not None:
        raise ValueError(f"--model {AUTO} trains unconditional flows; name one model type "
                         "with --condition")
    kind = AUTO_CANDIDATES[0] if ns.model == AUTO else ns.model
    if ns.family is not None and family_of(kind) != ns.family:
        raise ValueError(f"model {ns.model!r} is a {family_of(kind)} model, not {ns.family}")
    model_fields = pick(ns, ModelConfig.model_fields)
    train_fields = pick(ns, TrainConfig.model_fields) | {"progress": not ns.no_progress}
    data_args = {"rows": ns.rows, "data_seed": ns.data_seed, "split_seed": ns.split_seed}
    if ns.model == AUTO:
        ckpt = fit_auto(ns.data, out=ns.out, budget_s=ns.budget_s, train_fields=train_fields,
                        model_fields=model_fields, **data_args)
    else:
        ckpt = fit(ns.model, ns.data, out=ns.out, model_fields=model_fields,
                   train_cfg=default_train_config(ns.model, **train_fields),
                   condition=ns.condition, label_col=ns.label_col,
                   context_cols=ns.context_cols, **data_args)
    s = ckpt.config.summary
    if not is_main_process():
        return 0
    print(
        f"saved {ns.out}: {ckpt.config.model_type} on {ckpt.config.data.name} "
        f"({ckpt.config.dim}-D), "
        f"best validation loss {s['best_val_loss']:.4f} at step {s['best_step']}, "
        f"{s['train_seconds']:.1f} s",
        file=sys.stderr,
    )
    return 0


def reflow(ns: argparse.Namespace) -> int:
    cfg = TrainConfig(**pick(ns, TrainConfig.model_fields), progress=not ns.no_progress)
    student = reflow_checkpoint(load_checkpoint(ns.checkpoint), ns.pairs, cfg,
                                pair_steps=ns.pair_steps, u_shape=ns.u_shape,
                                teacher_name=str(ns.checkpoint))
    save_checkpoint(student, ns.out)
    print(f"saved {ns.out}: reflowed {student.config.model_type} ({ns.pairs} pairs)",
          file=sys.stderr)
    return 0
