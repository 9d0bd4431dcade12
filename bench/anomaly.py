"""Anomaly-detection benchmark: our likelihood models next to classical detectors.

    python -m bench.anomaly [--sets NAME ...] [--seeds 0 1 2] [--jobs N] [--quick] [--scores]
                            [--add] [--no-write]

Sets: the six ADBench classical tables in ``../shared/data/adbench/`` (cardio, thyroid, Pima,
WBC, breastw, vertebral) and two scikit-learn tables: breast_cancer (benign rows normal,
malignant rows anomalies) and digits (digit 0 normal, every other digit an anomaly).

Protocol (ADBench's "semi-supervised" setting, as in that folder's README): for each seed,
a random 70 % of the normal rows is the training set; the test set is the other 30 % of the
normal rows plus every anomaly. Every detector sees the same training rows and scores the
same test rows; AUROC and AUPRC (average precision, anomalies positive) are averaged over 3
seeds (mean ± std).

Detectors:

* **fit-anomaly (default)**: ``training.anomaly`` end to end: its own train/validation split of
  the training rows, its defaults policy, its candidate choice by validation NLL (model type,
  then the winning type's smoothing scale among 0, 0.2 and 0.5), calibration,
  export (TorchScript here, to keep the run short; ONNX computes the same graphs) and scoring
  through ``service.runtime.ModelRuntime.anomaly_score`` -- the numbers ``/anomaly_score``
  serves.
* **maf / nsf / realnvp**: the same pipeline with the model type fixed (``fit_anomaly(...,
  model=TYPE)``; the default's candidates are these runs, so nothing is trained twice), scored
  with the torch model (NLL in nats, data units).
* classical (scikit-learn, inputs standardized on the training rows except for the isolation
  forest): IsolationForest, LocalOutlierFactor(novelty=True), OneClassSVM(gamma="scale"),
  k-nearest-neighbour mean distance (k = 5) and GaussianMixture (full covariance, components
  in {1, 2, 4, 8} chosen by BIC on the training rows). Library defaults otherwise. PyOD's
  ECOD and COPOD (parameter-free, on the raw rows).
* ``--scores``: ``fit-anomaly --score auto`` (``training.anomaly_auto.choose_score_kind``) and each
  score kind it fitted (``nll``, ``latent``, ``denoise``, ``dte``), scored with the torch
  models. ``--add`` runs only the classical detectors (and ``--scores``) and merges their
  rows into the JSON's units, leaving the flows' rows as they were.

Nothing here looks at the test rows to choose anything: our defaults are fixed in
``training/anomaly.py`` and the default's model type is picked on fit-anomaly's validation
rows (normal rows carved from the training set).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ADBENCH = (ROOT / ".." / "shared" / "data" / "adbench").resolve()
JSON_PATH = ROOT / "docs" / "bench" / "anomaly.json"
SECTION = "anomaly"

ADBENCH_SETS = {
    "cardio": "6_cardio.npz",
    "thyroid": "38_thyroid.npz",
    "pima": "29_Pima.npz",
    "wbc": "42_WBC.npz",
    "breastw": "4_breastw.npz",
    "vertebral": "39_vertebral.npz",
}
ALL_SETS = [*ADBENCH_SETS, "breast_cancer", "digits"]
NORMAL_DIGIT = 0
SEEDS = (0, 1, 2)
TRAIN_FRACTION = 0.7
OUR_TYPES = ("maf", "nsf", "realnvp")
DEFAULT = "fit-anomaly (default)"
CLASSICAL = ("IsolationForest", "LOF (novelty)", "OneClassSVM", "kNN (k=5)", "GaussianMixture",
             "ECOD", "COPOD")
PYOD = ("ECOD", "COPOD")  # PyOD's parameter-free detectors, on the raw rows
SCORE_KINDS = ("nll", "latent", "denoise", "dte")


# --------------------------------------------------------------------------- data


def load_set(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``x: (rows, dim)`` float64 and ``y: (rows,)`` with 1 = anomaly."""
    if name in ADBENCH_SETS:
        with np.load(ADBENCH / ADBENCH_SETS[name]) as f:
            return f["X"].astype(np.float64), (f["y"] != 0).astype(int)
    import sklearn.datasets

    if name == "breast_cancer":
        bunch = sklearn.datasets.load_breast_cancer()
        return bunch.data.astype(np.float64), (bunch.target == 0).astype(int)  # 0 = malignant
    if name == "digits":
        bunch = sklearn.datasets.load_digits()
        return bunch.data.astype(np.float64), (bunch.target != NORMAL_DIGIT).astype(int)
    raise ValueError(f"unknown set {name!r}; choose from {', '.join(ALL_SETS)}")


def split(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training indices (70 % of the normal rows) and test indices (the rest + anomalies)."""
    rng = np.random.default_rng(seed)
    normal = rng.permutation(np.flatnonzero(y == 0))
    n_train = round(TRAIN_FRACTION * len(normal))
    test = np.sort(np.concatenate([normal[n_train:], np.flatnonzero(y == 1)]))
    return np.sort(normal[:n_train]), test


# --------------------------------------------------------------------------- detectors


def _metrics(y: np.ndarray, score: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    score = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=np.inf, posinf=1e300)
    return {"auroc": float(roc_auc_score(y, score)),
            "auprc": float(average_precision_score(y, score))}


def _classical(name: str, x_train: np.ndarray, x_test: np.ndarray, seed: int
               ) -> tuple[np.ndarray, float, float]:
    """Fit on ``x_train``; anomaly scores of ``x_test`` (higher = more anomalous)."""
    from sklearn.ensemble import IsolationForest
    from sklearn.mixture import GaussianMixture
    from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import OneClassSVM

    t0 = time.perf_counter()
    scaler = StandardScaler().fit(x_train)
    xt, xs = scaler.transform(x_train), scaler.transform(x_test)
    if name == "IsolationForest":
        model = IsolationForest(random_state=seed).fit(x_train)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        score = -model.score_samples(x_test)
    elif name == "LOF (novelty)":
        model = LocalOutlierFactor(novelty=True).fit(xt)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        score = -model.score_samples(xs)
    elif name == "OneClassSVM":
        model = OneClassSVM(gamma="scale").fit(xt)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        score = -model.decision_function(xs)
    elif name == "kNN (k=5)":
        model = NearestNeighbors(n_neighbors=5).fit(xt)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        score = model.kneighbors(xs)[0].mean(1)
    elif name in PYOD:
        from pyod.models.copod import COPOD
        from pyod.models.ecod import ECOD

        model = (ECOD if name == "ECOD" else COPOD)().fit(x_train)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        score = model.decision_function(x_test)
    elif name == "GaussianMixture":
        fits = [GaussianMixture(k, covariance_type="full", random_state=seed).fit(xt)
                for k in (1, 2, 4, 8) if k <= len(xt) // 2]
        model = min(fits, key=lambda m: m.bic(xt))
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        score = -model.score_samples(xs)
    else:
        raise ValueError(name)
    return score, fit_s, time.perf_counter() - t1


def run_unit(set_name: str, seed: int, quick: bool = False, ensemble: int = 1,
             scores: bool = False, add: bool = False) -> list[dict[str, Any]]:
    """Every detector on one (set, seed) split; with ``ensemble`` > 1 also fit-anomaly's
    ``--ensemble`` (the default's candidates, ``ensemble`` seeds each, served as a mixture);
    with ``scores`` also ``--score auto`` and each score kind it fitted. ``add``: only the
    classical detectors and the score kinds (rows merged into an earlier run's)."""
    import torch

    torch.set_num_threads(1)
    from service.runtime import open_runtime
    from training.anomaly_models import (
        DEFAULT_SMOOTHING_SEARCH,
        ensemble_candidates,
        export_candidate,
        search_smoothing,
        select,
        train_candidate,
    )
    from training.anomaly_rows import prepare
    from training.evaluate import data_log_prob

    x, y = load_set(set_name)
    train, test = split(y, seed)
    x_train, x_test, y_test = x[train], x[test], y[test]
    base = {"set": set_name, "seed": seed, "dim": int(x.shape[1]), "train_rows": len(train),
            "test_rows": len(test), "test_anomalies": int(y_test.sum())}
    out: list[dict[str, Any]] = []
    for name in CLASSICAL:
        score, fit_s, score_s = _classical(name, x_train, x_test, seed)
        out.append(base | {"detector": name, "fit_seconds": fit_s, "score_seconds": score_s}
                   | _metrics(y_test, score))

    if scores:
        out += score_kind_rows(base, x_train, x_test, y_test, seed, quick)
    if add:
        return out
    prep = prepare(x_train, seed=seed, steps=60 if quick else None)
    trained = {}
    for kind in OUR_TYPES:
        cand = train_candidate(prep, kind, seed)
        trained[kind] = cand
        t1 = time.perf_counter()
        nll = -data_log_prob(cand.ckpt, x_test)["log_prob"]
        out.append(base | {"detector": kind, "fit_seconds": cand.entry["seconds"],
                           "score_seconds": time.perf_counter() - t1,
                           "val_nll": cand.entry["val_nll"], "steps": cand.entry["steps"],
                           "best_step": cand.entry["best_step"]} | _metrics(y_test, nll))
    pool = [trained[k] for k in prep.plan.candidates]
    # fit-anomaly's defaults: the best type, then its smoothing scale, by validation NLL
    chosen = select(pool)
    best_prep, best, extra = search_smoothing(prep, chosen, DEFAULT_SMOOTHING_SEARCH, seed)
    with tempfile.TemporaryDirectory(prefix="bench-anomaly-") as tmp:
        summary = export_candidate(best_prep, best, Path(tmp) / "model",
                                   formats=("torchscript",),
                                   tried=[c.entry for c in [*pool, *extra]])
        t1 = time.perf_counter()
        rt = open_runtime(Path(tmp) / "model", threads=1)
        res = rt.anomaly_score(x_test)
        score_s = time.perf_counter() - t1
    normal_test = y_test == 0
    out.append(base | {
        "detector": DEFAULT,
        "fit_seconds": summary["fit_seconds"] + summary["export_seconds"],
        "score_seconds": score_s,
        "chosen": summary["model_type"] + (f" (smoothing {best.entry['smoothing']:g})"
                                           if best.entry["smoothing"] else ""),
        "val_nll": summary["val_nll"],
        "val_nll_by_smoothing": {f"{c.entry['smoothing']:g}": c.entry["val_nll"]
                                 for c in [chosen, *extra]},
        "threshold": summary["threshold"],
        "test_normal_flagged": float(res.is_anomaly[normal_test].mean()),
        "test_anomalies_flagged": float(res.is_anomaly[~normal_test].mean()),
        "plan": summary["plan"],
        "columns_discrete": len(summary["columns"]["discrete_columns"]),
    } | _metrics(y_test, res.scores))
    if ensemble > 1:  # the same seed-`seed` members, plus ensemble - 1 more seeds of each
        members = [c for k in prep.plan.candidates for c in
                   [trained[k], *(train_candidate(prep, k, seed + 1000 * j)
                                  for j in range(1, ensemble))]]
        mixed = select(ensemble_candidates(prep, members))
        t1 = time.perf_counter()
        nll = -data_log_prob(mixed.ckpt, x_test)["log_prob"]
        out.append(base | {"detector": ensemble_name(ensemble),
                           "fit_seconds": mixed.entry["seconds"],
                           "score_seconds": time.perf_counter() - t1,
                           "chosen": mixed.entry["model_type"],
                           "val_nll": mixed.entry["val_nll"]} | _metrics(y_test, nll))
    return out


def score_kind_rows(base: dict[str, Any], x_train: np.ndarray, x_test: np.ndarray,
                    y_test: np.ndarray, seed: int, quick: bool) -> list[dict[str, Any]]:
    """``fit-anomaly --score auto`` and each kind it fitted (``--score K``), scored on the test
    rows with the torch models (the served numbers up to float32 export rounding). One fit
    serves every row: ``nll`` and ``latent`` share the default's flow, ``denoise`` and ``dte``
    its flow-matching model; the fit time is the whole of auto's."""
    from training.anomaly_auto import choose_score_kind

    t0 = time.perf_counter()
    auto = choose_score_kind(x_train, seed=seed, steps=60 if quick else None)
    fit_s = time.perf_counter() - t0
    rows = []
    for kind, option in auto.options.items():
        t1 = time.perf_counter()
        score = option.scores(x_test)
        score_s = time.perf_counter() - t1
        model = option.candidate.entry["model_type"]
        row = {"fit_seconds": fit_s, "score_seconds": score_s,
               "chosen": f"{model} {kind}", "synthetic_auroc": auto.stats[kind]}
        m = _metrics(y_test, score)
        rows.append(base | {"detector": score_name(kind)} | row | m)
        if kind == auto.best:
            rows.append(base | {"detector": score_name("auto")} | row | m)
    return rows


def score_name(kind: str) -> str:
    return f"fit-anomaly --score {kind}"


def ensemble_name(k: int) -> str:
    return f"fit-anomaly --ensemble {k}"


OPT_IN = "fit-anomaly --"  # the prefix of every opt-in variant's detector name


# --------------------------------------------------------------------------- report


def _agg(results: list[dict[str, Any]], det: str, s: str, key: str) -> tuple[float, float, int]:
    vals = [r[key] for r in results if r["detector"] == det and r["set"] == s]
    if not vals:
        return math.nan, math.nan, 0
    return float(np.mean(vals)), float(np.std(vals)), len(vals)


def _detectors(results: list[dict[str, Any]]) -> list[str]:
    order = [DEFAULT, *OUR_TYPES, *CLASSICAL]
    return [d for d in order if any(r["detector"] == d for r in results)]


def _opt_in_detectors(results: list[dict[str, Any]]) -> list[str]:
    """The opt-in fit-anomaly variants in ``results`` (``fit-anomaly --ensemble K``), sorted."""
    return sorted({r["detector"] for r in results if r["detector"].startswith(OPT_IN)})


def _all_detectors(results: list[dict[str, Any]]) -> list[str]:
    """Every detector in ``results``, opt-in variants included, in a stable order."""
    return _detectors(results) + _opt_in_detectors(results)


def _sets(results: list[dict[str, Any]]) -> list[str]:
    return [s for s in ALL_SETS if any(r["set"] == s for r in results)]


def _metric_table(results: list[dict[str, Any]], key: str) -> str:
    from bench.report import markdown_table

    sets = _sets(results)
    dets = _detectors(results)
    means = {(d, s): _agg(results, d, s, key) for d in dets for s in sets}
    best = {s: max(means[d, s][0] for d in dets) for s in sets}
    overall = {d: float(np.mean([means[d, s][0] for s in sets])) for d in dets}
    best_overall = max(overall.values())
    rows = []
    for d in dets:
        line: list[object] = [d]
        for s in sets:
            m, sd, _ = means[d, s]
            cell = f"{m:.3f} ± {sd:.3f}"
            line.append(f"**{cell}**" if m == best[s] else cell)
        cell = f"{overall[d]:.3f}"
        line.append(f"**{cell}**" if overall[d] == best_overall else cell)
        rows.append(line)
    return markdown_table(["detector", *sets, "mean"], rows)


def _time_table(results: list[dict[str, Any]]) -> str:
    from bench.report import markdown_table

    sets = _sets(results)
    rows = []
    for d in _detectors(results):
        line: list[object] = [d]
        for s in sets:
            f, _, _ = _agg(results, d, s, "fit_seconds")
            sc, _, _ = _agg(results, d, s, "score_seconds")
            line.append(f"{f:.2f} / {sc:.3f}")
        rows.append(line)
    return markdown_table(["detector (fit s / score s)", *sets], rows)


def _set_table(results: list[dict[str, Any]]) -> str:
    from bench.report import markdown_table

    rows = []
    for s in _sets(results):
        r = next(r for r in results if r["set"] == s)
        d = [x for x in results if x["set"] == s and x["detector"] == DEFAULT]
        chosen = ", ".join(x["chosen"] for x in sorted(d, key=lambda x: x["seed"]))
        tier = d[0]["plan"]["tier"] if d else "–"
        fpr = f"{100 * np.mean([x['test_normal_flagged'] for x in d]):.1f} %" if d else "–"
        tpr = f"{100 * np.mean([x['test_anomalies_flagged'] for x in d]):.1f} %" if d else "–"
        disc = d[0]["columns_discrete"] if d else "–"
        rows.append([s, r["dim"], r["train_rows"], r["test_rows"], r["test_anomalies"],
                     disc, tier, chosen, fpr, tpr])
    return markdown_table(["set", "dim", "train rows", "test rows", "test anomalies",
                           "discrete cols", "tier", "default chose (per seed)",
                           "normal test rows flagged (target 1 %)", "anomalies flagged"],
                          rows)


def targets(results: list[dict[str, Any]]) -> dict[str, Any]:
    sets = _sets(results)
    dets = _detectors(results)
    mean_auroc = {d: float(np.mean([_agg(results, d, s, "auroc")[0] for s in sets]))
                  for d in dets}
    best_other = max((v, d) for d, v in mean_auroc.items() if d != DEFAULT)
    gaps = {}
    for s in sets:
        ours = _agg(results, DEFAULT, s, "auroc")[0]
        best_c = max((_agg(results, c, s, "auroc")[0], c) for c in CLASSICAL)
        gaps[s] = {"default": ours, "best_classical": best_c[1], "best_classical_auroc": best_c[0],
                   "gap": best_c[0] - ours}
    ours = [d for d in _all_detectors(results) if d not in CLASSICAL]
    oracle = {}
    for s in sets:  # an upper bound on any choice among our models, not a method
        ran = {d: _agg(results, d, s, "auroc") for d in ours}
        auroc, det = max((m, d) for d, (m, _, n) in ran.items() if n)
        oracle[s] = {"detector": det, "auroc": auroc,
                     "gap": gaps[s]["best_classical_auroc"] - auroc}
    return {
        "oracle_ours": oracle,
        "mean_auroc": mean_auroc,
        "best_mean": mean_auroc.get(DEFAULT, math.nan) >= best_other[0],
        "best_other": {"detector": best_other[1], "mean_auroc": best_other[0]},
        "per_set": gaps,
        "within_002": all(g["gap"] <= 0.02 for g in gaps.values()),
        "misses": [s for s, g in gaps.items() if g["gap"] > 0.02],
    }


def _targets_text(t: dict[str, Any]) -> str:
    ours = t["mean_auroc"].get(DEFAULT, math.nan)
    other = t["best_other"]
    lines = [
        f"- **Best mean AUROC**: {'**met**' if t['best_mean'] else '**not met**'}: "
        f"fit-anomaly's default {ours:.3f} vs the best other detector "
        f"({other['detector']}) {other['mean_auroc']:.3f}.",
    ]
    worst = max(t["per_set"].items(), key=lambda kv: kv[1]["gap"])
    verdict = "**met**" if t["within_002"] else (
        f"**not met** on {', '.join(t['misses'])}")
    per = "; ".join(f"{s} {g['gap']:+.3f} ({g['best_classical']})"
                    for s, g in t["per_set"].items())
    lines.append(f"- **Never more than 0.02 AUROC below the best classical detector**: "
                 f"{verdict}; worst set {worst[0]} ({worst[1]['gap']:+.3f}). Best classical "
                 f"minus default, per set: {per}.")
    if t.get("oracle_ours"):
        o = t["oracle_ours"]
        out = [s for s, g in o.items() if g["gap"] > 0.02]
        lines.append(
            "- **Upper bound on any choice among our models** (per set the best of our rows "
            "above and the opt-in variants, picked *on the test rows*: a bound, not a "
            "method): best classical minus that, per set: "
            + "; ".join(f"{s} {g['gap']:+.3f} ({g['detector']})" for s, g in o.items())
            + (f". Even this bound misses the 0.02 rule on {', '.join(out)}." if out else
               ". This bound meets the 0.02 rule on every set."))
    return "\n".join(lines)


def render(payload: dict[str, Any]) -> str:
    results = payload["results"]
    t = targets(results)
    seeds = sorted({r["seed"] for r in results})
    parts = ["## Anomaly detection: AUROC / AUPRC against classical detectors", ""]
    if payload.get("quick"):
        parts += ["**Quick smoke run (60 training steps): not a result.**", ""]
    parts += [
        f"Reproduce: `{payload['command']}` (wall {payload['wall_seconds'] / 60:.0f} min, "
        f"{payload['jobs']} process(es), one thread each). Machine: {payload['machine']}.", "",
        "Protocol (ADBench semi-supervised, `../shared/data/adbench/README.md`): per seed "
        f"({', '.join(map(str, seeds))}), fit on a random 70 % of the normal rows; test on the "
        "other 30 % plus every anomaly; every detector on the same split. Mean ± std over the "
        "seeds. breast_cancer: benign rows normal; digits: digit "
        f"{NORMAL_DIGIT} normal, all other digits anomalies. Nothing is chosen on the test "
        "rows: fit-anomaly's defaults are fixed in `training/anomaly.py`; its model type and "
        "then that type's smoothing scale are picked by NLL on its own validation rows "
        "(normal rows carved from the training 70 %).", "",
        "### Targets", "", _targets_text(t), "",
        "### AUROC", "", _metric_table(results, "auroc"), "",
        "### AUPRC (average precision, anomalies positive)", "",
        _metric_table(results, "auprc"), "",
        "### Sets, the default's choices and its calibrated threshold on the test rows", "",
        _set_table(results), "",
        "### Time (mean per seed, seconds: fit / score of the test rows)", "",
        _time_table(results), "",
        "Fit time of our models includes the periodic validation passes; the default's "
        "is the sum over its candidates plus calibration and TorchScript export, and its "
        "score time goes through `ModelRuntime.anomaly_score` (the served path). Timings "
        "are from a shared, loaded machine: compare within this table only.", "",
    ]
    parts += _opt_in_section(results)
    parts += _auto_section(results)
    if payload.get("notes"):
        parts += ["### Notes", "", payload["notes"]]
    return "\n".join(parts).rstrip() + "\n"


def _opt_in_section(results: list[dict[str, Any]]) -> list[str]:
    """Opt-in fit-anomaly variants (``--ensemble K``) next to the default on the (set, seed)
    units that ran them."""
    from bench.report import markdown_table

    names = _opt_in_detectors(results)
    if not names:
        return []
    rows = []
    for name in names:
        for s in _sets(results):
            var = [r for r in results if r["set"] == s and r["detector"] == name]
            if not var:
                continue
            seeds = {r["seed"] for r in var}
            base = [r for r in results if r["set"] == s and r["detector"] == DEFAULT
                    and r["seed"] in seeds]
            gain = [e["auroc"] - next(b["auroc"] for b in base if b["seed"] == e["seed"])
                    for e in var]
            rows.append([name, s, len(var), f"{np.mean([b['auroc'] for b in base]):.3f}",
                         f"{np.mean([e['auroc'] for e in var]):.3f}",
                         f"{np.mean(gain):+.3f} ({min(gain):+.3f} to {max(gain):+.3f})",
                         ", ".join(e["chosen"] for e in sorted(var, key=lambda r: r["seed"])),
                         f"{np.mean([e['fit_seconds'] for e in var]):.0f}"])
        var = [r for r in results if r["detector"] == name]
        sets = [s for s in _sets(results) if any(r["set"] == s for r in var)]
        mean_var = np.mean([_agg(var, name, s, "auroc")[0] for s in sets])
        mean_def = np.mean([_agg(results, DEFAULT, s, "auroc")[0] for s in sets])
        rows.append([name, "**mean**", "", f"{mean_def:.3f}", f"{mean_var:.3f}",
                     f"{mean_var - mean_def:+.3f}", "", ""])
    table = markdown_table(["detector", "set", "seeds", "default AUROC", "variant AUROC",
                            "variant minus default (per seed: min to max)",
                            "chosen (per seed)", "fit s (mean)"], rows)
    return ["### Opt-in fit-anomaly variants, next to the default on the same splits", "",
            "Not part of the targets or of the tables above. `--ensemble K`: the default's "
            "candidates at the unit's seed plus K - 1 more seeds each; the mixture (per type, "
            "or of all members) with the lowest validation NLL (no smoothing search). It "
            "scores the raw test rows in data units with the torch model (the served numbers "
            "up to float32 export rounding).", "",
            table, ""]


def _auto_section(results: list[dict[str, Any]]) -> list[str]:
    """Issue #29's targets for ``--score auto``, on the (set, seed) units it ran: its mean
    AUROC above every other detector's on those units, and never more than 0.02 below the
    best on any set."""
    from bench.report import markdown_table

    auto = score_name("auto")
    units = {(r["set"], r["seed"]) for r in results if r["detector"] == auto}
    if not units:
        return []
    ran = [r for r in results if (r["set"], r["seed"]) in units]
    sets = _sets(ran)
    dets = [d for d in _all_detectors(ran)
            if all(_agg(ran, d, s, "auroc")[2] for s in sets)]
    mean = {d: float(np.mean([_agg(ran, d, s, "auroc")[0] for s in sets])) for d in dets}
    others = {d: v for d, v in mean.items() if not d.startswith(score_name(""))}
    best_other = max(others, key=others.get)
    rows, misses = [], []
    for s in sets:
        a = _agg(ran, auto, s, "auroc")[0]
        best_s = max((_agg(ran, d, s, "auroc")[0], d) for d in others)
        chosen = ", ".join(r["chosen"] for r in ran if r["set"] == s and r["detector"] == auto)
        kinds = " / ".join(f"{_agg(ran, score_name(k), s, 'auroc')[0]:.3f}"
                           for k in SCORE_KINDS)
        fit = _agg(ran, auto, s, "fit_seconds")[0]
        score_s = _agg(ran, auto, s, "score_seconds")[0]
        rows.append([s, f"{a:.3f}", chosen, kinds, f"{best_s[0]:.3f} ({best_s[1]})",
                     f"{a - best_s[0]:+.3f}", f"{fit:.0f} / {score_s:.3f}"])
        if a < best_s[0] - 0.02:
            misses.append(s)
    seeds = sorted({seed for _, seed in units})
    met = mean[auto] > others[best_other]
    return [
        "### `fit-anomaly --score auto` and the score kinds (issue #29)", "",
        f"On the units it ran (seeds {', '.join(map(str, seeds))}), next to every detector on "
        "the same splits. Each kind's AUROC is its test rows scored by the torch model that "
        "auto fitted (`nll`/`latent`: the default's flow; `denoise`/`dte`: a `cfm` model); "
        "auto chose on normal rows alone (docs/anomaly-selection-protocol.md, third "
        "protocol).", "",
        markdown_table(["set", "auto AUROC", "auto chose", "nll / latent / denoise / dte",
                        "best other detector", "auto minus best",
                        "auto fit s / score s (mean)"], rows), "",
        f"- **auto's mean AUROC above every other detector's**: "
        f"{'**met**' if met else '**not met**'}: {mean[auto]:.3f} vs {best_other} "
        f"{others[best_other]:.3f}.",
        "- **Never more than 0.02 below the best on any set**: "
        + ("**met**." if not misses else f"**not met** on {', '.join(misses)}."), "",
    ]


NOTES = """\
- Our scores are NLL in nats (data units). fit-anomaly dequantizes discrete columns (uniform
  noise of one grid step) and adds Gaussian noise of 0.05 std to continuous ones at training
  time; scoring uses the raw rows. Plan per training-set size: `training/anomaly.py`.
- maf / nsf / realnvp rows are fit-anomaly's pipeline with the model type fixed and no
  smoothing; the default picks between maf and nsf by validation NLL, then trains the winner
  again at smoothing 0.2 and 0.5 and keeps the lowest validation NLL, so its AUROC equals one
  of the maf/nsf rows per seed (up to float32 export rounding) unless a scale was chosen
  (the "default chose" column says so).
- The classical detectors use scikit-learn's defaults (GaussianMixture: components by BIC);
  none was tuned, and neither were ours on these test rows.
- Where the targets are missed: on pima, validation NLL prefers nsf on every seed (by 1.2 to
  2.3 nats/row over maf) while maf, realnvp and kNN rank the anomalies better: likelihood and
  detection disagree there (the zeros that stand for missing readings form discrete spikes).
  On cardio the best-likelihood flows rank anomalies worse than OneClassSVM / kNN / the
  isolation forest, and vary by seed (maf 0.83-0.86, nsf 0.90-0.93).
- Development history, so that test-set reuse can be judged: the defaults were written
  before any benchmark run. The first full run (same command; default mean AUROC 0.882,
  misses on cardio +0.022 and pima +0.093) showed in its JSON a *validation* NLL of 4.4e6
  nats on cardio seed 0: a flag column constant in that training split had been given a
  1e-3 dequantization step, so one validation row with the flag's rare value drove early
  stopping (maf stopped at step 25). That defect was fixed (unit step for constant columns;
  validation rows with never-trained categories left out of early stopping and of the model
  choice) and the benchmark was rerun. The fix lowered cardio's test AUROC (0.938 ->
  0.891; the barely trained maf had ranked cardio's anomalies well); it was kept because it
  is right on validation data. Nothing else was changed after seeing test results.
- These tables are a rerun (2026-11-23) of the same command on the current code: the spline
  layer's parameter layout changed after the run above (commit 602b0e9, for ONNX Runtime's
  kernels), which changes nsf's initialisation and so its trained weights. fit-anomaly's
  defaults are unchanged; its mean AUROC moved from 0.877 to 0.881 (cardio 0.891 -> 0.918:
  nsf now wins validation NLL on every seed).
- An exploration that did look at these test splits, and so changed no default (figures and
  script in issue #11's note of 2026-11-23): a Gaussian kernel density, bandwidth by validation
  NLL, ranks cardio's and pima's anomalies about as well as kNN but vertebral's worse than
  chance, and validation NLL prefers the flows to it everywhere; flow + KDE mixtures weighted
  by validation NLL rank like the flow. Nothing chosen on normal rows alone picked the right
  estimator per set.
- A ranking statistic on normal rows, pre-registered before it was computed
  (`docs/anomaly-selection-protocol.md`): AUROC of validation rows against the same rows with
  each column shuffled, flow vs that kernel density, kernel density only if ahead by 0.01. It
  picks the flow on all 24 (set, seed) pairs, so the default and these tables are unchanged.
- The run with `--ensemble 2` (2026-11-23) reproduced every AUROC and AUPRC above to the
  last digit (same seeds, one thread each); only timings moved. Its opt-in mixtures (section
  above) do not rank anomalies better than the default: mean AUROC change -0.005 over the
  sets, cardio -0.036. They were measured on these test splits after being built for the
  issue's "ensemble averaged in log space", and changed no default.
- The smoothing search in the default was pre-registered with its adoption rule before it
  was measured (`docs/anomaly-selection-protocol.md`, second protocol): one run as an
  opt-in variant (`--smoothing-search 0.2 0.5`, commit ce1a5f6) reproduced every figure
  then published and changed breast_cancer by +0.003 and digits by +0.00003 (mean +0.0003,
  no set lower), so by that rule it became the default. These tables are the rerun with it
  in the default. Held-out NLL chooses no smoothing on cardio, thyroid, pima, wbc, breastw
  or vertebral, so it cannot move the two misses.
- `--score auto` and its kinds (section above, 2026-12-07) follow the third protocol of
  `docs/anomaly-selection-protocol.md`, committed before this run; nothing was changed after
  it. Reading the test rows (so: no default changes from it), the `latent` kind alone ranks
  cardio's anomalies best of every detector here (0.975) while auto's statistic on synthetic
  outliers keeps `nll` there; `denoise` is below `nll` on every set but digits.
- The upper-bound line under Targets reads the test rows on purpose: even the best of our
  own models per set, picked on the test rows, stays 0.042 (cardio) and 0.027 (pima) below
  the best classical detector.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.anomaly", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", choices=ALL_SETS, metavar="NAME",
                        help=f"sets (default: all of {', '.join(ALL_SETS)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--jobs", type=int, default=1, help="(set, seed) units side by side")
    parser.add_argument("--quick", action="store_true", help="smoke test: 60 training steps")
    parser.add_argument("--ensemble", type=int, default=1, metavar="K",
                        help="also fit-anomaly --ensemble K (K seeds per candidate, a mixture)")
    parser.add_argument("--scores", action="store_true",
                        help="also fit-anomaly --score auto and each score kind it fits")
    parser.add_argument("--add", action="store_true",
                        help="run only the classical detectors (and --scores), merging their "
                             "rows into docs/bench/anomaly.json's units")
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing")
    args = parser.parse_args(argv)
    from bench.jobs import run_jobs
    from bench.report import command_line, machine_line, write_results

    sets = args.sets or ALL_SETS
    command = command_line("bench.anomaly", argv)
    units = [(s, seed) for s in sets for seed in args.seeds]
    print(f"[anomaly] {len(units)} units, jobs={args.jobs}: {command}", flush=True)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []

    def report(rows: list[dict[str, Any]]) -> None:
        r0 = rows[0]
        line = " ".join(f"{r['detector'].split(' ')[0]}={r['auroc']:.3f}" for r in rows)
        print(f"[anomaly] {time.perf_counter() - start:7.0f}s {r0['set']:>13} seed {r0['seed']}:"
              f" {line}", flush=True)
        results.extend(rows)

    run_jobs(run_unit, [(s, seed, args.quick, args.ensemble, args.scores, args.add)
                        for s, seed in units], args.jobs, report)
    wall = time.perf_counter() - start
    payload: dict[str, Any] = {"command": command.strip(), "machine": machine_line(),
                               "quick": args.quick, "jobs": args.jobs, "wall_seconds": wall,
                               "notes": NOTES, "results": results}
    if JSON_PATH.exists() and not args.no_write:  # a partial run updates its units
        old = json.loads(JSON_PATH.read_text())
        if bool(old.get("quick")) == args.quick:
            done = ({(r["set"], r["seed"], r["detector"]) for r in results} if args.add
                    else {(r["set"], r["seed"]) for r in results})
            kept = [r for r in old["results"] if (
                (r["set"], r["seed"], r["detector"]) if args.add
                else (r["set"], r["seed"])) not in done]
            if kept:
                payload["results"] = kept + results
                payload["wall_seconds"] = wall + old.get("wall_seconds", 0.0)
                payload["jobs"] = max(args.jobs, old.get("jobs", 1))
                payload["command"] = "; ".join(dict.fromkeys([old["command"], command.strip()]))
    payload["results"].sort(key=lambda r: (ALL_SETS.index(r["set"]), r["seed"]))
    payload["targets"] = targets(payload["results"])
    markdown = render(payload)
    print(markdown)
    if not args.no_write:
        write_results(SECTION, markdown, JSON_PATH, payload)
        print(f"[anomaly] wrote {JSON_PATH} and the '{SECTION}' section", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
