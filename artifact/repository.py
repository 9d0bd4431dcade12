"""The models directory's layout: model folders, their versions and their serving policy.

A model folder ``NAME/`` holds its versions as integer subfolders ``NAME/VERSION/`` (as
Triton's model repository does), each a complete artifact (``manifest.json`` and its graphs).
Flat files in ``NAME/`` itself (``NAME/manifest.json``: what ``genserve export`` writes into
a new folder, and every folder before versions existed) are version 1, beside any others.
``NAME/policy.json`` chooses the version a request that names none gets::

    {"default": "latest"}     the highest version that loads (also without a policy file)
    {"default": 2}            version 2, while it loads (a rollback is one edit of this file)

Entries whose names start with ``.`` are never read: an export writes into a hidden sibling
and renames it into place, so a reader sees a version whole or not at all. A version copied
in file by file (``cp -R``, a volume sync) is seen half-written; its manifest's sha256 sums
tell when it is complete (``artifact.manifest.read_manifest``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from artifact.manifest import MANIFEST_FILE, NAME_PATTERN

__all__ = [
    "POLICY_FILE",
    "PolicyError",
    "ServingPolicy",
    "fingerprint",
    "is_model_name",
    "next_version",
    "read_policy",
    "version_dirs",
    "version_target",
]

POLICY_FILE = "policy.json"
VERSION_DIR = re.compile(r"[1-9][0-9]{0,8}")
"""A version folder's name: a positive integer written without leading zeros."""

Fingerprint = tuple[tuple[str, int, int], ...]


class PolicyError(ValueError):
    """A ``policy.json`` that cannot be read; the message names the file and the fix."""


class ServingPolicy(BaseModel):
    """``NAME/policy.json``: the version that answers requests naming none."""

    model_config = ConfigDict(extra="forbid")

    default: Literal["latest"] | int = Field(
        "latest", description='"latest" (the highest version that loads) or a version >= 1')

    def choose(self, ready: list[int], current: int | None) -> int | None:
        """The default among the ``ready`` versions: the pinned one when it is ready, else
        the one serving now (``current``) when it is still ready, else the latest."""
        if not ready:
            return None
        if self.default != "latest" and self.default in ready:
            return self.default
        if self.default != "latest" and current in ready:
            return current
        return max(ready)


def is_model_name(name: str) -> bool:
    """Whether ``name`` can be a model folder's name (no path separators, no ``..``)."""
    return re.fullmatch(NAME_PATTERN, name) is not None and name not in (".", "..")


def read_policy(folder: Path) -> ServingPolicy:
    """``folder/policy.json``, or the default policy (latest) when there is none."""
    path = folder / POLICY_FILE
    if not path.is_file():
        return ServingPolicy()
    try:
        policy = ServingPolicy.model_validate_json(path.read_bytes())
    except (ValidationError, ValueError, OSError) as err:
        first = str(err).splitlines()
        detail = first[-1].strip() if first else str(err)
        raise PolicyError(f"{folder.name}/{POLICY_FILE} is invalid ({detail}); write "
                          '{"default": "latest"} or {"default": N} with N a version') from None
    if isinstance(policy.default, int) and policy.default < 1:
        raise PolicyError(f"{folder.name}/{POLICY_FILE}: versions start at 1; got "
                          f"{policy.default}")
    return policy


def version_dirs(folder: Path) -> tuple[dict[int, Path], dict[str, str]]:
    """``({version: its directory}, {entry: why it is not a version})`` of a model folder.

    Version 1 is the folder itself when it holds flat files (a non-empty folder without
    version subfolders too: its missing ``manifest.json`` is reported when it is read); a
    ``NAME/1/`` beside flat files is refused rather than guessed at.
    """
    found: dict[int, Path] = {}
    refused: dict[str, str] = {}
    flat = (folder / MANIFEST_FILE).exists()
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or not child.is_dir():
            continue
        if VERSION_DIR.fullmatch(child.name):
            found[int(child.name)] = child
    if flat and 1 in found:
        refused[f"{folder.name}/1"] = (f"{folder.name}/1 and the flat files of {folder.name}/ "
                                       "are both version 1; remove one of them")
        found[1] = folder
    elif flat or (not found and any(not c.name.startswith(".") and c.name != POLICY_FILE
                                    for c in folder.iterdir())):
        found[1] = folder
    return dict(sorted(found.items())), refused


def next_version(folder: Path) -> int:
    """The version after the highest one in ``folder`` (1 when there is none)."""
    if not folder.is_dir():
        return 1
    versions, _ = version_dirs(folder)
    return max(versions, default=0) + 1


def version_target(folder: Path, version: int | None) -> tuple[Path, int]:
    """Where an export of ``version`` (None: the next free one) of model folder ``folder``
    goes, and its number: the folder itself (flat files, version 1) while it is new or holds
    flat files only, re-exported as version 1; else ``folder/VERSION/``. ValueError for a
    version that is not a positive integer, and for version 1 of a folder holding flat
    files beside versions (writing it would replace the folder, versions and all)."""
    if version is not None and not (1 <= version and VERSION_DIR.fullmatch(str(version))):
        raise ValueError(f"--version must be an integer from 1 to 999999999; got {version}")
    versions = version_dirs(folder)[0] if folder.is_dir() else {}
    number = version if version is not None else max(versions, default=0) + 1
    flat = versions.get(1) == folder
    subfolders = [v for v, where in versions.items() if where != folder]
    if number == 1 and not subfolders and (flat or not versions):
        return folder, 1
    if number == 1 and flat:
        raise ValueError(f"{folder.name}/ holds version 1 as flat files beside versions "
                         f"{', '.join(map(str, subfolders))}; move them into "
                         f"{folder.name}/1/ first, or export another --version")
    return folder / str(number), number


def fingerprint(directory: Path) -> Fingerprint:
    """Name, size and modification time of every file directly in ``directory`` (hidden ones
    and ``policy.json`` aside): it changes whenever a version's files do, at the cost of a
    ``stat`` per file, so a poll re-reads only versions that changed."""
    out = []
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return ()
    for entry in entries:
        if entry.name.startswith(".") or entry.name == POLICY_FILE:
            continue
        try:
            st = entry.stat()
        except OSError:  # removed between the listing and the stat
            continue
        if entry.is_file():
            out.append((entry.name, st.st_size, st.st_mtime_ns))
    return tuple(out)
