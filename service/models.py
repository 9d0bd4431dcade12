"""The set of served models, kept in step with the models directory while the service runs.

Each worker holds one :class:`ModelSet`. :meth:`ModelSet.refresh` reads the directory's
layout (``artifact.repository``: model folders, their versions, their serving policies):
every version that is new, or whose files changed, is checked (manifest schema, the sha256 of
every file, its graphs opened, a smoke call) and loaded; a version that fails a check is
refused with the reason and tried again only when its files change, while what served before
goes on serving; versions removed from the directory, or unloaded through the repository API
(``service.repository``), are retired. The :class:`Watcher` thread refreshes every
``GENSERVE_MODELS_POLL_S`` seconds in every worker, so each worker converges on the
directory's set within one interval, and a repository call refreshes its worker at once.

What serves is an immutable :class:`Snapshot`, replaced by one assignment: a request is
validated against one snapshot and holds the :class:`ServedVersion` it gets there
(``service.dataplane``), so it is answered entirely by that version even if the default moves
or the version is retired meanwhile. A retired version's graph sessions are released when
the last request holding it is done (logged as it happens).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from artifact.manifest import ManifestError, read_manifest
from artifact.repository import (
    Fingerprint,
    PolicyError,
    ServingPolicy,
    fingerprint,
    read_policy,
    version_dirs,
)
from service.metrics import (
    GRAPH_SECONDS,
    MODEL_LOAD_SECONDS,
    MODEL_LOADS,
    MODELS_LOADED,
    SERVED_VERSION,
)
from service.repository import RepositoryState, model_folder
from service.runtime import ModelRuntime, open_runtime
from service.schemas import ModelInfo, RepositoryAnswer, VersionInfo
from service.settings import Settings
from service.validation import RequestError, card_for

__all__ = ["ModelSet", "ServedVersion", "Snapshot", "Watcher", "model_info"]

log = logging.getLogger("genserve")
Key = tuple[str, int]  # (model folder, version)


def model_info(rt: ModelRuntime) -> ModelInfo:
    """The served card of a runtime."""
    m = rt.manifest
    return ModelInfo(
        name=m.name, version=rt.version, family=m.family, model_type=m.model_type, dim=m.dim,
        graphs=sorted(m.graphs), runtime=rt.format, devices=rt.devices(),
        solvers=list(rt.solvers()),
        shape=list(m.event_shape), levels=m.data.levels, defaults=m.defaults.model_dump(),
        time=None if m.time is None else m.time.model_dump(exclude_none=True),
        manifold=None if m.manifold is None else m.manifold.model_dump(),
        tokens=None if m.tokens is None else m.tokens.model_dump(),
        noise=None if m.noise is None else m.noise.model_dump(),
        log_det=None if m.log_det is None else m.log_det.model_dump(),
        condition=None if m.condition is None else {
            **m.condition.model_dump(include={"kind", "width", "classes", "priors",
                                              "null_token", "cfg_dropout", "columns"}),
            "thresholds": [c.threshold for c in m.condition.calibrations],
        },
        calibration=None if m.calibration is None else {
            "score": m.score_kind,
            "target_fpr": m.calibration.target_fpr,
            "threshold": m.calibration.threshold,
            "rows": m.calibration.rows,
        },
    )


@dataclass(frozen=True, eq=False)
class ServedVersion:
    """One loaded version: its folder, number and runtime."""

    folder: str
    version: int
    runtime: ModelRuntime

    @property
    def name(self) -> str:
        return self.runtime.name


@dataclass(frozen=True)
class _Record:
    """What one poll found for one version: its name in logs and ``failed`` (``NAME`` for a
    folder holding flat files only, else ``NAME/VERSION``), its files' fingerprint, and the
    loaded version or why it is not loaded (refused: ``reason``; or unloaded through the
    repository API)."""

    label: str
    fingerprint: Fingerprint = ()
    served: ServedVersion | None = None
    reason: str | None = None
    unloaded: bool = False

    @property
    def name(self) -> str | None:
        """The served model's name (None while not loaded)."""
        return None if self.served is None else self.served.name

    def info(self, version: int) -> VersionInfo:
        if self.served is not None:
            return VersionInfo(version=version, state="ready")
        if self.unloaded:
            return VersionInfo(version=version, state="unloaded",
                               reason="unloaded through the repository API")
        return VersionInfo(version=version, state="failed", reason=self.reason)


@dataclass(frozen=True)
class Snapshot:
    """The served set at one moment: immutable, replaced as a whole.

    ``served``: (model name, version) -> loaded version; ``cards``: each served model's card
    (of its default version); ``failed``: what does not serve and why; ``unloaded``: marks of
    the repository API; ``folders``: each model folder's default version and versions."""

    served: dict[tuple[str, int], ServedVersion] = field(default_factory=dict)
    cards: dict[str, ModelInfo] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    unloaded: list[str] = field(default_factory=list)
    folders: dict[str, tuple[int | None, list[VersionInfo]]] = field(default_factory=dict)

    def resolve(self, name: str, version: int | None = None) -> ServedVersion:
        """The loaded version a request for ``name`` (at ``version``) gets; RequestError 404
        naming the served models, or the model's versions."""
        card = card_for(self.cards, name, version)
        return self.served[(name, card.version)]

    @property
    def runtimes(self) -> dict[str, ModelRuntime]:
        """Each served model's default version's runtime."""
        return {name: self.served[(name, card.version)].runtime
                for name, card in self.cards.items()}


class ModelSet:
    """The served models of one worker (see the module's docstring).

    Args:
        settings: the service's settings (models directory, runtime, threads, device).
        state: the repository API's unload marks, shared by the server's workers (None: no
            repository API, e.g. a model set read once by a test).
    """

    def __init__(self, settings: Settings, state: RepositoryState | None = None) -> None:
        self.settings = settings
        self.root = Path(settings.models_dir)
        self.state = state
        self.snapshot = Snapshot()
        self._records: dict[Key, _Record] = {}
        self._policies: dict[str, ServingPolicy] = {}
        self._lock = threading.Lock()  # one refresh at a time (watcher, repository calls)

    @classmethod
    def load(cls, settings: Settings, state: RepositoryState | None = None) -> ModelSet:
        """A model set holding the directory's models as they are now."""
        out = cls(settings, state)
        out.refresh()
        return out

    # -- what serves ---------------------------------------------------------------------
    @property
    def cards(self) -> dict[str, ModelInfo]:
        return self.snapshot.cards

    @property
    def failed(self) -> dict[str, str]:
        return self.snapshot.failed

    @property
    def runtimes(self) -> dict[str, ModelRuntime]:
        return self.snapshot.runtimes

    def info(self) -> list[ModelInfo]:
        return list(self.snapshot.cards.values())

    # -- the repository API --------------------------------------------------------------
    def load_model(self, name: str, version: int | None = None) -> RepositoryAnswer:
        """Serve model folder ``name`` (or one of its versions) again, checked now; 422 with
        the reason when the version (every version, without ``version``) is refused."""
        folder, versions = self._repository_folder(name, version)
        if self.state is not None:
            self.state.load(name, version, sorted(versions))
        wanted = [version] if version is not None else sorted(versions)
        snapshot = self.refresh(retry=[(name, v) for v in wanted])
        default, infos = snapshot.folders.get(name, (None, []))
        states = {info.version: info for info in infos}
        refused = [states[v] for v in wanted if v in states and states[v].state != "ready"]
        if len(refused) == len(wanted):
            reasons = "; ".join(f"version {r.version}: {r.reason}" for r in refused)
            raise RequestError(422, f"model {name!r} was refused ({reasons}); what served "
                               "before goes on serving")
        return RepositoryAnswer(model=name, version=default, versions=infos)

    def unload_model(self, name: str, version: int | None = None) -> RepositoryAnswer:
        """Stop serving model folder ``name`` (or one version) in every worker; requests
        already holding it finish on it."""
        self._repository_folder(name, version)
        if self.state is None:
            raise RequestError(503, "this model set has no repository state")
        self.state.unload(name, version)
        default, infos = self.refresh().folders.get(name, (None, []))
        return RepositoryAnswer(model=name, version=default, versions=infos)

    def _repository_folder(self, name: str, version: int | None) -> tuple[Path, dict]:
        folder = model_folder(self.root, name)
        versions, _ = version_dirs(folder)
        if version is not None and version not in versions:
            raise RequestError(404, f"model folder {name!r} has no version {version}; its "
                               f"versions: {', '.join(map(str, versions)) or '(none)'}")
        return folder, versions

    # -- one poll ------------------------------------------------------------------------
    def refresh(self, retry: Iterable[Key] = ()) -> Snapshot:
        """Read the directory, load and retire versions, publish the new snapshot.

        ``retry``: versions to check again even if their files did not change (a repository
        load call)."""
        with self._lock:
            before = self.snapshot
            folders = self._folders()
            if folders is None:
                return before
            marks = self.state.marks() if self.state is not None else {}
            retry = set(retry)
            records: dict[Key, _Record] = {}
            failed: dict[str, str] = {}
            unloaded: list[str] = []
            for folder in folders:
                versions, refused = version_dirs(folder)
                failed.update(refused)
                self._read_policy(folder, failed)
                mark = marks.get(folder.name)
                if mark == "all":
                    unloaded.append(folder.name)
                versioned = len(versions) > 1 or any(d != folder for d in versions.values())
                for version, where in versions.items():
                    key = (folder.name, version)
                    label = f"{folder.name}/{version}" if versioned else folder.name
                    if mark == "all" or (isinstance(mark, list) and version in mark):
                        records[key] = _Record(label, unloaded=True)
                        if mark != "all":
                            unloaded.append(label)
                        continue
                    records[key] = self._checked(folder, version, where, label, versioned,
                                                 key in retry)
            self._records = records
            if not self.root.is_dir():
                failed[self.root.name or str(self.root)] = \
                    f"models directory {self.root.name or self.root} does not exist"
            self.snapshot = self._publish(before, failed, unloaded)
            self._report(before, self.snapshot)
            return self.snapshot

    def _folders(self) -> list[Path] | None:
        """The model folders (None: the directory cannot be read now, and the loaded models
        keep serving: a volume being remounted must not unload everything)."""
        try:
            return sorted(p for p in self.root.iterdir()
                          if p.is_dir() and not p.name.startswith("."))
        except FileNotFoundError:
            if not self.snapshot.served:
                log.error("models directory %s does not exist", self.root)
                return []
            log.error("models directory %s is gone; the loaded models keep serving", self.root)
        except OSError as err:
            log.error("models directory %s cannot be read (%s); the loaded models keep "
                      "serving", self.root, err.strerror)
        return None

    def _read_policy(self, folder: Path, failed: dict[str, str]) -> None:
        try:
            self._policies[folder.name] = read_policy(folder)
        except PolicyError as err:  # the previous policy (or the default) stays
            failed[f"{folder.name}/policy.json"] = str(err)
            self._policies.setdefault(folder.name, ServingPolicy())

    def _checked(self, folder: Path, version: int, where: Path, label: str, versioned: bool,
                 retry: bool) -> _Record:
        """The version's record: the last poll's while its files are unchanged."""
        prints = fingerprint(where)
        old = self._records.get((folder.name, version))
        if old is not None and old.fingerprint == prints and not old.unloaded and \
                not (retry and old.served is None):
            if old.label == label:
                return old
            # flat files that became version 1 of a versioned folder: the same files serve
            # on, unless their model name is not the folder's (the versions' rule)
            if old.served is not None and (not versioned or old.name == folder.name):
                return replace(old, label=label)
        return self._load(folder, version, where, label, prints, versioned)

    def _load(self, folder: Path, version: int, where: Path, label: str, prints: Fingerprint,
              versioned: bool) -> _Record:
        """Check and open one version; a refusal is logged and counted, never raised."""
        start = time.perf_counter()
        labels = {"model": folder.name, "version": str(version)}
        try:
            manifest = read_manifest(where, verify=True)
            if versioned and manifest.name != folder.name:
                raise ManifestError(f"{label}: its manifest names model {manifest.name!r}; "
                                    f"the versions in {folder.name}/ name {folder.name!r}")
            rt = open_runtime(where, manifest=manifest, runtime=self.settings.runtime,
                              threads=self.settings.graph_threads(),
                              device=self.settings.placement())
            rt.check()
        except Exception as err:  # noqa: BLE001 - any failure refuses this version alone
            reason = self._reason(folder, where, err)
            MODEL_LOADS.labels(result="refused", **labels).inc()
            log.warning("refused model %s: %s", label, reason)
            return _Record(label, prints, reason=reason)
        rt.version = version
        rt.observer = _graph_observer(rt.name)
        weakref.finalize(rt, log.info, "released model %s version %d: no request holds it "
                         "any more and its graph sessions are freed", rt.name,
                         version).atexit = False
        seconds = time.perf_counter() - start
        MODEL_LOADS.labels(result="ok", **labels).inc()
        MODEL_LOAD_SECONDS.labels(model=folder.name).observe(seconds)
        where = ", ".join(sorted(set(rt.devices().values())))
        log.info("loaded model %s version %d (%s %s, %s on %s) in %.2f s", rt.name, version,
                 rt.family, manifest.model_type, rt.format, where, seconds)
        return _Record(label, prints, ServedVersion(folder.name, version, rt))

    def _reason(self, folder: Path, where: Path, err: Exception) -> str:
        """The refusal's message, naming files inside the models directory (never a path)."""
        text = str(err) if isinstance(err, ManifestError | RuntimeError | OSError) else \
            f"{type(err).__name__}: {err}"
        for path in (where, where.resolve(), self.root, self.root.resolve()):
            text = text.replace(f"{path}/", "").replace(str(path), "")
        if where != folder and text.startswith((f"{where.name}/", f"{where.name}:")):
            text = f"{folder.name}/{text}"  # read_manifest names files by their folder
        return text[:500]

    # -- the new snapshot ----------------------------------------------------------------
    def _publish(self, before: Snapshot, failed: dict[str, str],
                 unloaded: list[str]) -> Snapshot:
        by_folder: dict[str, dict[int, _Record]] = {}
        for (folder, version), record in self._records.items():
            by_folder.setdefault(folder, {})[version] = record
            if record.reason is not None:
                failed[record.label] = record.reason
        served: dict[tuple[str, int], ServedVersion] = {}
        cards: dict[str, ModelInfo] = {}
        folders: dict[str, tuple[int | None, list[VersionInfo]]] = {}
        owner: dict[str, str] = {}
        # a served name stays with the folder that served it; new names go in folder order
        serving = {card.name: folder for folder, card in _folder_cards(before).items()}
        order = sorted(by_folder, key=lambda f: (f not in serving.values(), f))
        for folder in order:
            records = by_folder[folder]
            infos = [r.info(v) for v, r in sorted(records.items())]
            ready = {v: r.served for v, r in records.items() if r.served is not None}
            folders[folder] = (None, infos)
            if not ready:
                continue
            name = next(iter(ready.values())).name
            if name in owner:
                for v in ready:
                    failed[records[v].label] = (f"duplicate model name {name!r} (served "
                                                f"from {owner[name]}/)")
                continue
            owner[name] = folder
            current = before.cards[name].version if name in before.cards else None
            default = self._policies.get(folder, ServingPolicy()).choose(sorted(ready), current)
            version_cards = {v: model_info(each.runtime) for v, each in ready.items()}
            for v, card in version_cards.items():
                card.versions = infos
                card._pinned = {u: other for u, other in version_cards.items() if u != v}
                served[(name, v)] = ready[v]
            cards[name] = version_cards[default]
            folders[folder] = (default, infos)
        return Snapshot(served=served, cards=dict(sorted(cards.items())), failed=failed,
                        unloaded=unloaded, folders=folders)

    def _report(self, before: Snapshot, after: Snapshot) -> None:
        """Log what changed, and set the served-version and loaded-models gauges."""
        for name, version in sorted(before.served.keys() - after.served.keys()):
            log.info("retired model %s version %d; requests holding it finish on it", name,
                     version)
        for name, card in after.cards.items():
            was = before.cards.get(name)
            if was is None or was.version != card.version:
                log.info("model %s serves version %d%s", name, card.version,
                         "" if was is None else f" (was {was.version})")
            SERVED_VERSION.labels(model=name).set(card.version)
        for name in before.cards.keys() - after.cards.keys():
            log.info("model %s no longer serves", name)
            SERVED_VERSION.labels(model=name).set(0)
        MODELS_LOADED.labels(state="ok").set(len(after.cards))
        MODELS_LOADED.labels(state="failed").set(len(after.failed))


def _folder_cards(snapshot: Snapshot) -> dict[str, ModelInfo]:
    """Each model folder's served card in ``snapshot``."""
    return {each.folder: snapshot.cards[name] for (name, _), each in snapshot.served.items()
            if name in snapshot.cards}


def _graph_observer(model: str) -> Callable[[str, float], None]:
    def observe(graph: str, seconds: float) -> None:
        GRAPH_SECONDS.labels(model=model, graph=graph).observe(seconds)

    return observe


class Watcher:
    """A daemon thread that keeps a model set in step with its directory.

    It reads the directory every quarter of ``interval_s``: a new version is noticed within a
    quarter of the interval, which leaves the rest of it for the version's check and load, so
    a worker serves it within one interval (``bench.versions`` measures that). Reading an
    unchanged directory costs a listing, a stat per file and the policy files."""

    SCANS_PER_INTERVAL = 4

    def __init__(self, models: ModelSet, interval_s: float) -> None:
        self.models = models
        self.scan_s = interval_s / self.SCANS_PER_INTERVAL
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="genserve-models-watcher",
                                        daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.scan_s):
            try:
                self.models.refresh()
            except Exception:  # the watcher outlives any one poll's failure
                log.exception("refreshing the models directory failed; trying again in "
                              "%.3g s", self.scan_s)
