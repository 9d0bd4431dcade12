"""An equal-weight mixture of flows: an ensemble whose density is exact and servable.

``p(x) = (1/K) sum_k p_k(x)``, evaluated in log space as ``logsumexp_k log p_k(x) - log K``.
It is a normalised density (it integrates to 1 because each member does), so an ensemble of
flows keeps everything a single flow offers: exact log-likelihoods, anomaly scores that are
negative log-likelihoods in data units, calibrated thresholds and sampling.

Sampling takes the same standard normal noise ``z: (batch, dim)`` as a flow's ``inverse``, so
the exported ``sample`` graph keeps its signature. The member is chosen from the noise
itself: the angle ``theta`` of ``(z_0, z_1)`` is uniform on ``(-pi, pi]`` and independent of
the radius ``r``; ``u = (theta + pi) / 2 pi`` picks member ``floor(K u)``, and the remainder
``K u - floor(K u)``, again uniform and independent of the choice, becomes a fresh angle, so
``r (cos theta', sin theta')`` and ``z_2..`` are standard normal noise for the chosen member
(in float32 the fresh angle keeps about ``24 - log2 K`` bits). At least two columns are
needed. Every member runs on the whole batch and the rows are picked arithmetically, with no
data-dependent control flow, so the graph exports to ONNX as it is.

Example:
    >>> import torch
    >>> from training.config import ModelConfig
    >>> from training.flows import build_flow
    >>> cfg = ModelConfig(hidden_features=16, transforms=2)
    >>> mix = FlowMixture([build_flow("maf", 2, cfg), build_flow("nsf", 2, cfg)])
    >>> mix.log_prob(torch.randn(8, 2)).shape
    torch.Size([8])
    >>> mix.sample(4, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([4, 2])
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from training.flows.base import ExactDensity

__all__ = ["FlowMixture"]


class FlowMixture(ExactDensity, nn.Module):
    """``(1/K) sum_k p_k``: ``members`` are flows over the same ``dim`` in the same space."""

    family = "flow"

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a mixture needs at least 2 members, got {len(members)}")
        dims = {int(m.dim) for m in members}
        if len(dims) != 1:
            raise ValueError(f"mixture members differ in dimension: {sorted(dims)}")
        self.dim = dims.pop()
        if self.dim < 2:
            raise ValueError("a mixture samples its member from two noise columns; it needs "
                             "at least 2 columns")
        self.members = nn.ModuleList(members)

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact ``log p(x)``: ``x: (batch, dim)`` -> ``(batch,)`` in nats."""
        per_member = torch.stack([m.log_prob(x) for m in self.members])
        return torch.logsumexp(per_member, 0) - math.log(len(self.members))

    def choose(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(member index: (batch,) float, fresh noise: (batch, dim))`` from ``z``."""
        k = len(self.members)
        z0, z1 = z[:, 0], z[:, 1]
        r = torch.sqrt(z0 * z0 + z1 * z1)
        # atan2 by the half-angle formula (ONNX has Atan, not Atan2); r + z0 > 0 almost surely
        theta = 2.0 * torch.atan(z1 / torch.clamp(r + z0, min=1e-30))
        u = torch.clamp((theta + math.pi) / (2.0 * math.pi), 0.0, 1.0) * k
        index = torch.clamp(torch.floor(u), 0.0, k - 1.0)
        fresh = 2.0 * math.pi * (u - index) - math.pi
        noise = torch.cat([(r * torch.cos(fresh))[:, None], (r * torch.sin(fresh))[:, None],
                           z[:, 2:]], dim=1)
        return index, noise

    def inverse(self, z: Tensor) -> Tensor:
        """Noise -> data: each row from the member its noise chooses (see the module doc)."""
        index, noise = self.choose(z)
        out = torch.zeros_like(z)
        for k, member in enumerate(self.members):
            out = out + (index == k).to(z.dtype)[:, None] * member.inverse(noise)
        return out

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples ``(n, dim)``; the same seeded ``generator`` gives the same draw."""
        reference = next(itertools.chain(self.parameters(), self.buffers()))
        z = torch.randn(n, self.dim, generator=generator, dtype=reference.dtype,
                        device=reference.device)
        return self.inverse(z)

    def validation_loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean negative log-likelihood."""
        return -self.log_prob(x).mean()

    def frozen(self) -> FlowMixture:
        """The members' solver-free inference copies, as a mixture."""
        return FlowMixture([m.frozen() if hasattr(m, "frozen") else m
                            for m in self.members]).eval()
