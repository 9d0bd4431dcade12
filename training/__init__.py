"""genserve training side: data, model zoo, losses, one training loop, checkpoints, export.

Torch only. The service never imports this package; the exported manifest is the contract.
"""

__all__: list[str] = []
