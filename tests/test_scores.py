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


# --- fitted score kinds on planted local outliers ----------------------------------------------

CENTRES = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0], [4.0, 4.0]])
TARGET_FPR = 0.05
KINDS = {"denoise": "cfm", "dte": "cfm", "latent": "maf"}


def clusters(n: int, seed: int) -> np.ndarray:
    """Four tight clusters (std 0.15, 4 apart): the normal rows."""
    rng = np.random.default_rng(seed)
    return CENTRES[rng.integers(0, 4, n)] + 0.15 * rng.standard_normal((n, 2))


def between(n: int, seed: int) -> np.ndarray:
    """Local outliers: midpoints between two different clusters, as tight as the clusters."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 4, n)
    b = (a + rng.integers(1, 4, n)) % 4
    return (CENTRES[a] + CENTRES[b]) / 2 + 0.15 * rng.standard_normal((n, 2))


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """One artifact per score kind (and nll), fitted on the same 1500 normal rows by
    fit-anomaly's own steps (the trained checkpoint kept in the summary for parity)."""
    import torch

    from training.anomaly_models import export_candidate, score_spec, train_candidate
    from training.anomaly_rows import prepare

    root = tmp_path_factory.mktemp("kinds")
    x = clusters(1500, 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    trained: dict[str, object] = {}
    summaries = {}
    try:
        for kind, model in {**KINDS, "nll": "maf"}.items():
            prep = prepare(x, seed=0, model=model, steps=300)
            if model not in trained:
                trained[model] = train_candidate(prep, model)
            chosen = trained[model]
            spec, latents, selection = score_spec(prep, chosen, kind)
            summaries[kind] = export_candidate(
                prep, chosen, root / f"k-{kind}", target_fpr=TARGET_FPR, score=spec,
                latents=latents, score_selection=selection) | {"checkpoint": chosen.ckpt}
    finally:
        torch.set_num_threads(threads)
    return root, summaries


def test_each_kind_is_served_as_its_manifest_says(kinds) -> None:
    root, summaries = kinds
    for kind, s in summaries.items():
        m = read_manifest(root / f"k-{kind}")
        assert m.manifest_version == 2 and m.score_kind == kind == s["score"]
        assert m.calibration.score == kind
    latent = read_manifest(root / "k-latent")
    assert "encode" in latent.graphs and "latents.safetensors" in latent.files
    assert "encode" not in read_manifest(root / "k-nll").graphs
    weights = summaries["denoise"]["score_selection"]["weights"]
    assert len(weights) == 5 and sum(weights) == pytest.approx(1.0)


def test_planted_local_outliers_rank_above_normal_rows(kinds) -> None:
    """The latent score ranks the midpoints above the NLL does (the flow smears density
    between the clusters; the latent neighbours do not). The denoise and DTE scores of a
    300-step flow-matching model do not (AUROC below 0.5 here): their AUROCs are printed for
    the record, and docs/BENCHMARKS.md reports them on real sets."""
    from training.score_kinds import auroc

    root, _ = kinds
    xn, xo = clusters(1000, 3), between(200, 4)
    got = {}
    for kind in (*KINDS, "nll"):
        rt = open_runtime(root / f"k-{kind}")
        got[kind] = auroc(rt.score(xn), rt.score(xo))
    print("AUROC on planted local outliers:", {k: round(v, 3) for k, v in got.items()})
    assert got["latent"] > max(got["nll"], 0.9), got


def test_calibration_holds_for_each_kind(kinds) -> None:
    """Realised false-positive rate on 4000 fresh normal rows within 3 standard errors of the
    target, the error from the calibration rows' count (300) and the fresh rows' (4000)."""
    root, _ = kinds
    fresh = clusters(4000, 5)
    for kind in (*KINDS, "nll"):
        rt = open_runtime(root / f"k-{kind}")
        n_cal = rt.manifest.calibration.rows
        se = np.sqrt(TARGET_FPR * (1 - TARGET_FPR) * (1 / n_cal + 1 / len(fresh)))
        fpr = rt.anomaly_score(fresh).is_anomaly.mean()
        assert abs(fpr - TARGET_FPR) <= 3 * se, (kind, fpr, se)


def test_denoise_scores_do_not_depend_on_the_batch(kinds) -> None:
    root, _ = kinds
    rt = open_runtime(root / "k-denoise")
    x = np.concatenate([clusters(40, 6), between(10, 7)])
    whole = rt.score(x, seed=11)
    one_by_one = np.concatenate([rt.score(x[i:i + 1], seed=11, rows=np.array([i]))
                                 for i in range(len(x))])
    split = np.concatenate([rt.score(x[:17], seed=11),
                            rt.score(x[17:], seed=11, rows=np.arange(17, len(x)))])
    mixed = rt.score(np.concatenate([x, x]), seed=np.r_[np.full(50, 11), np.full(50, 12)],
                     rows=np.r_[np.arange(50), np.arange(50)])
    np.testing.assert_array_equal(one_by_one, whole)
    np.testing.assert_array_equal(split, whole)
    np.testing.assert_array_equal(mixed[:50], whole)
    assert not np.array_equal(mixed[50:], whole)  # another seed draws other noise


def test_onnx_score_equals_the_in_process_one(kinds) -> None:
    from safetensors.numpy import load_file

    from training.score_kinds import in_process_scores

    root, summaries = kinds
    x = np.concatenate([clusters(30, 8), between(10, 9)])
    for kind in KINDS:
        rt = open_runtime(root / f"k-{kind}")
        ckpt = summaries[kind]["checkpoint"]
        latents = (load_file(str(root / f"k-{kind}" / "latents.safetensors"))["z"]
                   if kind == "latent" else None)
        mine = in_process_scores(ckpt, rt.manifest.anomaly, x, latents=latents)
        np.testing.assert_allclose(rt.score(x), mine, rtol=1e-3, atol=1e-3, err_msg=kind)


@pytest.fixture(scope="module")
def kinds_server(kinds, tmp_path_factory: pytest.TempPathFactory):
    from service.devserver import running_server

    root, _ = kinds
    served = tmp_path_factory.mktemp("kinds-served")
    for kind in KINDS:
        shutil.copytree(root / f"k-{kind}", served / f"k-{kind}")
    with running_server(served, tmp_path_factory.mktemp("kinds-log") / "server.log") as s:
        yield s


def test_http_and_grpc_serve_the_in_process_score(kinds, kinds_server) -> None:
    import tritonclient.grpc as triton

    root, _ = kinds
    x = np.concatenate([clusters(12, 10), between(4, 11)]).astype(np.float32)
    client = triton.InferenceServerClient(kinds_server.grpc_address)
    try:
        for kind in KINDS:
            want = open_runtime(root / f"k-{kind}").score(x.astype(np.float64), seed=5)
            status, body = kinds_server.post("/anomaly_score", {"model": f"k-{kind}",
                                                                "x": x.tolist(), "seed": 5})
            assert status == 200 and body["score"] == kind
            np.testing.assert_allclose(body["scores"], want, rtol=1e-6, err_msg=kind)
            x_in = triton.InferInput("x", list(x.shape), "FP32")
            x_in.set_data_from_numpy(x)
            r = client.infer(f"k-{kind}.anomaly_score", [x_in], parameters={"seed": 5})
            np.testing.assert_allclose(r.as_numpy("scores"), want, rtol=1e-6, err_msg=kind)
            assert r.get_response().parameters["score"].string_param == kind
    finally:
        client.close()


def test_auto_follows_its_protocol_and_the_budget_drops_candidates(tmp_path: Path) -> None:
    """--score auto on the clusters under a budget that the first training alone outlasts
    (10 ms): the smoothing search and the flow-matching pair are dropped (and said so); the
    kind served is the one the protocol's rule picks from the statistics it reports
    (docs/anomaly-selection-protocol.md)."""
    from training.anomaly import fit_anomaly
    from training.anomaly_auto import AUTO_MARGIN, AUTO_ORDER

    s = fit_anomaly(clusters(600, 12), tmp_path / "auto", score="auto", model="maf",
                    steps=150, progress=False, budget_s=0.01)
    assert s["budget"]["dropped"] == ["smoothing search",
                                      "flow-matching candidates (denoise, dte)"]
    stats = s["score_selection"]["auto"]
    assert set(stats) == {"nll", "latent"}
    best = "nll"
    for kind in AUTO_ORDER[1:]:
        if kind in stats and stats[kind] > stats[best] + AUTO_MARGIN:
            best = kind
    assert s["score_selection"]["chosen"] == best == s["score"]
    assert read_manifest(tmp_path / "auto").score_kind == best


def test_score_file_keys_denoise_noise_by_the_rows_place_in_the_file(kinds, tmp_path) -> None:
    """`genserve score` draws a row's denoise noise from its index in the file: the scores do
    not depend on how the file is cut into graph calls, and equal the in-process scores of
    the whole file (seed 0, rows 0..n-1), up to float32 rounding of other batch sizes."""
    import pyarrow.parquet as pq

    from service.scoring import score_file

    root, _ = kinds
    x = np.concatenate([clusters(40, 10), between(10, 11)])
    np.save(tmp_path / "x.npy", x)
    got = {}
    for rows in (7, 4096):
        out = tmp_path / f"s{rows}.parquet"
        score_file(root / "k-denoise", tmp_path / "x.npy", out, batch_rows=rows,
                   progress=False)
        got[rows] = pq.read_table(out).column("score").to_numpy()
    whole = open_runtime(root / "k-denoise").score(x)
    np.testing.assert_allclose(got[7], got[4096], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[4096], whole, rtol=1e-5, atol=1e-6)
    assert not np.allclose(got[7][:7], got[7][7:14])  # rows 0..6 and 7..13 draw other noise
