"""fit-anomaly and batch scoring: planted outliers found, calibrated FPR, streaming is exact.

One small model is fitted once for the module (a correlated 5-D Gaussian, 4000 normal rows,
MAF with a 300-step budget, TorchScript export to keep the test fast; ONNX holds the same
graphs) and every test scores through it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from artifact.tables import DataError
from service.score_files import HEADER, read_scores
from service.scoring import score_file
from training.anomaly import fit_anomaly, format_summary
from training.anomaly_models import export_candidate
from training.anomaly_rows import choose_plan, column_noise

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")

DIM = 5
TARGET_FPR = 0.05
AUROC_BOUND = 0.95


def _gaussian(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((DIM, DIM))
    cov = a @ a.T / DIM + 0.2 * np.eye(DIM)
    return np.zeros(DIM) + np.arange(DIM), np.linalg.cholesky(cov)


def normal_rows(n: int, seed: int) -> np.ndarray:
    mean, chol = _gaussian()
    return mean + np.random.default_rng(seed).standard_normal((n, DIM)) @ chol.T


def planted_outliers(n: int, seed: int) -> np.ndarray:
    """Rows at Mahalanobis radius 6 (chi-square tail ~1e-6 for 5-D): clear outliers."""
    mean, chol = _gaussian()
    z = np.random.default_rng(seed).standard_normal((n, DIM))
    z *= 6.0 / np.linalg.norm(z, axis=1, keepdims=True)
    return mean + z @ chol.T


def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUROC (no sklearn dependency in the test)."""
    pos, neg = s[y == 1], s[y == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    import torch

    root = tmp_path_factory.mktemp("anomaly")
    data = root / "normal.csv"
    np.savetxt(data, normal_rows(4000, 1), delimiter=",", header="a,b,c,d,e", comments="")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small net: threads only add overhead
    try:
        summary = fit_anomaly(data, root / "detector", target_fpr=TARGET_FPR, model="maf",
                              steps=300, formats=("torchscript",), progress=False)
    finally:
        torch.set_num_threads(threads)
    return root / "detector", summary


def test_summary_and_manifest(fitted: tuple[Path, dict]) -> None:
    model_dir, s = fitted
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["calibration"]["target_fpr"] == TARGET_FPR
    assert manifest["calibration"]["threshold"] == pytest.approx(s["threshold"])
    # 4000 rows: 70/15/15 split, calibration on its own rows (not the early-stopping ones)
    assert s["rows"] == {"total": 4000, "train": 2800, "val": 600, "calibration": 600,
                         "calibration_is_val": False, "train_noisy_copies": 8,
                         "val_copies": 1, "val_for_selection": 600}
    assert s["model_type"] == "maf" and math.isfinite(s["val_nll"])
    # a 5-D Gaussian's entropy bounds the validation NLL from below (up to noise)
    mean, chol = _gaussian()
    entropy = 0.5 * DIM * math.log(2 * math.pi * math.e) + np.log(np.diag(chol)).sum()
    assert entropy - 0.3 < s["val_nll"] < entropy + 0.5
    text = format_summary(s)
    assert "validation NLL" in text and "threshold" in text and "false-positive" in text


def test_planted_outliers_are_found(fitted: tuple[Path, dict], tmp_path: Path) -> None:
    model_dir, _ = fitted
    x = np.concatenate([normal_rows(1000, 2), planted_outliers(40, 3)])
    y = np.r_[np.zeros(1000), np.ones(40)]
    order = np.random.default_rng(4).permutation(len(x))
    x, y = x[order], y[order]
    np.save(tmp_path / "mixed.npy", x)
    info = score_file(model_dir, tmp_path / "mixed.npy", tmp_path / "scores.csv")
    out = read_scores(tmp_path / "scores.csv")
    assert info["rows"] == len(x) == len(out["score"])
    assert _auroc(y, out["score"]) > AUROC_BOUND
    assert out["is_anomaly"][y == 1].mean() > 0.9  # radius-6 rows are flagged at the threshold


def test_realised_fpr_on_fresh_normal_rows(fitted: tuple[Path, dict], tmp_path: Path) -> None:
    """Fresh normal rows are flagged at about the target rate.

    The threshold is a quantile of 600 calibration rows and the rate is measured on 5000
    fresh rows, so the realised rate has std about sqrt(p(1-p)(1/600 + 1/5000)) = 0.0094 at
    p = 0.05; the tolerance is 3.5 of those.
    """
    model_dir, _ = fitted
    np.save(tmp_path / "fresh.npy", normal_rows(5000, 5))
    score_file(model_dir, tmp_path / "fresh.npy", tmp_path / "fresh.csv")
    out = read_scores(tmp_path / "fresh.csv")
    p, n_cal, n = TARGET_FPR, 600, 5000
    tol = 3.5 * math.sqrt(p * (1 - p) * (1 / n_cal + 1 / n))
    assert abs(out["is_anomaly"].mean() - p) < tol
    # percentiles are calibrated too: about half the fresh rows lie below the median
    assert abs(np.mean(out["percentile"] < 50) - 0.5) < 0.05
    assert out["percentile"].min() >= 0 and out["percentile"].max() <= 100


def test_scores_are_the_services_numbers(fitted: tuple[Path, dict], tmp_path: Path) -> None:
    from service.runtime import open_runtime

    model_dir, s = fitted
    x = np.concatenate([normal_rows(50, 6), planted_outliers(5, 7)])
    np.save(tmp_path / "x.npy", x)
    score_file(model_dir, tmp_path / "x.npy", tmp_path / "x.csv")
    out = read_scores(tmp_path / "x.csv")
    rt = open_runtime(model_dir)
    res = rt.anomaly_score(x)
    np.testing.assert_array_equal(out["score"], res.scores)  # repr round-trips exactly
    np.testing.assert_array_equal(out["percentile"], res.percentile)
    np.testing.assert_array_equal(out["is_anomaly"], res.is_anomaly)
    # the score is the NLL in nats; the flag is score > the calibrated threshold
    np.testing.assert_allclose(out["score"], -rt.log_likelihood(x).log_prob)
    np.testing.assert_array_equal(out["is_anomaly"], out["score"] > s["threshold"])
    # per-dimension option: score and threshold divided by the width, flags unchanged
    info = score_file(model_dir, tmp_path / "x.npy", tmp_path / "pd.csv", per_dim=True)
    per_dim = read_scores(tmp_path / "pd.csv")
    np.testing.assert_allclose(per_dim["score"], out["score"] / DIM, rtol=1e-15)
    np.testing.assert_array_equal(per_dim["is_anomaly"], out["is_anomaly"])
    assert info["threshold"] == pytest.approx(s["threshold"] / DIM)


def test_chunked_equals_unchunked(fitted: tuple[Path, dict], tmp_path: Path) -> None:
    """Reading in chunks of 1, 7, 33 or 100 rows gives the unchunked output byte for byte."""
    from service.runtime import open_runtime

    model_dir, _ = fitted
    rt = open_runtime(model_dir)
    x = np.concatenate([normal_rows(95, 8), planted_outliers(5, 9)])
    x = x[np.random.default_rng(10).permutation(len(x))]
    csv_in = tmp_path / "in.csv"
    np.savetxt(csv_in, x, delimiter=",", fmt="%.17g", header="a,b,c,d,e", comments="")
    np.save(tmp_path / "in.npy", x)
    np.savez(tmp_path / "in.npz", X=x)
    np.savez_compressed(tmp_path / "inz.npz", X=x)
    whole = tmp_path / "whole.csv"
    score_file(model_dir, csv_in, whole, chunk_rows=1 << 20, batch_rows=32)
    reference = whole.read_text()
    lines = reference.splitlines()
    assert lines[0] == ",".join(HEADER) and len(lines) == 1 + len(x)
    for src in (csv_in, tmp_path / "in.npy", tmp_path / "in.npz", tmp_path / "inz.npz"):
        for chunk in (7, 1, 100, 33):
            out = tmp_path / f"{src.name}-{chunk}.csv"
            info = score_file(model_dir, src, out, chunk_rows=chunk, batch_rows=32, runtime=rt)
            assert info["rows"] == len(x)
            assert out.read_text() == reference, (src.name, chunk)  # row for row, same order
    # order preserved: one row per graph call makes every row independent of its neighbours,
    # so reversing the input reverses the output exactly
    np.save(tmp_path / "rev.npy", x[::-1])
    score_file(model_dir, tmp_path / "in.npy", tmp_path / "one.csv", batch_rows=1, runtime=rt)
    score_file(model_dir, tmp_path / "rev.npy", tmp_path / "rev.csv", batch_rows=1, runtime=rt)
    one = (tmp_path / "one.csv").read_text().splitlines()
    assert (tmp_path / "rev.csv").read_text().splitlines()[1:] == one[1:][::-1]
    # graph calls of other sizes agree to float32 rounding, with the same flags
    a, b = read_scores(whole), read_scores(tmp_path / "one.csv")
    np.testing.assert_allclose(a["score"], b["score"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(a["is_anomaly"], b["is_anomaly"])


def test_bad_files_fail_clearly_and_leave_no_output(fitted: tuple[Path, dict],
                                                    tmp_path: Path) -> None:
    model_dir, _ = fitted
    out = tmp_path / "out.csv"
    cases = {
        "short.csv": ("a,b,c,d,e\n1,2,3,4,5\n1,2,3,4\n", "row 3 has 4 columns"),
        "text.csv": ("1,2,3,4,5\n1,2,x,4,5\n", "row 2, column 3"),
        "nan.csv": ("1,2,3,4,5\n1,2,3,nan,5\n", "row 2, column 4"),
        "empty.csv": ("a,b,c,d,e\n", "no data rows"),
        "data.txt": ("1,2,3,4,5\n", ".csv, .npy, .npz or .parquet"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            score_file(model_dir, tmp_path / name, out, chunk_rows=1)
        assert not out.exists()
        assert not list(tmp_path.glob(".out.csv.*"))  # the temporary file is gone too
    np.save(tmp_path / "wide.npy", np.zeros((3, DIM + 1)))
    with pytest.raises(DataError, match=f"6 columns, but the model expects {DIM}"):
        score_file(model_dir, tmp_path / "wide.npy", out)
    bad = np.zeros((30, DIM))
    bad[17, 2] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    with pytest.raises(DataError, match="row 18, column 3"):
        score_file(model_dir, tmp_path / "inf.npy", out, chunk_rows=7)
    np.savez(tmp_path / "nox.npz", data=np.zeros((3, DIM)))
    with pytest.raises(DataError, match="no array named 'X'"):
        score_file(model_dir, tmp_path / "nox.npz", out)
    with pytest.raises(DataError, match="not found"):
        score_file(model_dir, tmp_path / "missing.csv", out)
    # an existing output is refused without overwrite, and replaced only by a complete one
    out.write_text("keep me\n")
    with pytest.raises(DataError, match="exists; pass --overwrite"):
        score_file(model_dir, tmp_path / "x.npy", out)
    with pytest.raises(DataError, match="row 18, column 3"):
        score_file(model_dir, tmp_path / "inf.npy", out, chunk_rows=7, overwrite=True)
    assert out.read_text() == "keep me\n"


def test_defaults_policy() -> None:
    small, medium = choose_plan(300, 9), choose_plan(5000, 21)
    large, huge = choose_plan(50_000, 8), choose_plan(500_000, 200)
    assert [p.tier for p in (small, medium, large, huge)] == [
        "small", "medium", "large", "very large"]
    assert small.hidden_features < medium.hidden_features < large.hidden_features
    assert small.weight_decay > medium.weight_decay > large.weight_decay
    assert huge.hidden_features == 256 and choose_plan(100, 64).hidden_features == 64
    assert small.candidates == ("maf", "nsf") and choose_plan(100, 1).candidates == ("maf",)


def test_column_noise_classifies_columns() -> None:
    rng = np.random.default_rng(0)
    x = np.stack([
        rng.standard_normal(400),  # continuous
        rng.integers(1, 11, 400).astype(float),  # ratings 1..10: step 1
        np.full(400, 3.5),  # constant
        0.25 * rng.integers(0, 5, 400),  # a grid of step 0.25
    ], axis=1)
    x = np.concatenate([x, x[:, :1]], axis=1)  # an exact duplicate of column 0
    noise = column_noise(x, 0.05)
    assert noise.discrete.tolist() == [False, True, True, True, False]
    np.testing.assert_allclose(noise.step, [0, 1, 1, 0.25, 0])
    assert noise.sigma[0] == pytest.approx(0.05 * x[:, 0].std())
    noisy = noise.apply(x, 3, rng)
    assert noisy.shape == (1200, 5)
    assert np.linalg.matrix_rank(np.cov(noisy.T)) == 5  # the duplicate no longer collapses
    assert np.abs(noisy[:, 1] - np.tile(x[:, 1], 3)).max() <= 0.5
    smooth = column_noise(x, 0.05, smoothing=0.2)  # kernel smoothing on every column
    np.testing.assert_array_equal(smooth.step, noise.step)  # dequantization unchanged
    np.testing.assert_allclose(smooth.sigma, 0.2 * x.std(0))
    assert smooth.sigma[2] == 0  # a constant column stays a unit-step grid, not a spike


def test_fit_anomaly_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="at least 10"):
        fit_anomaly(np.zeros((5, 2)), tmp_path / "m", progress=False)
    x = np.ones((50, 2))
    x[7, 1] = np.nan
    with pytest.raises(DataError, match="row 8, column 2"):
        fit_anomaly(x, tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match="target_fpr"):
        fit_anomaly(np.zeros((50, 2)), tmp_path / "m", target_fpr=1.5, progress=False)
    with pytest.raises(ValueError, match="unknown model type"):
        fit_anomaly(np.zeros((50, 2)), tmp_path / "m", model="nope", progress=False)
    assert not (tmp_path / "m").exists()


def test_labelled_npz_trains_on_normal_rows_and_picks_by_validation(tmp_path: Path) -> None:
    """An .npz with y uses its y == 0 rows; the default tries maf and nsf, keeps the best."""
    x = np.concatenate([normal_rows(200, 11), planted_outliers(30, 12)])
    np.savez(tmp_path / "labelled.npz", X=x, y=np.r_[np.zeros(200), np.ones(30)])
    s = fit_anomaly(tmp_path / "labelled.npz", tmp_path / "m", steps=20,
                    formats=("torchscript",), progress=False)
    assert s["rows"]["total"] == 200 and "200 rows with y == 0" in s["note"]
    assert s["rows"]["calibration_is_val"] and s["rows"]["val"] == 40
    tried = {(c["model_type"], c["smoothing"]): c["val_nll"] for c in s["candidates"]}
    unsmoothed = {k: v for (k, sm), v in tried.items() if sm == 0}
    assert set(unsmoothed) == {"maf", "nsf"}
    winner = min(unsmoothed, key=unsmoothed.get)  # then its smoothing scales, by default
    assert list(tried)[2:] == [(winner, 0.2), (winner, 0.5)]
    assert (s["model_type"], s["plan"]["smoothing"]) == min(tried, key=tried.get)


def test_unseen_categories_are_left_out_of_model_selection() -> None:
    """A validation row with a never-trained value of a discrete column does not drive early
    stopping (its NLL measures extrapolation); every row still counts for calibration."""
    from training.anomaly_rows import prepare, split_rows

    rng = np.random.default_rng(0)
    x = np.stack([rng.standard_normal(400), np.zeros(400)], axis=1)
    _, val_idx, _ = split_rows(400, 3)
    x[val_idx[:2], 1] = 13.0  # a rare flag value that only validation rows show
    prep = prepare(x, seed=3)
    assert prep.noise.step[1] == 1.0  # constant in training: unit step
    assert prep.rows["val"] == 80 and prep.rows["val_for_selection"] == 78
    assert len(prep.x_cal) == 80 and (prep.x_cal[:, 1] == 13).sum() == 2  # calibration keeps them


def test_ensemble_serves_an_exact_mixture_chosen_by_validation(tmp_path: Path) -> None:
    """ensemble=k: the served model is an equal-weight mixture of the trained flows, whose
    served log-likelihood is the log of the members' mean density (exact, normalised)."""
    from scipy.special import logsumexp

    from service.runtime import open_runtime
    from training.anomaly_models import mix_candidates, train_candidate
    from training.anomaly_rows import prepare
    from training.evaluate import data_log_prob

    x = normal_rows(600, 21)
    s = fit_anomaly(x, tmp_path / "e", ensemble=2, model="maf", steps=40, progress=False,
                    target_fpr=TARGET_FPR, formats=("torchscript",))
    tried = {c["model_type"] + "/" + str(c["seed"]): c["val_nll"] for c in s["candidates"]}
    assert list(tried) == ["maf/0", "maf/1000", "mixture(maf+maf)/0+1000"]
    assert s["model_type"] == "mixture(maf+maf)" and s["val_nll"] > 0
    # the mixture's NLL is never worse than its worse member's, row by row and so on average
    assert tried["mixture(maf+maf)/0+1000"] <= max(tried["maf/0"], tried["maf/1000"])

    prep = prepare(x, seed=0, model=["maf", "nsf"], steps=30)
    members = [train_candidate(prep, "maf", 0), train_candidate(prep, "nsf", 0)]
    mix = mix_candidates(prep, members)
    export_candidate(prep, mix, tmp_path / "m", target_fpr=TARGET_FPR)
    rt = open_runtime(tmp_path / "m")
    assert rt.manifest.model_type == "mixture(maf+nsf)" and rt.family == "flow"
    rows = np.concatenate([normal_rows(20, 5), planted_outliers(5, 6)])
    by_members = logsumexp([data_log_prob(m.ckpt, rows)["log_prob"] for m in members], 0)
    np.testing.assert_allclose(rt.log_likelihood(rows).log_prob, by_members - math.log(2),
                               rtol=1e-4, atol=1e-4)
    drawn = rt.sample(300, seed=3)
    assert drawn.shape == (300, DIM) and np.isfinite(drawn).all()
    assert np.array_equal(drawn, rt.sample(300, seed=3))
    with pytest.raises(ValueError, match="at least 2 columns"):
        fit_anomaly(x[:, :1], tmp_path / "one", ensemble=2, steps=5, progress=False)


def test_smoothing_search_keeps_the_validation_rows_and_the_lowest_nll(tmp_path: Path,
                                                                       capsys) -> None:
    """smoothing_search: the winning type is trained again with Gaussian smoothing on every
    column; the same validation rows judge every scale, and the export is the lowest NLL."""
    from cli import main
    from training.anomaly_rows import prepare, resmooth

    x = normal_rows(400, 31)
    x[:, 0] = np.round(x[:, 0])  # one discrete column (unit grid), dequantized as before
    prep = prepare(x, seed=4, model="maf", steps=10)
    smooth = resmooth(prep, 0.3, seed=4)
    np.testing.assert_array_equal(smooth.xv, prep.xv)  # same validation rows, same noise
    assert smooth.plan.smoothing == 0.3 and prep.plan.smoothing == 0.0
    np.testing.assert_array_equal(smooth.noise.step, prep.noise.step)
    # the same draws, scaled: the added noise is Gaussian of the new std on every column
    extra = (smooth.xt - prep.xt) / (smooth.noise.sigma - prep.noise.sigma)
    assert extra.shape == prep.xt.shape
    np.testing.assert_allclose(extra.std(0), 1.0, atol=0.03)
    np.testing.assert_allclose(smooth.noise.sigma, 0.3 * prep.x_train.std(0))

    s = fit_anomaly(x, tmp_path / "m", model="maf", steps=40, smoothing_search=(0.3, 0.7),
                    seed=4, formats=("torchscript",), progress=False)
    tried = {c["smoothing"]: c["val_nll"] for c in s["candidates"]}
    assert list(tried) == [0.0, 0.3, 0.7] and all(map(math.isfinite, tried.values()))
    best = min(tried, key=tried.get)
    assert s["plan"]["smoothing"] == best  # the export records the scale it was trained at
    assert "smoothing 0.3" in format_summary(s)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["model_type"] == "maf"

    for bad in (0.0, -0.1, float("nan"), 2.5):
        with pytest.raises(ValueError, match=r"smoothing scales must be in \(0, 2\]"):
            fit_anomaly(x, tmp_path / "bad", smoothing_search=(bad,), progress=False)
    with pytest.raises(ValueError, match="cannot be combined"):
        fit_anomaly(x, tmp_path / "bad", ensemble=2, smoothing_search=(0.2,), progress=False)
    np.save(tmp_path / "x.npy", x)
    assert main(["fit-anomaly", str(tmp_path / "x.npy"), "--out", str(tmp_path / "bad"),
                 "--smoothing-search", "3"]) == 2
    assert "smoothing scales must be in (0, 2]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    # --no-smoothing-search: the candidates at smoothing 0 only
    assert main(["fit-anomaly", str(tmp_path / "x.npy"), "--out", str(tmp_path / "off"),
                 "--model", "maf", "--steps", "10", "--no-smoothing-search", "--format",
                 "torchscript", "--no-progress"]) == 0
    line = next(t for t in capsys.readouterr().err.splitlines() if "candidates by" in t)
    assert line.split("candidates by validation NLL: ")[1].startswith("maf/0 ")
    assert line.count("maf/") == 1 and "smoothing" not in line


def test_manifest_names_the_columns_scoring_reads(fitted: tuple[Path, dict],
                                                  tmp_path: Path) -> None:
    """A model fitted on a CSV with a header records its column names; scoring a Parquet
    table takes those columns by name, whatever their order and the other columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from service.runtime import open_runtime

    model_dir, _ = fitted
    rt = open_runtime(model_dir)
    assert rt.manifest.data.columns == ["a", "b", "c", "d", "e"]
    x = np.concatenate([normal_rows(40, 12), planted_outliers(4, 13)])
    cols = {"id": pa.array(np.arange(len(x))), "z": pa.array(np.ones(len(x)))}
    cols.update({name: pa.array(x[:, j]) for j, name in reversed(list(enumerate("abcde")))})
    pq.write_table(pa.table(cols), tmp_path / "t.parquet")
    info = score_file(model_dir, tmp_path / "t.parquet", tmp_path / "s.csv", keep=["id"])
    out = read_scores(tmp_path / "s.csv")
    np.testing.assert_array_equal(out["score"], rt.anomaly_score(x).scores)
    assert info["rows"] == len(x) and info["anomalies"] >= 4
