"""Plug-ins: a model family or model type from outside genserve, imported by module name.

A plug-in module registers what it adds when it is imported: its family's vocabulary
(``artifact.families.register_family``), its model types (``training.registry``), its
runtime (``service.runtime.register_runtime``). The service imports the modules named in
``GENSERVE_PLUGINS`` at start-up, in every worker, and the command line does the same, so an
artifact of a plug-in family is served like any other.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

__all__ = ["load_plugins"]


def load_plugins(modules: Iterable[str]) -> list[str]:
    """Import each module (once; Python caches imports); the names imported."""
    loaded = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"plug-in module {name!r} cannot be imported ({err}); check "
                              "GENSERVE_PLUGINS and that the module is on the Python path") \
                from err
        loaded.append(name)
    return loaded
