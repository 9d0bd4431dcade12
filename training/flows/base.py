"""The two abstractions of the flow zoo: a `Transform` (one bijection with its log-det) and a
`Flow` (a composition of transforms over a standard normal base).

Convention (shared by every layer): ``forward`` maps data to noise and returns the log
absolute determinant of its Jacobian; ``inverse`` maps noise back to data. Density
evaluation is therefore ``forward`` and sampling is ``inverse``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["Flow", "InverseTransform", "Transform", "standard_normal_log_prob"]


class Transform(nn.Module):
    """A bijection ``y = f(x)`` of ``(batch, dim)`` tensors with a tractable log-det.

    Subclasses implement ``forward(x) -> (y, ladj)`` and ``inverse(y) -> x``, where
    ``ladj: (batch,)`` is ``log |det df/dx|``. They may override ``inverse_and_ladj`` when the
    inverse log-det comes for free, and ``frozen`` when inference can avoid solvers.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x: (batch, dim)`` -> ``(y: (batch, dim), ladj: (batch,))``."""
        raise NotImplementedError

    def inverse(self, y: Tensor) -> Tensor:
        """``y: (batch, dim)`` -> ``x: (batch, dim)`` with ``forward(x)[0] == y``."""
        raise NotImplementedError

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``y`` -> ``(x, log |det dx/dy|)``; the default runs ``forward`` once more."""
        x = self.inverse(y)
        return x, -self.forward(x)[1]

    def frozen(self) -> Transform:
        """An equivalent transform for inference export (no linear-algebra solvers).

        The default is the transform itself; layers whose inverse needs a solver (LU linear)
        return a copy with precomputed matrices, valid until their parameters change.
        """
        return self


class InverseTransform(Transform):
    """The inverse ``f^{-1}`` of a transform ``f``: swaps its two directions.

    Used to build IAF from MAF (Kingma et al. 2016, "Improved Variational Inference with
    Inverse Autoregressive Flow"): the one-pass direction becomes the sampling direction.

    Args:
        transform: the transform ``f`` to invert.

    Example:
        >>> from training.flows.linear import DiagonalScale
        >>> t = InverseTransform(DiagonalScale(3))
        >>> y, ladj = t(torch.randn(8, 3))  # y: (8, 3), ladj: (8,)
    """

    def __init__(self, transform: Transform) -> None:
        super().__init__()
        self.transform = transform

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform.inverse_and_ladj(x)

    def inverse(self, y: Tensor) -> Tensor:
        return self.transform(y)[0]

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform(y)

    def frozen(self) -> Transform:
        return InverseTransform(self.transform.frozen())


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Log density of ``N(0, I)``: ``z: (batch, dim)`` -> ``(batch,)``."""
    return -0.5 * z.square().sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


class Flow(nn.Module):
    """A normalizing flow: transforms composed over a standard normal base distribution.

    ``log p(x) = log N(z; 0, I) + sum_i log |det J_i|`` with ``z = f_K(...f_1(x))``
    (Rezende & Mohamed 2015; Papamakarios et al. 2021, "Normalizing Flows for Probabilistic
    Modeling and Inference", eq. 3).

    Args:
        dim: number of features ``D``.
        transforms: the steps, in the data -> noise order.

    Example:
        >>> from training.flows.linear import DiagonalScale
        >>> flow = Flow(2, [DiagonalScale(2)])
        >>> flow.log_prob(torch.randn(8, 2)).shape
        torch.Size([8])
        >>> flow.sample(4, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([4, 2])
    """

    family = "flow"

    def __init__(self, dim: int, transforms: Iterable[Transform]) -> None:
        super().__init__()
        self.dim = dim
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Data -> noise: ``x: (batch, dim)`` -> ``(z: (batch, dim), ladj: (batch,))``."""
        ladj = x.new_zeros(x.shape[:-1])
        for transform in self.transforms:
            x, step_ladj = transform(x)
            ladj = ladj + step_ladj
        return x, ladj

    def inverse(self, z: Tensor) -> Tensor:
        """Noise -> data: ``z: (batch, dim)`` -> ``x: (batch, dim)``."""
        for transform in reversed(self.transforms):
            z = transform.inverse(z)
        return z

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log density ``x: (batch, dim)`` -> ``(batch,)`` in nats."""
        z, ladj = self(x)
        return standard_normal_log_prob(z) + ladj

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples ``(n, dim)``; the same seeded ``generator`` gives the same draw."""
        reference = next(self.parameters())
        z = torch.randn(
            n, self.dim, generator=generator, dtype=reference.dtype, device=reference.device
        )
        return self.inverse(z)

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean negative log-likelihood of ``x: (batch, dim)`` (``generator`` is unused)."""
        return -self.log_prob(x).mean()

    def validation_loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean negative log-likelihood, the same as ``training_loss``."""
        return -self.log_prob(x).mean()

    def frozen(self) -> Flow:
        """A copy for inference export whose steps need no linear-algebra solvers.

        Take it after training; it does not follow later parameter updates of ``self``.
        """
        frozen = copy.deepcopy(self)
        frozen.transforms = nn.ModuleList(t.frozen() for t in frozen.transforms)
        return frozen.eval()
