"""The served graphs: thin tensor-in/tensor-out wrappers around a trained model.

No ``Distribution`` objects, no autograd, no data-dependent branching: each wrapper calls one
method of the model, and noise is an input (seeded by the runtime). A model names its
family's graphs in ``export_graphs()``; :func:`spec` builds the tensor specs the manifest
records (batch axis dynamic). I/O names avoid the exporter's internal value names (e.g.
``div``, ``t``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from artifact.manifest import TensorSpec

__all__ = [
    "ConditionalLogProbGraph",
    "ConditionalSampleGraph",
    "ConditionalVelocityDivGraph",
    "ConditionalVelocityGraph",
    "ConditionalVelocityJvpGraph",
    "EncodeGraph",
    "ExportGraph",
    "LogProbGraph",
    "PostprocessGraph",
    "PreprocessGraph",
    "ProbeLogProbGraph",
    "SampleGraph",
    "VelocityDivGraph",
    "VelocityGraph",
    "VelocityJvpGraph",
    "one_pass_graphs",
    "spec",
    "velocity_graphs",
]


@dataclass(frozen=True)
class ExportGraph:
    """One graph to export: the module and its inputs' and outputs' specs."""

    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def spec(name: str, dim: int | None) -> TensorSpec:
    """``(batch,)`` when ``dim`` is None, else ``(batch, dim)``."""
    return TensorSpec(name=name, shape=["batch"] if dim is None else ["batch", dim])


class PreprocessGraph(nn.Module):
    """``x: (batch, dim)`` data units -> ``(u, ladj)``; deterministic (eval mode)."""

    def __init__(self, pre: nn.Module) -> None:
        super().__init__()
        self.pre = pre

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.pre(x)


class PostprocessGraph(nn.Module):
    """``u: (batch, dim)`` model space -> ``x`` data units."""

    def __init__(self, pre: nn.Module) -> None:
        super().__init__()
        self.pre = pre

    def forward(self, u: Tensor) -> Tensor:
        return self.pre.inverse(u)


class LogProbGraph(nn.Module):
    """One-pass models: ``u: (batch, dim)`` -> ``log p(u): (batch,)`` in model space."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, u: Tensor) -> Tensor:
        return self.model.log_prob(u)


class ProbeLogProbGraph(LogProbGraph):
    """One-pass models with an estimated log-det: ``(u: (batch, dim), probe: (batch, dim))``
    -> one probe's estimate of ``log p(u)``, ``(batch,)`` (the runtime averages the probes)."""

    def forward(self, u: Tensor, probe: Tensor) -> Tensor:  # type: ignore[override]
        return self.model.series_log_prob(u, probe)


class SampleGraph(nn.Module):
    """One-pass models: base noise ``z: (batch, dim)`` -> ``u`` (noise seeded outside)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z: Tensor) -> Tensor:
        return self.model.inverse(z)


class VelocityGraph(nn.Module):
    """``(x: (batch, dim), t: (batch,))`` -> ``v: (batch, dim)`` (t = 0 data, 1 noise)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.model.velocity(x, t)


class VelocityDivGraph(VelocityGraph):
    """-> ``(v, div v)`` with the exact divergence by forward-mode arithmetic."""

    def forward(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.model.velocity_div(x, t)


class VelocityJvpGraph(VelocityGraph):
    """``(x, t, e)`` -> ``(v, J e)`` for Hutchinson's estimator."""

    def forward(self, x: Tensor, t: Tensor, e: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        return self.model.velocity_jvp(x, t, e)


class EncodeGraph(nn.Module):
    """One-pass models: ``u: (batch, dim)`` -> the latent ``z = f(u)`` (the ``latent``
    anomaly score's input)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, u: Tensor) -> Tensor:
        return self.model(u)[0]


class ConditionalLogProbGraph(LogProbGraph):
    """Conditional one-pass models: ``(u: (batch, dim), context: (batch, C))`` ->
    ``log p(u | context): (batch,)``."""

    def forward(self, u: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        return self.model.log_prob(u, context)


class ConditionalSampleGraph(SampleGraph):
    """Conditional one-pass models: ``(z, context)`` -> ``u`` given the context."""

    def forward(self, z: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        return self.model.inverse(z, context)


def one_pass_graphs(model: nn.Module, dim: int, context_width: int = 0
                    ) -> dict[str, ExportGraph]:
    """``log_prob`` and ``sample`` of a model with ``log_prob(u)`` and ``inverse(z)``; with
    ``context_width > 0`` both take ``context: (batch, context_width)`` as well."""
    u, z = spec("u", dim), spec("z", dim)
    if context_width:
        c = spec("context", context_width)
        return {"log_prob": ExportGraph(ConditionalLogProbGraph(model), [u, c],
                                        [spec("log_prob", None)]),
                "sample": ExportGraph(ConditionalSampleGraph(model), [z, c], [u])}
    return {"log_prob": ExportGraph(LogProbGraph(model), [u], [spec("log_prob", None)]),
            "sample": ExportGraph(SampleGraph(model), [z], [u])}


class ConditionalVelocityGraph(VelocityGraph):
    """``(x, t, context: (batch, C))`` -> ``v`` given the context (the null token: zeros)."""

    def forward(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:  # type: ignore[override]
        return self.model.velocity(x, t, context)


class ConditionalVelocityDivGraph(VelocityGraph):
    """``(x, t, context)`` -> ``(v, div v)`` given the context."""

    def forward(self, x: Tensor, t: Tensor,  # type: ignore[override]
                context: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.velocity_div(x, t, context)


class ConditionalVelocityJvpGraph(VelocityGraph):
    """``(x, t, e, context)`` -> ``(v, J e)`` given the context."""

    def forward(self, x: Tensor, t: Tensor, e: Tensor,  # type: ignore[override]
                context: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.velocity_jvp(x, t, e, context)


def velocity_graphs(model: nn.Module, dim: int, context_width: int = 0
                    ) -> dict[str, ExportGraph]:
    """``velocity``, ``velocity_div`` and ``velocity_jvp`` of an ODE model; with
    ``context_width > 0`` each takes ``context: (batch, context_width)`` last."""
    x, t, e = spec("x", dim), spec("time", None), spec("probe", dim)
    v = spec("velocity", dim)
    c = [spec("context", context_width)] if context_width else []
    plain = not context_width
    return {
        "velocity": ExportGraph(VelocityGraph(model) if plain
                                else ConditionalVelocityGraph(model), [x, t, *c], [v]),
        "velocity_div": ExportGraph(VelocityDivGraph(model) if plain
                                    else ConditionalVelocityDivGraph(model), [x, t, *c],
                                    [v, spec("divergence", None)]),
        "velocity_jvp": ExportGraph(VelocityJvpGraph(model) if plain
                                    else ConditionalVelocityJvpGraph(model), [x, t, e, *c],
                                    [v, spec("jvp", dim)]),
    }
