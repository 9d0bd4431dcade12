"""Conditioner networks of the flow zoo: a plain MLP (coupling) and MADE (autoregressive).

Both zero-initialise their output layer, so every flow built from them starts as the
identity map and its first gradients are those of a standard normal model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MADE", "MLP", "MaskedLinear"]


class MLP(nn.Sequential):
    """A ReLU multi-layer perceptron whose last layer starts at zero.

    Args:
        in_features: input width.
        out_features: output width.
        hidden_features: width of each hidden layer.
        hidden_layers: number of hidden layers (>= 1).

    Shapes: ``x: (batch, in_features)`` -> ``(batch, out_features)``.

    Example:
        >>> net = MLP(2, 6, hidden_features=32, hidden_layers=2)
        >>> net(torch.randn(8, 2)).shape
        torch.Size([8, 6])
    """

    def __init__(
        self, in_features: int, out_features: int, hidden_features: int, hidden_layers: int
    ) -> None:
        widths = [in_features] + [hidden_features] * hidden_layers
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        output = nn.Linear(widths[-1], out_features)
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)
        super().__init__(*layers, output)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 ``mask: (out, in)`` buffer.

    Example:
        >>> layer = MaskedLinear(torch.tril(torch.ones(3, 3)))
        >>> layer(torch.randn(8, 3)).shape
        torch.Size([8, 3])
    """

    def __init__(self, mask: Tensor) -> None:
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al. 2015, "MADE").

    Output ``(d, k)`` depends only on inputs that come strictly before ``d`` in ``order``, so
    the Jacobian of the parameters with respect to the inputs is strictly triangular.
    Hidden unit degrees are assigned cyclically (deterministic, no random masks).

    Args:
        dim: number of features ``D``.
        params_per_dim: ``K`` parameters emitted per feature.
        hidden_features: width of each hidden layer.
        hidden_layers: number of hidden layers (>= 1).
        order: a permutation of ``range(D)``, the autoregressive order (default identity).
        context_features: ``C`` context inputs every output may depend on (zuko's
            conditional MADE): degree 0, seen by every hidden unit; hidden degrees then start
            at 0, so the first feature's parameters depend on the context alone.

    Shapes: ``x: (batch, D)`` (and ``context: (batch, C)``) -> ``(batch, D, K)``.

    Example:
        >>> made = MADE(3, 2, hidden_features=16, hidden_layers=2)
        >>> made(torch.randn(8, 3)).shape
        torch.Size([8, 3, 2])
    """

    def __init__(
        self,
        dim: int,
        params_per_dim: int,
        hidden_features: int,
        hidden_layers: int,
        order: Tensor | None = None,
        context_features: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.params_per_dim = params_per_dim
        order = torch.arange(dim) if order is None else torch.as_tensor(order)
        input_degrees = order + 1
        if context_features:
            hidden_degrees = torch.arange(hidden_features) % dim
            degrees = torch.cat([input_degrees, torch.zeros(context_features, dtype=torch.long)])
        else:
            hidden_degrees = torch.arange(hidden_features) % max(dim - 1, 1) + 1
            degrees = input_degrees
        layers: list[nn.Module] = []
        for _ in range(hidden_layers):
            mask = hidden_degrees[:, None] >= degrees[None, :]
            layers += [MaskedLinear(mask), nn.ReLU()]
            degrees = hidden_degrees
        output_degrees = input_degrees.repeat_interleave(params_per_dim)
        output = MaskedLinear(output_degrees[:, None] > degrees[None, :])
        nn.init.zeros_(output.weight)
        nn.init.zeros_(output.bias)
        self.network = nn.Sequential(*layers, output)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if context is not None:
            x = torch.cat([x, context], dim=-1)
        return self.network(x).unflatten(-1, (self.dim, self.params_per_dim))
