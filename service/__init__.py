"""genserve service side: runtime over exported artifacts, solvers, API, metrics, gRPC.

Importing this package is cheap (no BentoML, no ONNX Runtime): training reuses
``service.solvers`` and friends, which are plain array arithmetic.
"""

__all__: list[str] = []
