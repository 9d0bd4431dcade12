"""Rectified-flow reflow (Liu et al. 2023, "Flow Straight and Fast"): a flow-matching model
fine-tuned on noise/sample pairs drawn from itself, so its paths straighten and one or two
Euler steps sample well. Training runs through the project's one loop with a
``ReflowMatcher``; ``genserve reflow``, the report and the families benchmark reflow through
:func:`reflow_checkpoint`.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from training.checkpoint import Checkpoint
from training.config import TrainConfig
from training.flow_matching import FlowMatchingModel, ReflowMatcher
from training.nets import VelocityModel
from training.train import train_model

__all__ = ["make_reflow_pairs", "reflow", "reflow_checkpoint"]


def make_reflow_pairs(
    model: VelocityModel,
    n: int,
    generator: torch.Generator | None = None,
    steps: int | None = 32,
    solver: str = "rk4",
) -> tuple[Tensor, Tensor]:
    """Noise ``z: (n, dim)`` and the trained model's ODE image ``x: (n, dim)`` of it."""
    z = model.noise(n, generator)
    return z, model.transport(z, steps=steps, solver=solver)


def reflow(
    model: FlowMatchingModel,
    n_pairs: int,
    cfg: TrainConfig,
    *,
    pair_steps: int | None = 32,
    pair_solver: str = "rk4",
    u_shape: float = 0.0,
) -> FlowMatchingModel:
    """One round of rectified-flow reflow (Liu et al. 2023): a copy of ``model`` fine-tuned on
    ``n_pairs`` noise/sample pairs drawn from ``model`` itself; ``model`` is left untouched.

    Training runs through the project's one loop (``training.train.train_model``) with a
    :class:`ReflowMatcher`; the pairs live in model space, so preprocessing is the identity.
    Example: ``student = reflow(teacher, 20000, TrainConfig(steps=2000))``.
    """
    generator = torch.Generator().manual_seed(cfg.seed + 7919)
    with torch.no_grad():
        z, x = make_reflow_pairs(model, n_pairs, generator, steps=pair_steps, solver=pair_solver)
    student = copy.deepcopy(model)
    student.matcher = ReflowMatcher(z, x, u_shape=u_shape)
    held_out = max(1, n_pairs // 10)
    data = x.detach().double().numpy()
    train_model(student, _Identity(), data[held_out:], data[:held_out], cfg)
    return student.eval()


def reflow_checkpoint(
    teacher: Checkpoint,
    n_pairs: int,
    cfg: TrainConfig,
    *,
    pair_steps: int | None = 32,
    pair_solver: str = "rk4",
    u_shape: float = 0.0,
    teacher_name: str | None = None,
) -> Checkpoint:
    """One reflow round of a flow-matching ``training.checkpoint.Checkpoint``, as a checkpoint:
    the student, the teacher's preprocessing, and a config whose summary records the round
    (teacher, pairs, pair solver and steps, time law). ``genserve reflow``, the report and the
    families benchmark all reflow through here."""
    if not isinstance(teacher.model, FlowMatchingModel):
        raise ValueError(f"reflow needs a flow-matching checkpoint; "
                         f"{teacher_name or 'this'} is a {teacher.config.family} model")
    student = reflow(teacher.model, n_pairs, cfg, pair_steps=pair_steps,
                     pair_solver=pair_solver, u_shape=u_shape)
    config = teacher.config.model_copy(deep=True)
    config.train = cfg
    config.summary = {"reflow": {"teacher": teacher_name or teacher.config.model_type,
                                 "rounds": 1, "pairs": n_pairs, "pair_steps": pair_steps,
                                 "pair_solver": pair_solver, "u_shape": u_shape}}
    return Checkpoint(student, teacher.preprocessor, config)


class _Identity(nn.Module):
    """Preprocessing for data already in model space."""

    def forward(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        return x, x.new_zeros(len(x))

    def inverse(self, u: Tensor) -> Tensor:
        return u
