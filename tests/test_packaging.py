"""The deliverables around the code: the bento recipe, the Makefile's commands, CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from artifact.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def test_bentoml_build_makes_a_bento_offline(tmp_path: Path) -> None:
    env = dict(os.environ, BENTOML_HOME=str(tmp_path / "home"), BENTOML_DO_NOT_TRACK="True",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert shutil.which("uv", path=env["PATH"]), "bentoml build offline needs uv (dev extra)"
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", str(ROOT)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (bento,) = [p for p in (tmp_path / "home" / "bentos" / "genserve").iterdir()
                if p.name != "latest"]
    src = bento / "src"
    for module in ("service/http/api.py", "service/runtime/ode.py", "service/grpc/server.py",
                   "numerics/solvers.py", "artifact/manifest.py"):
        assert (src / module).is_file(), module
    page = sorted(p.name for p in (ROOT / "service" / "http" / "static").iterdir())
    assert sorted(p.name for p in (src / "service" / "http" / "static").iterdir()) == page
    for package in ("training", "report", "cli"):
        assert not (src / package).exists(), f"the bento must not ship {package}/"
    shipped = sorted(p.parent.name for p in (src / "exported_models").glob("*/manifest.json"))
    committed = sorted(p.parent.name for p in (ROOT / "exported_models").glob("*/manifest.json"))
    assert shipped == committed and shipped
    for name in shipped:  # every shipped artifact still verifies (sha256) inside the bento
        read_manifest(src / "exported_models" / name)
    assert (bento / "env" / "docker" / "Dockerfile").is_file()
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    assert "onnxruntime" in requirements and "torch" not in requirements
    spec = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert spec["service"] == "service.http.api:GenServe"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make serve" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line.strip() for line in ci.splitlines()
                if line.strip() and not line.strip().startswith(("#", "set ", "cd "))]
    assert commands == ["make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert "torch==2.13.0" in makefile and "pytest" in makefile


def test_committed_default_models_verify_and_cover_every_family() -> None:
    families = set()
    calibrated = 0
    for folder in sorted((ROOT / "exported_models").iterdir()):
        if folder.name.startswith("."):
            continue
        m = read_manifest(folder)
        families.add(m.family)
        calibrated += m.calibration is not None
        assert m.name == folder.name
    assert families == {"flow", "diffusion", "flow_matching"}
    assert calibrated >= 4


def test_the_wheel_ships_the_page(tmp_path: Path) -> None:
    """The page's files are package data: a wheel built from a copy of the sources holds
    every file of service/http/static/."""
    import zipfile

    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("numerics", "artifact", "training", "service", "report", "cli"):
        shutil.copytree(ROOT / package, src / package, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                        "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel")],
                       cwd=src, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "wheel").glob("genserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    page = {f"service/http/static/{p.name}"
            for p in (ROOT / "service" / "http" / "static").iterdir()}
    assert page and page <= names, sorted(page - names)
