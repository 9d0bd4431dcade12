"""A model family defined outside genserve, as a plug-in: a diagonal Gaussian.

Everything a family contributes, and nothing else: its vocabulary (graphs ``log_prob`` and
``sample``, one-pass sampling), one model type in the training registry, whose model names
its graphs and manifest fields, and one runtime class registered under the family's name.
The service imports it with ``GENSERVE_PLUGINS=toy_family``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from artifact.families import FamilySpec, register_family
from numerics.likelihood import standard_normal_log_prob
from service.runtime.base import register_runtime
from service.runtime.flow import FlowRuntime
from training.config import ModelConfig
from training.flows.base import ExactDensity
from training.registry import ModelType, register_model_type

FAMILY = "diagonal_gaussian"
MODEL_TYPE = "diag_gauss"

register_family(FamilySpec(FAMILY, graphs=("log_prob", "sample"), sample_solvers=("exact",)))


class DiagonalGaussian(ExactDensity, nn.Module):
    """``N(mean, diag(exp(2 log_std)))`` over ``dim`` features, fitted by maximum likelihood."""

    family = FAMILY

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mean = nn.Parameter(torch.zeros(dim))
        self.log_std = nn.Parameter(torch.zeros(dim))

    def log_prob(self, x: Tensor) -> Tensor:
        z = (x - self.mean) * torch.exp(-self.log_std)
        return standard_normal_log_prob(z) - self.log_std.sum()

    def inverse(self, z: Tensor) -> Tensor:
        return self.mean + torch.exp(self.log_std) * z

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.dim, generator=generator, dtype=self.mean.dtype)
        return self.inverse(z)

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return -self.log_prob(x).mean()

    validation_loss = training_loss

    def frozen(self) -> DiagonalGaussian:
        return self


def _build(dim: int, cfg: ModelConfig) -> DiagonalGaussian:
    return DiagonalGaussian(dim)


register_model_type(MODEL_TYPE, ModelType(FAMILY, "a diagonal Gaussian (test plug-in)", _build))


@register_runtime(FAMILY)
class DiagonalGaussianRuntime(FlowRuntime):
    """Served like every one-pass family: the ``sample`` and ``log_prob`` graphs."""
