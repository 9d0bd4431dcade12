"""The one training loop, shared by every family (a family supplies only its loss).

AdamW, linear warmup then cosine decay, gradient clipping, optional EMA of the weights,
periodic validation with early stopping, and the best validation state kept. Seeded: the
same config and data give the same weights.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from training.config import TrainConfig

__all__ = ["TrainResult", "batch_indices", "lr_lambda", "train_model"]


@dataclass
class TrainResult:
    steps: int
    best_step: int
    best_val_loss: float
    seconds: float
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "best_step": self.best_step,
            "best_val_loss": self.best_val_loss,
            "train_seconds": round(self.seconds, 3),
            "stopped_early": self.stopped_early,
        }


def lr_lambda(cfg: TrainConfig) -> Any:
    """Multiplier of the base learning rate: linear warmup, then cosine decay to 10 %."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(cfg.steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def batch_indices(rows: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of one minibatch, drawn with replacement when the set is smaller than a batch."""
    if rows >= batch_size:
        return torch.randperm(rows, generator=generator)[:batch_size]
    return torch.randint(rows, (batch_size,), generator=generator)


class _EMA:
    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = zip(self.shadow.state_dict().values(), model.state_dict().values(), strict=True)
        for s, p in pairs:
            if s.dtype.is_floating_point:
                s.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)
            else:
                s.copy_(p)


def _validation_loss(
    model: nn.Module, preprocess: nn.Module, x_val: torch.Tensor, seed: int
) -> float:
    """Mean validation loss over the whole split, with fixed randomness (comparable evals)."""
    generator = torch.Generator().manual_seed(seed + 1)
    total, rows = 0.0, 0
    with torch.no_grad():
        for chunk in torch.split(x_val, 4096):
            u, _ = preprocess(chunk)
            total += float(model.validation_loss(u, generator)) * len(chunk)
            rows += len(chunk)
    return total / max(rows, 1)


def train_model(
    model: nn.Module,
    preprocess: nn.Module,
    x_train: np.ndarray,
    x_val: np.ndarray,
    cfg: TrainConfig,
) -> TrainResult:
    """Fit ``model`` in place on preprocessed minibatches; leaves the best weights loaded.

    ``x_train``/``x_val``: ``(rows, dim)`` in data units. ``preprocess`` maps data to model
    space (``forward(x, generator) -> (u, ladj)``); its random part (dequantization) is redrawn
    for every batch from the loop's generator.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(cfg.seed)
    dtype = next(model.parameters()).dtype
    xt = torch.as_tensor(x_train, dtype=dtype)
    xv = torch.as_tensor(x_val, dtype=dtype)

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    ema = None
    best_state, best_val, best_step, bad_evals = None, math.inf, 0, 0
    history: list[dict[str, float]] = []
    start, step = time.perf_counter(), 0
    bar = tqdm(total=cfg.steps, disable=not cfg.progress, desc="train", dynamic_ncols=True)
    stopped_early = False
    preprocess.train()
    for step in range(1, cfg.steps + 1):
        model.train()
        idx = batch_indices(len(xt), cfg.batch_size, generator)
        u, _ = preprocess(xt[idx], generator=generator)
        loss = model.training_loss(u, generator)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(
                f"training loss became {loss_value} at step {step}; lower --lr "
                f"(now {cfg.lr}) or enable gradient clipping"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if cfg.ema_decay is not None:
            ema = ema or _EMA(model, cfg.ema_decay)
            ema.update(model)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            scored = ema.shadow if ema is not None else model
            scored.eval()
            preprocess.eval()
            val = _validation_loss(scored, preprocess, xv, cfg.seed)
            preprocess.train()
            history.append({"step": step, "loss": loss_value, "val_loss": val})
            if val < best_val:
                best_val, best_step, bad_evals = val, step, 0
                best_state = copy.deepcopy(scored.state_dict())
            else:
                bad_evals += 1
            bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{val:.4f}", best=f"{best_val:.4f}")
            if cfg.patience is not None and bad_evals >= cfg.patience:
                stopped_early = True
                bar.update(1)
                break
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}", best=f"{best_val:.4f}")
        bar.update(1)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    preprocess.eval()
    return TrainResult(
        steps=step,
        best_step=best_step,
        best_val_loss=best_val,
        seconds=time.perf_counter() - start,
        stopped_early=stopped_early,
        history=history,
    )
