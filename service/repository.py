"""The repository API's state: the models and versions an operator has unloaded.

``POST /models/{name}/unload`` (and gRPC ``RepositoryModelUnload``) reaches one worker, but
every worker of the server must stop serving the model: the worker that gets the call writes
the unload mark into a small JSON file the server's workers share, and each worker's model
set reads the marks at every refresh (``service.models``), so all of them converge within one
``GENSERVE_MODELS_POLL_S``. ``load`` removes a mark. The file lives in the temporary
directory, named after the server process (the workers' parent) and its start time, so it
belongs to one run of one server: a restarted server serves the whole directory again.

Marks name model folders (the repository's unit, ``NAME``), and ``"all"`` or the version
numbers unloaded: ``{"unloaded": {"moons-nsf": "all", "moons-ddpm": [2]}}``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from artifact.repository import is_model_name
from service.validation import RequestError

__all__ = ["Mark", "RepositoryState", "model_folder", "server_state_path"]

log = logging.getLogger("genserve")
Mark = Literal["all"] | list[int]


def server_state_path() -> Path:
    """The state file of the server this worker belongs to: its parent process's id and
    start time (from ``/proc``, where there is one) name it."""
    parent = os.getppid()
    try:
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    return Path(tempfile.gettempdir()) / f"genserve-repository-{parent}-{started}.json"


def model_folder(root: Path, name: str) -> Path:
    """The model folder ``name`` of the models directory ``root``: 400 for anything that is
    not a plain folder name inside it (no path traversal), 404 for a folder that is not there.
    """
    shown = repr(name[:64])
    if not is_model_name(name):
        raise RequestError(400, f"{shown} is not a model folder of the models directory: name "
                           "one folder (letters, digits, '.', '_', '-'; no path)")
    folder = root / name
    if not folder.resolve().is_relative_to(root.resolve()):
        raise RequestError(400, f"model folder {shown} resolves outside the models directory; "
                           "the repository API loads only folders inside it")
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir()
                         and not p.name.startswith(".")) if root.is_dir() else []
        raise RequestError(404, f"no model folder {shown} in the models directory; its "
                           f"folders: {', '.join(present) or '(none)'}")
    return folder


class RepositoryState:
    """The unload marks in ``path``, shared by the workers of one server."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def marks(self) -> dict[str, Mark]:
        """The marks now (none when the file is absent or unreadable)."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.error("repository state %s cannot be read (%s); no model is unloaded",
                      self.path.name, err)
            return {}
        marks = data.get("unloaded", {}) if isinstance(data, dict) else {}
        return {k: v for k, v in marks.items() if v == "all" or isinstance(v, list)}

    def unload(self, folder: str, version: int | None) -> None:
        def change(marks: dict[str, Mark]) -> None:
            mark = marks.get(folder)
            if version is None:
                marks[folder] = "all"
            elif mark != "all":
                marks[folder] = sorted({*(mark or []), version})

        self._update(change)

    def load(self, folder: str, version: int | None, versions: list[int]) -> None:
        """Remove the mark of ``version`` (None: of the whole model); ``versions`` are the
        folder's versions, those that stay unloaded when one of an unloaded model returns."""
        def change(marks: dict[str, Mark]) -> None:
            mark = marks.pop(folder, None)
            if version is None or mark is None:
                return
            rest = [v for v in (versions if mark == "all" else mark) if v != version]
            if rest:
                marks[folder] = rest

        self._update(change)

    def _update(self, change: Callable[[dict[str, Mark]], None]) -> None:
        """Read, change and replace the file under an exclusive lock (workers write it
        concurrently)."""
        with self._locked():
            marks = self.marks()
            change(marks)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            with os.fdopen(fd, "w") as fh:
                json.dump({"unloaded": marks}, fh)
            os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
