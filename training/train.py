"""The one training loop, shared by every family (a family supplies only its loss).

AdamW, linear warmup then cosine decay, gradient clipping, optional EMA of the weights,
periodic validation with early stopping, an optional wall-clock limit, and the best
validation state kept. Seeded: the
same config and data give the same weights.

One process trains on ``TrainConfig.device`` (the CPU by default, or a CUDA device), with
the loss's forward pass under bfloat16 autocast where ``TrainConfig.amp`` says so (on CUDA
for models that declare ``amp_safe``: the continuous-time families); validation, the
optimizer and the weights stay float32, and the trained weights come back to the CPU.

Data parallel when started by torchrun (``training.distributed``): each rank trains on its
own slice of the same global batch, DistributedDataParallel averages the gradients, rank 0
validates (and broadcasts) and is the only one with a progress bar. A single process runs
exactly the loop it always ran.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from service.progress import progress_bar
from training.config import TrainConfig
from training.distributed import DistContext, all_reduce_mean, broadcast_float, setup

__all__ = ["TrainResult", "autocast", "batch_indices", "intra_op_threads", "lr_lambda",
           "train_model", "training_device"]


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
    """Multiplier of the base learning rate: linear warmup, then cosine decay to 10 %.

    ``step`` may be fractional: under ``cfg.max_seconds`` the loop passes the step count the
    elapsed time stands for when that is further along, so the decay ends with the budget."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))

    def factor(step: float) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(cfg.steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _spent(cfg: TrainConfig, start: float) -> float:
    """Share of ``cfg.max_seconds`` used since ``start`` (0 without a time limit)."""
    if cfg.max_seconds is None:
        return 0.0
    return (time.perf_counter() - start) / cfg.max_seconds


def training_device(name: str) -> torch.device:
    """The device of a one-process run: ``"cpu"``, ``"cuda"`` (the current CUDA device, or an
    error naming the fix) or ``"auto"`` (CUDA when torch sees it, else the CPU)."""
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if name == "cuda":
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"--device cuda but torch {torch.__version__} ({build}) sees no CUDA "
                         "device; train with --device cpu or auto")
    return torch.device("cpu")


def autocast(amp: str, model: nn.Module,
             device: torch.device) -> contextlib.AbstractContextManager:
    """The context the training loss's forward pass runs in: bfloat16 autocast for
    ``amp="bf16"``, and for ``"auto"`` on CUDA when ``model`` declares ``amp_safe``; else none.
    bfloat16 has float32's exponent range, so no loss scaling is needed."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and getattr(model, "amp_safe", False) else "off"
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def batch_indices(rows: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of one minibatch, drawn with replacement when the set is smaller than a batch."""
    if rows >= batch_size:
        return torch.randperm(rows, generator=generator)[:batch_size]
    return torch.randint(rows, (batch_size,), generator=generator)


class _EMA:
    """Exponential moving average of the weights, its decay warmed up as
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates: without the warm-up the first
    weights keep ``decay^steps`` of the average (37 % after 1000 steps at 0.999)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.shadow = copy.deepcopy(model).eval()
        for p in self.shadow.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        pairs = zip(self.shadow.state_dict().values(), model.state_dict().values(), strict=True)
        for s, p in pairs:
            if s.dtype.is_floating_point:
                s.mul_(decay).add_(p.detach(), alpha=1 - decay)
            else:
                s.copy_(p)


def _context(c: torch.Tensor | None, idx: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """``{"context": c[idx]}`` for a conditional model's rows, ``{}`` for any other."""
    return {} if c is None else {"context": c[idx]}


def _validation_loss(
    model: nn.Module, preprocess: nn.Module, x_val: torch.Tensor, seed: int,
    c_val: torch.Tensor | None = None,
) -> float:
    """Mean validation loss over the whole split, with fixed randomness (comparable evals)."""
    generator = torch.Generator(device=x_val.device).manual_seed(seed + 1)
    total, rows = 0.0, 0
    with torch.no_grad():
        for a in range(0, len(x_val), 4096):
            chunk = x_val[a:a + 4096]
            u, _ = preprocess(chunk)
            loss = model.validation_loss(u, generator, **_context(c_val, slice(a, a + 4096)))
            total += float(loss) * len(chunk)
            rows += len(chunk)
    return total / max(rows, 1)


class _TrainingLoss(nn.Module):
    """``forward`` = the model's ``training_loss``, so DistributedDataParallel can wrap it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, u: torch.Tensor, generator: torch.Generator,
                **context: torch.Tensor) -> torch.Tensor:
        return self.model.training_loss(u, generator, **context)


def _clone(generator: torch.Generator) -> torch.Generator:
    copy_ = torch.Generator(device=generator.device)
    copy_.set_state(generator.get_state())
    return copy_


def _local_batch_size(cfg: TrainConfig, ctx: DistContext) -> int:
    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by the "
                         f"{ctx.world_size} training processes; the global batch is split "
                         "evenly across ranks")
    return cfg.batch_size // ctx.world_size


@torch.no_grad()
def _data_dependent_init(
    model: nn.Module,
    preprocess: nn.Module,
    xt: torch.Tensor,
    batch_size: int,
    index_gen: torch.Generator,
    noise_gen: torch.Generator,
    ct: torch.Tensor | None = None,
) -> None:
    """Run the first global batch once, untrained, before DDP wraps the model.

    Layers that initialise from their first training batch (Glow's ActNorm) then see the
    whole global batch, as in one process, and agree on every rank; the generators are
    copied, so the loop's random streams are untouched.
    """
    model.train()
    preprocess.train()
    idx = batch_indices(len(xt), batch_size, _clone(index_gen)).to(xt.device)
    noise = _clone(noise_gen)
    u, _ = preprocess(xt[idx], generator=noise)
    model.training_loss(u, noise, **_context(ct, idx))


@contextlib.contextmanager
def intra_op_threads(threads: int):
    """torch's CPU threads set to ``threads`` (0: leave torch's default) and restored after.

    The training loop's networks are small: one thread does their matrix products as fast as
    several, and extra threads that busy-wait for cores other processes hold slow training
    down several times on a shared machine (docs/BENCHMARKS.md, "Training threads")."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_model(
    model: nn.Module,
    preprocess: nn.Module,
    x_train: np.ndarray,
    x_val: np.ndarray,
    cfg: TrainConfig,
    *,
    dist_ctx: DistContext | None = None,
    c_train: np.ndarray | None = None,
    c_val: np.ndarray | None = None,
) -> TrainResult:
    """Fit ``model`` in place on preprocessed minibatches; leaves the best weights loaded.

    ``x_train``/``x_val``: ``(rows, dim)`` in data units. ``preprocess`` maps data to model
    space (``forward(x, generator) -> (u, ladj)``); its random part (dequantization) is redrawn
    for every batch from the loop's generator.

    ``dist_ctx``: the process group to train in; by default the one torchrun's environment
    describes (:func:`training.distributed.setup`), or none. ``cfg.batch_size`` is the global
    batch, split evenly across ranks. On return every rank holds the same (best) weights, on
    the CPU.

    ``c_train``/``c_val``: a conditional model's ``context`` rows ``(rows, C)`` beside
    ``x_train``/``x_val`` (``artifact.conditions.context_rows``); minibatches keep each row's.
    """
    with intra_op_threads(cfg.threads):
        return _train(model, preprocess, x_train, x_val, cfg, dist_ctx, c_train, c_val)


def _train(model: nn.Module, preprocess: nn.Module, x_train: np.ndarray, x_val: np.ndarray,
           cfg: TrainConfig, dist_ctx: DistContext | None, c_train: np.ndarray | None,
           c_val: np.ndarray | None) -> TrainResult:
    ctx = dist_ctx if dist_ctx is not None else setup(cfg.dist_backend)
    device = ctx.device if ctx.enabled else training_device(cfg.device)
    moved = device.type != "cpu"
    generator = torch.Generator().manual_seed(cfg.seed)
    index_gen = noise_gen = generator  # one CPU process: one stream, as it always was
    local_batch = cfg.batch_size
    if ctx.enabled or moved:
        # the same global batch on every rank; the model's own noise differs per rank and is
        # drawn on the device (batch indices stay on the CPU stream)
        local_batch = _local_batch_size(cfg, ctx)
        model.to(device)
        preprocess.to(device)
        noise_gen = torch.Generator(device=device).manual_seed(
            cfg.seed + 1_000_003 * (ctx.rank + 1))
    dtype = next(model.parameters()).dtype
    xt = torch.as_tensor(x_train, dtype=dtype, device=device)
    xv = torch.as_tensor(x_val, dtype=dtype, device=device)
    ct, cv = (None if c is None else torch.as_tensor(c, dtype=dtype, device=device)
              for c in (c_train, c_val))
    loss_fn: nn.Module | None = None
    if ctx.enabled:
        _data_dependent_init(model, preprocess, xt, cfg.batch_size, index_gen, noise_gen, ct)
        loss_fn = nn.parallel.DistributedDataParallel(
            _TrainingLoss(model),
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        )

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    factor = lr_lambda(cfg)
    ema = None
    best_state, best_val, best_step, bad_evals = None, math.inf, 0, 0
    history: list[dict[str, float]] = []
    start, step = time.perf_counter(), 0
    bar = progress_bar(total=cfg.steps, disable=not cfg.progress or not ctx.is_main,
                       desc="train")
    stopped_early = False
    preprocess.train()
    for step in range(1, cfg.steps + 1):
        spent = _spent(cfg, start)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * factor(max(step - 1, spent * cfg.steps))
        model.train()
        idx = batch_indices(len(xt), cfg.batch_size, index_gen)
        if loss_fn is None:
            u, _ = preprocess(xt[idx.to(device)], generator=noise_gen)
            with autocast(cfg.amp, model, device):
                loss = model.training_loss(u, noise_gen,
                                           **_context(ct, idx.to(device))).float()
            loss_value = float(loss.detach())
        else:  # this rank's slice of the global batch; the logged loss is the global mean
            mine = idx[ctx.rank * local_batch:(ctx.rank + 1) * local_batch].to(device)
            u, _ = preprocess(xt[mine], generator=noise_gen)
            with autocast(cfg.amp, model, device):
                loss = loss_fn(u, noise_gen, **_context(ct, mine)).float()
            loss_value = all_reduce_mean(float(loss.detach()), ctx)
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
        if cfg.ema_decay is not None:
            ema = ema or _EMA(model, cfg.ema_decay)
            ema.update(model)
        out_of_time = cfg.max_seconds is not None and \
            broadcast_float(float(_spent(cfg, start) >= 1.0), ctx) > 0
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            scored = ema.shadow if ema is not None else model
            scored.eval()
            preprocess.eval()
            val = (_validation_loss(scored, preprocess, xv, cfg.seed, cv) if ctx.is_main
                   else 0.0)
            val = broadcast_float(val, ctx)  # every rank takes rank 0's decisions
            preprocess.train()
            history.append({"step": step, "loss": loss_value, "val_loss": val})
            if val < best_val:
                best_val, best_step, bad_evals = val, step, 0
                best_state = copy.deepcopy(scored.state_dict())
            else:
                bad_evals += 1
            bar.set_postfix(loss=f"{loss_value:.4f}", val=f"{val:.4f}", best=f"{best_val:.4f}")
            if out_of_time or (cfg.patience is not None and bad_evals >= cfg.patience):
                stopped_early = True
                bar.update(1)
                break
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}", best=f"{best_val:.4f}")
        bar.update(1)
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    if ctx.enabled or moved:
        model.to("cpu")
        preprocess.to("cpu")
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
