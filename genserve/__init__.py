"""genserve's public Python API for data pipelines.

``genserve.spark`` scores a Spark DataFrame with an exported model on the executors (needs
the ``[spark]`` extra: ``pip install 'genserve[spark]'``). The command line (``cli``), the
service (``service``) and the artifact contract (``artifact``) are the other entry points.
"""

__all__: list[str] = []
