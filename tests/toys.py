"""Toy data and a tiny fitting loop shared by the diffusion and flow-matching tests."""

from __future__ import annotations

import torch
from torch import Tensor, nn

CENTERS = torch.tensor([[-1.5, 0.0], [1.5, 0.0]])


def mixture(n: int, seed: int) -> Tensor:
    """``(n, 2)`` draws of an equal-weight mixture of two Gaussians (std 0.5)."""
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(CENTERS), (n,), generator=g)
    return CENTERS[which] + 0.5 * torch.randn(n, 2, generator=g)


def fit(model: nn.Module, steps: int, batch: int = 256, seed: int = 0) -> nn.Module:
    """Plain Adam (lr 3e-3, cosine decay) on fresh mixture batches: test scaffolding that
    fits a model's loss, kept apart from ``training.train`` so these tests check the models
    alone (the training loop has its own tests)."""
    g = torch.Generator().manual_seed(seed)
    data = mixture(20_000, seed + 100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=3e-4)
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        loss = model.training_loss(data[idx], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()
