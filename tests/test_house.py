"""The house's rules, checked from the tree: every setting in ``Settings`` and documented
once, no dead module-level functions, and the packages' layers (import-linter)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from service.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("numerics", "artifact", "service", "training", "genserve", "report", "cli")
SETTING = re.compile(r"\bGENSERVE_[A-Z][A-Z0-9_]*[A-Z0-9]\b")


def field_name(env: str) -> str:
    return env.removeprefix(ENV_PREFIX).lower()


def _env_names() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def _sources(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


def test_every_genserve_variable_the_code_reads_is_a_setting() -> None:
    """A ``GENSERVE_*`` name anywhere in the code (reads, messages, docstrings) is a field of
    ``Settings``, which reads and validates them all at once."""
    found: dict[str, str] = {}
    for path in _sources(*PACKAGES, "bench"):
        for name in SETTING.findall(path.read_text()):
            found.setdefault(name, str(path.relative_to(ROOT)))
    unknown = {name: where for name, where in found.items() if name not in _env_names()}
    assert not unknown, f"GENSERVE_* names that are not Settings fields: {unknown}"


def test_readme_lists_every_setting_once_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(GENSERVE_[A-Z0-9_]+)` \| ([^|]+) \|", readme, flags=re.M)
    names = [name for name, _ in rows]
    assert sorted(set(names)) == sorted(names), "a setting is listed twice in README.md"
    assert set(names) == _env_names(), (
        f"README's settings table and Settings differ: missing "
        f"{sorted(_env_names() - set(names))}, unknown {sorted(set(names) - _env_names())}")
    for name, default in rows:
        field = Settings.model_fields[field_name(name)]
        value = field.default_factory() if field.default_factory else field.default
        shown = default.strip().strip("`")
        if value is None or value == []:
            assert shown in ("unset", "rate, rounded up"), (name, shown)
            continue
        parsed = Settings.model_validate({field_name(name): shown})
        assert getattr(parsed, field_name(name)) == value, \
            f"README gives {name} the default {shown!r}; Settings has {value!r}"


def test_no_unused_module_level_function() -> None:
    """vulture over the packages, the benchmarks and the tests: every module-level function
    and class defined outside the tests is used somewhere."""
    out = subprocess.run(
        [sys.executable, "-m", "vulture", *PACKAGES, "bench", "tests", "--min-confidence", "60"],
        cwd=ROOT, capture_output=True, text=True).stdout
    dead = [line for line in out.splitlines()
            if ("unused function" in line or "unused class" in line)
            and not line.startswith("tests/") and "_pb2" not in line
            and "bench/noop_service.py" not in line]  # served by name: `bentoml serve`
    assert not dead, "\n".join(dead)


def test_import_contracts_hold() -> None:
    """The layers of DESIGN.md (also run by ``make test`` and ``make lint``)."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
