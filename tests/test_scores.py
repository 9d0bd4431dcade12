"""Anomaly score kinds (issue #29): the manifest names the kind, the service computes it.

Manifest rules first (no training); then denoise, DTE and latent scores on planted local
outliers, their calibration, their batch independence and their served equality.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from artifact.manifest import ManifestError, read_manifest, sha256_file
from artifact.scores import AnomalyScoreSpec
from service.runtime import open_runtime

MODELS = Path(__file__).resolve().parents[1] / "exported_models"


def _copy(name: str, dst: Path) -> Path:
    out = dst / name
    shutil.copytree(MODELS / name, out)
    return out


def _rewrite(folder: Path, **changes: object) -> None:
    path = folder / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def test_version_1_manifest_serves_nll(tmp_path: Path) -> None:
    folder = _copy("moons-nsf", tmp_path)
    m = read_manifest(folder)
    assert m.manifest_version == 1 and m.anomaly is None and m.score_kind == "nll"
    rt = open_runtime(folder)
    x = np.array([[0.0, 0.5], [5.0, 5.0]])
    assert np.array_equal(rt.anomaly_score(x).scores, -rt.log_likelihood(x).log_prob)


@pytest.mark.parametrize(("model", "version", "anomaly", "words"), [
    ("moons-otcfm", 2, {"kind": "denoise", "levels": []}, "at least 2 noise levels"),
    ("moons-ddpm", 2, {"kind": "latent", "latent_rows": 100},
     "'latent' does not apply to a diffusion model; its kinds: nll, denoise, dte"),
    ("moons-nsf", 2, {"kind": "dte", "levels": [{"t": t, "a": 1 - t, "s": t, "da": -1.0,
                                                  "ds": 1.0} for t in (0.1, 0.2)]},
     "'dte' does not apply to a flow model"),
    ("moons-nsf", 1, {"kind": "nll"}, "needs manifest_version 2"),
    ("moons-nsf", 3, None, "reads versions 1, 2"),
])
def test_manifest_refuses_a_score_it_cannot_serve(tmp_path: Path, model: str, version: int,
                                                  anomaly: dict | None, words: str) -> None:
    folder = _copy(model, tmp_path)
    _rewrite(folder, manifest_version=version, anomaly=anomaly)
    with pytest.raises(ManifestError, match=words):
        read_manifest(folder)


def test_calibration_must_be_of_the_served_kind(tmp_path: Path) -> None:
    folder = _copy("moons-otcfm", tmp_path)
    levels = [{"t": t, "a": 1 - t, "s": t, "da": -1.0, "ds": 1.0} for t in (0.1, 0.3)]
    _rewrite(folder, manifest_version=2,
             anomaly={"kind": "dte", "levels": levels})  # calibration still says nll
    with pytest.raises(ManifestError, match="calibration is of score 'nll'"):
        read_manifest(folder)
    spec = AnomalyScoreSpec(kind="dte", levels=levels)
    assert np.allclose(spec.noise_levels().det, 1.0)  # linear path: a ds - s da = 1
    assert sha256_file(folder / "velocity.onnx")  # the graphs are untouched
