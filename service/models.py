"""The set of served models: every folder of the models directory, loaded once per worker.

Each folder's manifest is read and its files verified by sha256 once, when the runtime is
opened; the served card of each model (``GET /models``, and what requests are validated
against) is made from that runtime. A folder that is missing a file, fails a sha256 or breaks
the manifest schema is refused with a message naming the file; the others load and serve
(readiness reports both).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from artifact.manifest import MANIFEST_FILE, ManifestError
from service.runtime import ModelRuntime, open_runtime
from service.schemas import ModelInfo
from service.settings import Settings

__all__ = ["ModelSet", "model_info"]

log = logging.getLogger("genserve")


def model_info(rt: ModelRuntime) -> ModelInfo:
    """The served card of a runtime."""
    m = rt.manifest
    return ModelInfo(
        name=m.name, family=m.family, model_type=m.model_type, dim=m.dim,
        graphs=sorted(m.graphs), runtime=rt.format, solvers=list(rt.solvers()),
        shape=list(m.event_shape), defaults=m.defaults.model_dump(),
        time=None if m.time is None else m.time.model_dump(exclude_none=True),
        manifold=None if m.manifold is None else m.manifold.model_dump(),
        tokens=None if m.tokens is None else m.tokens.model_dump(),
        calibration=None if m.calibration is None else {
            "target_fpr": m.calibration.target_fpr,
            "threshold": m.calibration.threshold,
            "rows": m.calibration.rows,
        },
    )


@dataclass
class ModelSet:
    runtimes: dict[str, ModelRuntime] = field(default_factory=dict)
    cards: dict[str, ModelInfo] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, settings: Settings) -> ModelSet:
        root = Path(settings.models_dir)
        out = cls()
        if not root.is_dir():
            out.failed[str(root.name or root)] = f"models directory {root} does not exist"
            log.error("models directory %s does not exist", root)
            return out
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            if folder.name.startswith(".") or not (folder / MANIFEST_FILE).exists() and not any(
                folder.iterdir()
            ):
                continue
            try:
                rt = open_runtime(folder, runtime=settings.runtime, threads=settings.threads,
                                  device=settings.device)
            except (ManifestError, RuntimeError, OSError, ValueError) as err:
                out.failed[folder.name] = str(err)
                log.error("refused model %s: %s", folder.name, err)
                continue
            if rt.name in out.runtimes:
                out.failed[folder.name] = f"duplicate model name {rt.name!r}"
                continue
            out.runtimes[rt.name] = rt
            out.cards[rt.name] = model_info(rt)
            log.info("loaded model %s (%s %s, %s)", rt.name, rt.family,
                     rt.manifest.model_type, rt.format)
        return out

    def info(self) -> list[ModelInfo]:
        return list(self.cards.values())
