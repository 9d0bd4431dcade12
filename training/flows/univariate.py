"""Element-wise monotone maps ``y_i = tau(x_i; theta_i)`` whose parameters come from a
conditioner: the piece that coupling and autoregressive layers share.

A coupling layer (``coupling.py``) or an autoregressive layer (``autoregressive.py``) decides
*which* inputs produce ``theta``; a univariate map decides *how* ``theta`` moves ``x``.
Swapping one for another is how NICE, RealNVP, MAF and NSF differ (zuko's ``NSF(MAF)``).
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Affine", "Shift", "Univariate"]


class Univariate(nn.Module):
    """Base class of element-wise maps with ``params_per_dim`` parameters per feature.

    Shapes: ``x, y: (batch, n)``, ``params: (batch, n, params_per_dim)``; both directions
    return the transformed tensor and the element-wise log-det ``(batch, n)`` of that
    direction. A zero ``params`` tensor must give the identity (zero-initialised conditioners).
    """

    params_per_dim: int = 0

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class Shift(Univariate):
    """Additive map ``y = x + t`` (volume preserving), NICE's coupling law.

    Dinh et al. 2014, "NICE", eq. 5. ``params[..., 0] = t``.

    Example:
        >>> import torch
        >>> y, ladj = Shift()(torch.zeros(8, 2), torch.ones(8, 2, 1))  # y == 1, ladj == 0
    """

    params_per_dim = 1

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return x + params[..., 0], x.new_zeros(x.shape)

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        return y - params[..., 0], y.new_zeros(y.shape)


class Affine(Univariate):
    """Affine map ``y = x * exp(s) + t`` with a soft-clamped log-scale.

    Dinh et al. 2017, "Density estimation using Real NVP", eq. 6; Papamakarios et al. 2017,
    "Masked Autoregressive Flow", eq. 2. ``params[..., 0] = t``, ``params[..., 1] = u`` and
    ``s = c * tanh(u / c)`` keeps each step's scale within ``exp(+-c)`` for stable training.

    Args:
        log_scale_bound: ``c``, the bound of ``|s|``.

    Example:
        >>> import torch
        >>> y, ladj = Affine()(torch.randn(8, 2), torch.zeros(8, 2, 2))  # identity
    """

    params_per_dim = 2

    def __init__(self, log_scale_bound: float = 3.0) -> None:
        super().__init__()
        self.log_scale_bound = log_scale_bound

    def _shift_and_log_scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = params[..., 0], params[..., 1]
        bound = self.log_scale_bound
        return shift, bound * (raw / bound).tanh()

    def forward(self, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_and_log_scale(params)
        return x * log_scale.exp() + shift, log_scale

    def inverse(self, y: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
        shift, log_scale = self._shift_and_log_scale(params)
        return (y - shift) * (-log_scale).exp(), -log_scale

    def extra_repr(self) -> str:
        return f"log_scale_bound={self.log_scale_bound}"
