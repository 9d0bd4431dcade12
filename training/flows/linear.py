"""Linear bijections that need no conditioner network: diagonal scaling, ActNorm, LU linear
(Glow's invertible 1x1 convolution for vectors), and fixed permutations.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.flows.base import Transform

__all__ = ["ActNorm", "DiagonalScale", "FrozenLinear", "LULinear", "Permutation"]


class DiagonalScale(Transform):
    """Learned per-feature scaling ``y = x * exp(s)``, NICE's final layer.

    Dinh et al. 2014, "NICE: Non-linear Independent Components Estimation", section 3.3.

    Args:
        dim: number of features; ``s: (dim,)`` starts at zero (identity).

    Example:
        >>> y, ladj = DiagonalScale(3)(torch.randn(8, 3))  # y: (8, 3), ladj: (8,)
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.log_scale.exp(), x.new_zeros(x.shape[0]) + self.log_scale.sum()

    def inverse(self, y: Tensor) -> Tensor:
        return y * (-self.log_scale).exp()


class ActNorm(Transform):
    """Activation normalisation ``y = (x + b) * exp(s)`` with data-dependent initialisation.

    Kingma & Dhariwal 2018, "Glow", section 3.1: on the first batch seen in training mode,
    ``b`` and ``s`` are set so that the batch comes out with zero mean and unit variance.
    The ``initialized`` buffer travels with ``state_dict``, so a reloaded model never
    re-initialises. In eval mode (and in exported graphs) there is no data-dependent branch.

    Args:
        dim: number of features.

    Example:
        >>> norm = ActNorm(3)
        >>> y, ladj = norm(5 + 2 * torch.randn(256, 3))  # first training batch: y ~ N(0, I)
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set ``b = -mean(x)`` and ``s = -log std(x)`` from ``x: (batch, dim)``."""
        std = x.std(0, unbiased=False) if x.shape[0] > 1 else torch.ones_like(x[0])
        self.bias.copy_(-x.mean(0))
        self.log_scale.copy_(-(std + 1e-6).log())
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self.initialize(x.detach())
        y = (x + self.bias) * self.log_scale.exp()
        return y, x.new_zeros(x.shape[0]) + self.log_scale.sum()

    def inverse(self, y: Tensor) -> Tensor:
        return y * (-self.log_scale).exp() - self.bias


class LULinear(Transform):
    """Invertible linear map ``y = x W^T`` with ``W = P L U`` (Glow's LU-decomposed 1x1 conv).

    Kingma & Dhariwal 2018, "Glow", section 3.2. ``P`` is a fixed permutation buffer, ``L``
    is unit lower triangular, ``U`` upper triangular with diagonal ``sign * exp(log_abs_diag)``
    (``sign`` fixed), so ``log |det W| = sum(log_abs_diag)``. ``W`` starts as a random
    rotation. The eager inverse uses triangular solves; ``inverse_weight`` gives ``W^{-1}`` and
    ``frozen`` a solver-free copy for export.

    Args:
        dim: number of features.

    Example:
        >>> lu = LULinear(3)
        >>> y, ladj = lu(torch.randn(8, 3))  # y: (8, 3), ladj: (8,)
        >>> torch.allclose(y @ lu.inverse_weight().T, lu.inverse(y), atol=1e-5)
        True
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        rotation = torch.linalg.qr(torch.randn(dim, dim))[0]
        permutation, lower, upper = torch.linalg.lu(rotation)
        diagonal = upper.diagonal()
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign", diagonal.sign())
        self.lower = nn.Parameter(lower.tril(-1))
        self.upper = nn.Parameter(upper.triu(1))
        self.log_abs_diag = nn.Parameter(diagonal.abs().log())

    def lower_matrix(self) -> Tensor:
        """``L: (dim, dim)``, unit lower triangular."""
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        return self.lower.tril(-1) + eye

    def upper_matrix(self) -> Tensor:
        """``U: (dim, dim)``, upper triangular with diagonal ``sign * exp(log_abs_diag)``."""
        return self.upper.triu(1) + torch.diag(self.sign * self.log_abs_diag.exp())

    def weight(self) -> Tensor:
        """``W = P L U: (dim, dim)``."""
        return self.permutation @ self.lower_matrix() @ self.upper_matrix()

    def inverse_weight(self) -> Tensor:
        """``W^{-1} = U^{-1} L^{-1} P^T: (dim, dim)`` by triangular solves (no ``linalg.inv``)."""
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower_inv = torch.linalg.solve_triangular(
            self.lower_matrix(), eye, upper=False, unitriangular=True
        )
        upper_inv = torch.linalg.solve_triangular(self.upper_matrix(), eye, upper=True)
        return upper_inv @ lower_inv @ self.permutation.T

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ self.weight().T, x.new_zeros(x.shape[0]) + self.log_abs_diag.sum()

    def inverse(self, y: Tensor) -> Tensor:
        # x W^T = y  <=>  (x U^T) L^T = y P, solved right-sided without forming W^{-1}.
        b = y @ self.permutation
        a = torch.linalg.solve_triangular(
            self.lower_matrix().T, b, upper=True, left=False, unitriangular=True
        )
        return torch.linalg.solve_triangular(self.upper_matrix().T, a, upper=False, left=False)

    @torch.no_grad()
    def frozen(self) -> FrozenLinear:
        return FrozenLinear(self.weight(), self.inverse_weight(), self.log_abs_diag.sum())


class FrozenLinear(Transform):
    """A fixed invertible linear map with precomputed inverse: ``LULinear.frozen()``'s result.

    Inference uses only matrix products, so it exports to ONNX without solvers.

    Args:
        weight: ``W: (dim, dim)``.
        inverse_weight: ``W^{-1}: (dim, dim)``.
        log_abs_det: scalar ``log |det W|``.

    Example:
        >>> frozen = LULinear(3).frozen()
        >>> y, ladj = frozen(torch.randn(8, 3))
    """

    def __init__(self, weight: Tensor, inverse_weight: Tensor, log_abs_det: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("inverse_weight", inverse_weight.detach().clone())
        self.register_buffer("log_abs_det", log_abs_det.detach().clone())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ self.weight.T, x.new_zeros(x.shape[0]) + self.log_abs_det

    def inverse(self, y: Tensor) -> Tensor:
        return y @ self.inverse_weight.T


class Permutation(Transform):
    """A fixed feature permutation ``y = x[:, order]`` (volume preserving).

    Args:
        order: a permutation of ``range(dim)``.

    Example:
        >>> y, ladj = Permutation.reverse(3)(torch.randn(8, 3))  # ladj == 0
    """

    def __init__(self, order: Tensor) -> None:
        super().__init__()
        order = torch.as_tensor(order, dtype=torch.long)
        self.register_buffer("order", order)
        self.register_buffer("inverse_order", torch.argsort(order))

    @classmethod
    def reverse(cls, dim: int) -> Permutation:
        """The reversal ``(dim-1, ..., 0)``, used between autoregressive steps."""
        return cls(torch.arange(dim - 1, -1, -1))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.index_select(-1, self.order), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y.index_select(-1, self.inverse_order)

    def frozen(self) -> Transform:
        """The same permutation as a product with a 0/1 matrix, for export.

        ONNX Runtime's CPU Gather along the feature axis loops per row: at 4096 x 30 it took
        2.7 ms against 0.19 ms for the MatMul. The product is exact for finite inputs (one
        term is ``x * 1``, the rest add ``+0``); a non-finite input gives NaN instead of
        passing through, which the runtime's floor treats alike.
        """
        return _MatrixPermutation(self.order)


class _MatrixPermutation(Permutation):
    """:class:`Permutation` as ``x @ P`` with ``P[order[j], j] = 1``."""

    def __init__(self, order: Tensor) -> None:
        super().__init__(order)
        eye = torch.eye(len(self.order))
        self.register_buffer("matrix", eye[:, self.order])  # x @ matrix == x[:, order]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ self.matrix.to(x.dtype), x.new_zeros(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y @ self.matrix.to(y.dtype).T

    def frozen(self) -> Transform:
        return self
