"""Serving exported models: one runtime class per family (``base`` holds the interface and
the registry; ``flow``, ``ode`` and ``discrete`` register the built-in families), over graph
executors (``graphs``: ONNX Runtime or TorchScript)."""

from service.runtime import discrete, flow, ode
from service.runtime.base import (
    LOG_LIKELIHOOD_FLOOR,
    RUNTIMES,
    AnomalyResult,
    InputError,
    LikelihoodOutput,
    ModelRuntime,
    SampleOutput,
    SeededRows,
    open_runtime,
    register_runtime,
)

__all__ = ["LOG_LIKELIHOOD_FLOOR", "RUNTIMES", "AnomalyResult", "InputError",
           "LikelihoodOutput", "ModelRuntime", "SampleOutput", "SeededRows", "discrete", "flow",
           "ode", "open_runtime", "register_runtime"]
