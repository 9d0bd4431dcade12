"""``genserve report``: every file written, valid images, evaluate's numbers, determinism,
the anomaly sub-mode, and one-line errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_checkpoint
from PIL import Image

from cli import main

FRAMES = 4
SEED = 3
TINY = ["--hidden", "16", "--layers", "1", "--transforms", "2", "--bins", "4"]
TRAIN = ["--steps", "30", "--batch-size", "64", "--warmup", "5", "--eval-every", "30"]
DRAW = ["--frames", str(FRAMES), "--points", "150", "--samples", "100", "--grid", "16",
        "--ode-steps", "6", "--seed", str(SEED), "--no-progress"]
MODELS = ["nsf", "ddpm", "otcfm", "otcfm-reflow"]
FIGURES = ["samples.png", "trajectories.png", "snapshots.png", "vector_fields.png",
           "density.png"]
GIFS = [f"generation_{m}.gif" for m in MODELS] + ["generation_all.gif"]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report over three loaded tiny checkpoints, plus a reflow it trains itself."""
    root = tmp_path_factory.mktemp("report")
    ckpts = [root / kind for kind in MODELS[:3]]
    for path in ckpts:
        tiny_checkpoint(path.name, path, data="3clusters", steps=30)
    out = root / "out"
    argv = ["report", "--out", str(out), "--checkpoints", *map(str, ckpts), "--reflow",
            "--reflow-pairs", "200"]
    assert main(argv + TRAIN + DRAW) == 0
    return out


def test_report_writes_every_file_as_valid_images(tiny_report: Path) -> None:
    for name in FIGURES:
        with Image.open(tiny_report / name) as im:
            assert im.format == "PNG"
            im.verify()
    for name in GIFS:
        with Image.open(tiny_report / name) as im:
            assert im.format == "GIF"
            assert im.n_frames == FRAMES, name
    with Image.open(tiny_report / "generation_nsf.gif") as one, \
            Image.open(tiny_report / "generation_all.gif") as every:
        assert every.size[0] > 3 * one.size[0]  # one panel per model, side by side
    assert (tiny_report / "checkpoints" / "otcfm-reflow" / "config.json").is_file()
    table = (tiny_report / "metrics.md").read_text()
    assert all(f"| {m} |" in table for m in MODELS)


def test_metrics_json_matches_genserve_evaluate(tiny_report: Path, capsys) -> None:
    metrics = json.loads((tiny_report / "metrics.json").read_text())
    assert list(metrics["models"]) == MODELS
    deterministic = ["model_type", "family", "log_likelihood", "log_likelihood_se",
                     "bits_per_dim", "rows", "method", "nfe", "true_log_likelihood",
                     "w2_to_test", "w2_rows"]
    capsys.readouterr()
    for name, row in metrics["models"].items():
        assert main(["evaluate", row["checkpoint"], "--samples", "100", "--seed", str(SEED)]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert {k: row["evaluate"][k] for k in deterministic} == \
            {k: printed[k] for k in deterministic}, name
        assert row["evaluate_command"].endswith(f"--samples 100 --seed {SEED}")
        assert row["straightness"] >= 1.0  # a path is never shorter than its chord
        assert f"{printed['log_likelihood']:.3f}" in (tiny_report / "metrics.md").read_text()
    # evaluate runs on one torch thread unless told otherwise, and gives the caller's back
    import torch

    before = torch.get_num_threads()
    first = next(iter(metrics["models"].values()))["checkpoint"]
    assert main(["evaluate", first, "--samples", "100", "--threads", "2"]) == 0
    assert torch.get_num_threads() == before
    capsys.readouterr()
    with pytest.raises(SystemExit) as bad:
        main(["evaluate", first, "--threads", "many"])
    assert bad.value.code == 2
    assert "'many' is not a thread count; give an integer from 0" in capsys.readouterr().err


def test_training_report_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    argv = ["--models", "flow=maf", "--rows", "300", "--frames", "2", "--points", "40",
            "--samples", "30", "--grid", "8", "--seed", str(SEED), "--no-progress"]
    for run in ("a", "b"):
        assert main(["report", "--out", str(tmp_path / run)] + argv + TINY + TRAIN) == 0
    files = FIGURES + ["generation_maf.gif", "generation_all.gif"]  # metrics.md has timings
    a, b = tmp_path / "a", tmp_path / "b"
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    metrics = json.loads((a / "metrics.json").read_text())
    assert metrics["data"]["name"] == "3clusters" and metrics["data"]["rows"] == 300
    assert (a / "checkpoints" / "maf" / "weights.safetensors").read_bytes() == \
        (b / "checkpoints" / "maf" / "weights.safetensors").read_bytes()


@pytest.mark.parametrize("model", ["nsf", "otcfm"])
def test_generation_ends_on_the_models_own_samples(tiny_report: Path, model: str) -> None:
    from report.compare import generation
    from training.checkpoint import load_checkpoint
    from training.evaluate import sample_data

    ckpt = load_checkpoint(tiny_report.parent / model)
    gen = generation(ckpt, model, 50, frames=FRAMES, solver="rk4", steps=6, seed=SEED)
    assert gen.path.shape[1:] == (50, 2) and len(gen.frames) == FRAMES
    assert gen.frames[0] == 0 and gen.frames[-1] == len(gen.path) - 1
    if model == "nsf":
        expected = sample_data(ckpt, 50, seed=SEED)  # the same noise, one inverse pass
    else:
        z = ckpt.model.noise(50, torch.Generator().manual_seed(SEED))
        steps = len(gen.path_times) - 1
        with torch.no_grad():
            x = ckpt.model.transport(z, steps=steps, solver="rk4")
            expected = ckpt.preprocessor.inverse(x).double().numpy()
        assert gen.nfe == 4 * steps
    np.testing.assert_allclose(gen.path[-1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--data", "gmm6"], ["2-D", "6 columns"]),
        (["--models", "flow=nsf,diffusion=nope"], ["'nope'", "otcfm", "maf"]),
        (["--models", "flow=ddpm"], ["diffusion model, not flow"]),
        (["--solver", "leapfrog"], ["leapfrog", "dopri5"]),
        (["--anomaly-model", "x"], ["--normal"]),
    ],
)
def test_bad_input_fails_with_one_line(tmp_path: Path, capsys, argv: list[str],
                                       words: list[str]) -> None:
    assert main(["report", "--out", str(tmp_path / "r"), "--steps", "1", "--no-progress"]
                + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("genserve report: error:")
    assert all(w in err for w in words), err
    assert not (tmp_path / "r" / "checkpoints").exists()  # failed before any training


def test_roc_curve_agrees_with_scikit_learn() -> None:
    from sklearn.metrics import roc_auc_score

    from report.anomaly import roc_curve

    rng = np.random.default_rng(0)
    normal, anomalous = rng.normal(0, 1, 300), np.round(rng.normal(1, 1, 80), 1)
    fpr, tpr, auroc = roc_curve(normal, anomalous)
    labels = np.r_[np.zeros(300), np.ones(80)]
    assert auroc == pytest.approx(roc_auc_score(labels, np.r_[normal, anomalous]), abs=1e-12)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc, abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert roc_curve(np.zeros(5), np.ones(5))[2] == 1.0
    assert roc_curve(np.zeros(5), np.zeros(5))[2] == 0.5


def test_anomaly_report_uses_the_served_scores(tmp_path: Path) -> None:
    from service.score_files import read_scores
    from service.scoring import score_file
    from training.anomaly import fit_anomaly
    from training.data import save_data

    rng = np.random.default_rng(1)
    normal = save_data(rng.normal(0, 1, (500, 2)), tmp_path / "normal.csv")
    anomalous = save_data(rng.normal(4, 1, (60, 2)), tmp_path / "anomalous.npy")
    model = tmp_path / "detector"
    fit_anomaly(normal, model, model="maf", steps=15, progress=False,
                formats=("torchscript",))  # ONNX export alone would take ~20 s
    out = tmp_path / "anomaly_report"
    assert main(["report", "--out", str(out), "--anomaly-model", str(model),
                 "--normal", str(normal), "--anomalous", str(anomalous)]) == 0
    summary = json.loads((out / "anomaly.json").read_text())
    assert summary["rows"] == {"normal": 500, "anomalous": 60}
    assert summary["auroc"] > 0.9
    score_file(model, normal, tmp_path / "scores.csv")
    flags = read_scores(tmp_path / "scores.csv")["is_anomaly"]
    assert summary["flagged_normal"] == pytest.approx(flags.mean(), abs=1e-12)
    for name in ("anomaly_scores.png", "roc.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            im.verify()
