"""``genserve report --anomaly-model``: how a served anomaly model scores rows known to be
normal and rows known to be anomalous, as figures and JSON.

Scores are the served runtime's (``ModelRuntime.anomaly_score``): the numbers
``/anomaly_score`` and ``genserve score`` return.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from artifact.tables import DataError, read_table
from report import plots
from service.runtime import open_runtime

__all__ = ["anomaly_report", "roc_curve"]


def roc_curve(normal: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of the rule ``score > threshold`` over every threshold; higher score = anomalous.

    Returns ``fpr: (k,)``, ``tpr: (k,)`` from (0, 0) to (1, 1), and the AUROC (the
    Mann-Whitney probability that an anomalous row outscores a normal one, ties half).
    """

    scores = np.concatenate([anomalous, normal])
    positive = np.concatenate([np.ones(len(anomalous)), np.zeros(len(normal))])
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], positive[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # one point per distinct threshold
    tpr = np.r_[0.0, np.cumsum(y)[last] / len(anomalous)]
    fpr = np.r_[0.0, np.cumsum(1 - y)[last] / len(normal)]
    ranks = rankdata(scores)
    p, n = len(anomalous), len(normal)
    auroc = float((ranks[:p].sum() - p * (p + 1) / 2) / (p * n))
    return fpr, tpr, auroc


def anomaly_report(model_dir: str | Path, normal: str | Path, anomalous: str | Path,
                   out: str | Path) -> dict[str, Any]:
    """Scores of normal and anomalous rows by a served anomaly model, as figures and JSON.

    Writes ``anomaly_scores.png`` (histograms, calibrated threshold marked), ``roc.png`` and
    ``anomaly.json`` (AUROC, flagged shares). Scores are ``ModelRuntime.anomaly_score``'s:
    the numbers ``/anomaly_score`` and ``genserve score`` return.
    """

    out = Path(out)
    runtime = open_runtime(model_dir)
    if runtime.manifest.calibration is None:
        raise DataError(f"model '{runtime.name}' has no anomaly calibration; make it with "
                        "`genserve fit-anomaly` or `genserve export`")
    results = {}
    for role, path in (("normal", normal), ("anomalous", anomalous)):
        x = read_table(path, dim=runtime.dim).x
        results[role] = runtime.anomaly_score(x)
    threshold = results["normal"].threshold
    fpr, tpr, auroc = roc_curve(results["normal"].scores, results["anomalous"].scores)
    flagged = {role: float(r.is_anomaly.mean()) for role, r in results.items()}
    out.mkdir(parents=True, exist_ok=True)
    plots.anomaly_histogram(results["normal"].scores, results["anomalous"].scores, threshold,
                            runtime.name, out / "anomaly_scores.png")
    plots.roc_figure(fpr, tpr, auroc, (flagged["normal"], flagged["anomalous"]),
                     runtime.name, out / "roc.png")
    summary = {
        "model": runtime.name,
        "threshold": threshold,
        "target_fpr": runtime.manifest.calibration.target_fpr,
        "rows": {role: int(len(r.scores)) for role, r in results.items()},
        "flagged_normal": flagged["normal"],
        "flagged_anomalous": flagged["anomalous"],
        "auroc": auroc,
    }
    (out / "anomaly.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
