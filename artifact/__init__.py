"""The contract between training and serving: the manifest (versioned, sha256 of every file),
the vocabulary of families, graphs and solvers, the anomaly calibration, and the table files
both sides read. No torch; imports neither ``training`` nor ``service``."""

from importlib.metadata import PackageNotFoundError, version

__all__ = ["genserve_version"]


def genserve_version() -> str:
    """The installed genserve's version (a checkout that is not installed: ``0.0.0``)."""
    try:
        return version("genserve")
    except PackageNotFoundError:
        return "0.0.0+checkout"
