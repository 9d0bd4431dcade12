"""The two abstractions of the flow zoo: a `Transform` (one bijection with its log-det) and a
`Flow` (a composition of transforms over a standard normal base).

Convention (shared by every layer): ``forward`` maps data to noise and returns the log
absolute determinant of its Jacobian; ``inverse`` maps noise back to data. Density
evaluation is therefore ``forward`` and sampling is ``inverse``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from artifact.manifest import Defaults, TimeSpec
from numerics.likelihood import LikelihoodResult, standard_normal_log_prob
from numerics.solvers import Trajectory
from training.graphs import EncodeGraph, ExportGraph, one_pass_graphs, spec

__all__ = ["Compose", "ExactDensity", "Flow", "InverseTransform", "Transform"]


class Transform(nn.Module):
    """A bijection ``y = f(x)`` of ``(batch, dim)`` tensors with a tractable log-det.

    Subclasses implement ``forward(x) -> (y, ladj)`` and ``inverse(y) -> x``, where
    ``ladj: (batch,)`` is ``log |det df/dx|``. They may override ``inverse_and_ladj`` when the
    inverse log-det comes for free, and ``frozen`` when inference can avoid solvers.

    A conditional transform (``conditional = True``: its conditioner also sees a context
    row, as zuko's conditional flows do) takes ``context: (batch, C)`` as a keyword in
    ``forward``, ``inverse`` and ``inverse_and_ladj``; :class:`Compose` hands it only to those.
    """

    conditional: bool = False

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
        self.conditional = transform.conditional

    def forward(self, x: Tensor, **context: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform.inverse_and_ladj(x, **context)

    def inverse(self, y: Tensor, **context: Tensor) -> Tensor:
        return self.transform(y, **context)[0]

    def inverse_and_ladj(self, y: Tensor, **context: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform(y, **context)

    def frozen(self) -> Transform:
        return InverseTransform(self.transform.frozen())


class Compose(Transform):
    """Transforms applied in order (data -> noise): the one composition of bijections.

    ``forward`` adds up the steps' log-dets; ``inverse`` runs the steps' inverses in reverse
    order; ``frozen`` freezes every step.

    Args:
        transforms: the steps, in the data -> noise order.

    Example:
        >>> from training.flows.linear import DiagonalScale
        >>> chain = Compose([DiagonalScale(2), DiagonalScale(2)])
        >>> y, ladj = chain(torch.randn(4, 2))  # y: (4, 2), ladj: (4,)
    """

    def __init__(self, transforms: Iterable[Transform]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ladj = x.new_zeros(x.shape[0])
        for transform in self.transforms:
            x, step_ladj = transform(x, **_given(transform, context))
            ladj = ladj + step_ladj
        return x, ladj

    def inverse(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        for transform in reversed(self.transforms):
            y = transform.inverse(y, **_given(transform, context))
        return y

    def frozen(self) -> Compose:
        return Compose([t.frozen() for t in self.transforms])


def _given(transform: Transform, context: Tensor | None) -> dict[str, Tensor]:
    """``{"context": context}`` for a conditional transform, ``{}`` for any other."""
    return _kw(context) if transform.conditional else {}


def _kw(context: Tensor | None) -> dict[str, Tensor]:
    """``{"context": context}`` when there is one: flows that are never conditional (TarFlow,
    residual, image flows) keep their one-argument signatures."""
    return {} if context is None else {"context": context}


class ExactDensity:
    """What a model with an exact one-pass density shares (flows, mixtures of flows): the
    likelihood interface of every model, and the graphs and manifest fields of the family.

    The host class has ``dim``, ``log_prob(x)``, ``inverse(z)`` and ``frozen()``.
    """

    dim: int

    def log_prob_with_error(self, x: Tensor, method: str | None = None,
                            context: Tensor | None = None,
                            **options: object) -> LikelihoodResult:
        """Exact ``log p(x)`` (``log p(x | context)`` for a conditional flow): ``x: (batch,
        dim)`` -> ``log_prob: (batch,)``, no standard error, one pass (``z`` is ``x``: there is
        no ODE end state). ODE options (``steps``, ``solver``, ``seed``) do not apply."""
        if method not in (None, "exact"):
            raise ValueError(f"a flow's likelihood is exact; method {method!r} does not apply")
        given = {} if context is None else {"context": context}
        return LikelihoodResult(self.log_prob(x, **given), None, 1, x)

    def export_graphs(self) -> dict[str, ExportGraph]:
        """``log_prob`` and ``sample``, on the solver-free inference copy (with a
        ``context`` input when the model is conditional)."""
        return one_pass_graphs(self.frozen(), self.dim, getattr(self, "context_features", 0))

    def time_spec(self) -> TimeSpec | None:
        return None

    def serving_defaults(self) -> Defaults:
        return Defaults()


class Flow(ExactDensity, Compose):
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

    def __init__(self, dim: int, transforms: Iterable[Transform],
                 context_features: int = 0) -> None:
        super().__init__(transforms)
        self.dim = dim
        self.context_features = context_features

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Exact log density ``x: (batch, dim)`` -> ``(batch,)`` in nats; a conditional flow
        takes ``context: (batch, C)`` and answers ``log p(x | context)``."""
        z, ladj = self(x, **_kw(context))
        return standard_normal_log_prob(z) + ladj

    def encode_graphs(self) -> dict[str, ExportGraph]:
        """``encode``: ``u -> z = f(u)``, which a ``latent`` anomaly score needs."""
        return {"encode": ExportGraph(EncodeGraph(self.frozen()), [spec("u", self.dim)],
                                      [spec("z", self.dim)])}

    def sample(self, n: int, generator: torch.Generator | None = None,
               context: Tensor | None = None) -> Tensor:
        """Draw ``n`` samples ``(n, dim)`` (given ``context: (n, C)`` for a conditional flow);
        the same seeded ``generator`` gives the same draw."""
        reference = next(self.parameters())
        z = torch.randn(
            n, self.dim, generator=generator, dtype=reference.dtype, device=reference.device
        )
        return self.inverse(z, **_kw(context))

    def generation(self, z: Tensor, *, frames: int, solver: str = "rk4",
                   steps: int = 32) -> tuple[Trajectory, list[str], str]:
        """Noise ``z: (n, dim)`` to model space layer by layer (``solver`` and ``steps`` do
        not apply): the states after each inverted layer (``times`` 1 -> 0 is the share of
        layers still to invert), a label per state, and what was run."""
        states = [z]
        with torch.no_grad():
            for transform in reversed(self.transforms):
                states.append(transform.inverse(states[-1]))
        layers = len(self.transforms)
        path = Trajectory(np.linspace(1.0, 0.0, layers + 1), torch.stack(states), 1, None)
        labels = [f"layer {i}/{layers} inverted" for i in range(layers + 1)]
        return path, labels, f"inverse pass, {layers} layers, NFE 1"

    def training_loss(self, x: Tensor, generator: torch.Generator | None = None,
                      context: Tensor | None = None) -> Tensor:
        """Mean negative log-likelihood of ``x: (batch, dim)`` (given ``context``;
        ``generator`` is unused)."""
        return -self.log_prob(x, **_kw(context)).mean()

    def validation_loss(self, x: Tensor, generator: torch.Generator | None = None,
                        context: Tensor | None = None) -> Tensor:
        """Mean negative log-likelihood, the same as ``training_loss``."""
        return -self.log_prob(x, **_kw(context)).mean()

    def frozen(self) -> Flow:
        """A copy for inference export whose steps need no linear-algebra solvers.

        Take it after training; it does not follow later parameter updates of ``self``.
        """
        frozen = copy.deepcopy(self)
        frozen.transforms = nn.ModuleList(t.frozen() for t in frozen.transforms)
        return frozen.eval()
