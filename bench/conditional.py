"""Conditional models (issue #26): class-conditional digits with guidance, and per-class
anomaly thresholds next to one unconditional model.

    python -m bench.conditional [--steps 2000] [--samples 1000] [--anomaly-steps 1500]
    python -m bench.conditional --add "flow matching U-Net (cfm_image)" [--steps 1500]

Part 1, class-conditional digits (scikit-learn's 8x8 digits, 64 integer pixels 0..16, 10
classes): a conditional flow (``nsf``), flow matching (``cfm``) and diffusion (``ddpm``), the
last two trained with label dropout (``CFG_DROPOUT``) so they take classifier-free guidance,
all on the same rows, seed and budget, exported to ONNX and sampled through the served
runtime: ``--samples`` samples (as many of each class) per family at guidance 0, 1 and 3
(the flow at 0 only: guidance applies to ODE models). A fixed classifier (scikit-learn's
logistic regression on the real digits' training split, its accuracy on the real test split
shown beside) labels the samples; accuracy is the share given their own class. Diversity is
the mean pairwise distance among a class's samples over that among the class's real rows,
averaged over the classes (1: as spread as the data; near 0: one image per class).
``--add NAME ...`` trains and samples only those families and adds them to the recorded run
(``docs/bench/conditional.json``), with their own command, leaving the others' figures as
they were; the U-Net family (``cfm_image`` on ``digits_image``: the same pixels as images)
is run that way.

Part 2, conditional anomaly detection on ``gmm6`` (6 Gaussian components in 6-D; the
component is the label): one conditional ``maf`` scored by ``-log p(x | y)`` with a threshold
calibrated per class, next to one unconditional ``maf`` with one threshold, both at the same
target false-positive rate on their own validation rows. Outliers: held-out rows given another
component's label ("right values, wrong category", invisible without the label) and rows drawn
uniformly from the data's bounding box (visible to both). Reported: each model's detection
rate per kind of outlier, and the false-positive rate it actually has on fresh normal rows,
per class. Writes the ``conditional`` section of ``docs/BENCHMARKS.md`` and
``docs/bench/conditional.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.report import machine_line, markdown_table, rerender, write_results

SECTION = "conditional"
STEPS = 2000
SAMPLES = 1000
ANOMALY_STEPS = 1500
GUIDANCE = (0.0, 1.0, 3.0)
CFG_DROPOUT = 0.2
TARGET_FPR = 0.05
SAMPLE_STEPS = 32  # Heun steps of the ODE models (64 network evaluations, 128 guided)
FAMILIES = {  # name: (model type, data set, ModelConfig fields)
    # a coupling flow: MAF's sampling graph unrolls D = 64 passes per step, which takes
    # minutes to export at this width
    "flow (nsf)": ("nsf", "digits", {"hidden_features": 256, "hidden_layers": 2,
                                     "transforms": 6}),
    "flow matching (cfm)": ("cfm", "digits", {"hidden_features": 256, "hidden_layers": 3,
                                              "cfg_dropout": CFG_DROPOUT}),
    "diffusion (ddpm)": ("ddpm", "digits", {"hidden_features": 256, "hidden_layers": 3,
                                            "cfg_dropout": CFG_DROPOUT}),
}
ADDED_FAMILIES = {  # run with --add: the same pixels as 1x8x8 images, a U-Net with the label
    "flow matching U-Net (cfm_image)": ("cfm_image", "digits_image", {
        "hidden_features": 32, "scales": 1, "time_embedding": 16, "cfg_dropout": CFG_DROPOUT}),
}


def _train(kind: str, data: str, fields: dict[str, Any], steps: int, out: Path,
           rows: int | None = None) -> Path:
    """Train ``kind`` on ``data`` given its labels and export it (ONNX, no calibration for
    ODE models: the PF-ODE over the validation rows is the slow part and unused here)."""
    from training.config import ModelConfig, TrainConfig
    from training.export import export_checkpoint
    from training.fit import fit

    ckpt = fit(kind, data, rows=rows, condition="label", model_cfg=ModelConfig(**fields),
               train_cfg=TrainConfig(steps=steps, batch_size=256, eval_every=max(steps // 8, 1),
                                     progress=False,
                                     ema_decay=None if kind in ("maf", "nsf") else 0.999))
    export_checkpoint(ckpt, out, formats=("onnx",), calibration=kind in ("maf", "nsf"),
                      target_fpr=TARGET_FPR)
    return out


def _mean_pairwise(x: np.ndarray) -> float:
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    return float(d.sum() / (len(x) * (len(x) - 1)))


def digits(steps: int, samples: int, folder: Path, log: Any,
           families: dict[str, tuple[str, str, dict[str, Any]]] = FAMILIES) -> dict[str, Any]:
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from service.runtime import open_runtime
    from training.data import split_indices

    bunch = load_digits()
    x, y = bunch.data.astype(np.float64), bunch.target
    train, _, test = split_indices(len(x), 0)  # the split genserve trains on (seed 0)
    clf = LogisticRegression(max_iter=2000).fit(x[train], y[train])
    out: dict[str, Any] = {"classifier_test_accuracy": float(clf.score(x[test], y[test])),
                           "families": {}}
    per_class = samples // 10
    labels = np.repeat(np.arange(10), per_class)
    real_spread = [_mean_pairwise(x[y == k]) for k in range(10)]
    for name, (kind, data, fields) in families.items():
        start = time.perf_counter()
        rt = open_runtime(_train(kind, data, fields, steps, folder / kind), runtime="onnx")
        seconds = time.perf_counter() - start
        rows = {}
        for w in (GUIDANCE if rt.spec.timed else (0.0,)):
            options = {} if not rt.spec.timed else {"solver": "heun", "steps": SAMPLE_STEPS,
                                                     "guidance": w}
            t0 = time.perf_counter()
            s = rt.sample(len(labels), seed=1, labels=labels, **options)
            spread = [_mean_pairwise(s[labels == k]) / real_spread[k] for k in range(10)]
            rows[str(w)] = {"accuracy": float((clf.predict(s) == labels).mean()),
                            "diversity": float(np.mean(spread)),
                            "sample_seconds": time.perf_counter() - t0}
            log(f"digits {name} w={w}: {rows[str(w)]}")
        out["families"][name] = {"train_seconds": seconds, "by_guidance": rows}
    return out


def anomaly(steps: int, folder: Path, log: Any) -> dict[str, Any]:
    from service.runtime import open_runtime
    from training.config import ModelConfig, TrainConfig
    from training.data import load_data
    from training.export import export_checkpoint
    from training.fit import fit

    fields = {"hidden_features": 128, "transforms": 5}
    cond_rt = open_runtime(_train("maf", "gmm6", fields, steps, folder / "gmm6-cond",
                                  rows=20_000))
    ckpt = fit("maf", "gmm6", rows=20_000, model_cfg=ModelConfig(**fields),
               train_cfg=TrainConfig(steps=steps, batch_size=256, progress=False,
                                     eval_every=max(steps // 8, 1)))
    export_checkpoint(ckpt, folder / "gmm6-plain", formats=("onnx",), target_fpr=TARGET_FPR)
    plain_rt = open_runtime(folder / "gmm6-plain")
    fresh = load_data("gmm6", n=6000, seed=7)
    k = cond_rt.manifest.condition.width
    rng = np.random.default_rng(7)
    wrong = (fresh.y + rng.integers(1, k, len(fresh.y))) % k
    lo, hi = fresh.x.min(0), fresh.x.max(0)
    box = rng.uniform(lo, hi, fresh.x.shape)
    kinds = {"normal": (fresh.x, fresh.y), "wrong label": (fresh.x, wrong),
             "uniform in the box": (box, fresh.y)}
    out: dict[str, Any] = {"rows": len(fresh.y), "classes": k, "detect": {}, "fpr_by_class": {}}
    for name, (x, labels) in kinds.items():
        flagged = {"conditional, per-class thresholds":
                   cond_rt.anomaly_score(x, labels=labels).is_anomaly,
                   "unconditional, one threshold": plain_rt.anomaly_score(x).is_anomaly}
        out["detect"][name] = {m: float(f.mean()) for m, f in flagged.items()}
        if name == "normal":
            out["fpr_by_class"] = {m: [float(f[fresh.y == c].mean()) for c in range(k)]
                                   for m, f in flagged.items()}
        log(f"gmm6 {name}: {out['detect'][name]}")
    return out


def render(payload: dict[str, Any]) -> str:
    d, a = payload["digits"], payload["anomaly"]
    lines = ["## Conditional models: guided digits, per-class anomaly thresholds (issue #26)",
             "", f"Command: `{payload['command']}` ({payload['machine']}; "
             f"{payload['seconds'] / 60:.1f} min).", "",
             f"What ran: digits (1797 rows, split 80/10/10, dequantized and logit-transformed "
             f"as every integer set), each family {payload['steps']} training steps of batch "
             f"256 (ODE models with EMA 0.999 and label dropout {CFG_DROPOUT}), MLPs of width "
             f"256; {payload['samples']} samples per family and guidance "
             f"({payload['samples'] // 10} of each class, seed 1), ODE models by Heun in "
             f"{SAMPLE_STEPS} steps through "
             f"the exported ONNX graphs. Classifier: logistic regression on the real training "
             f"split, {d['classifier_test_accuracy']:.1%} on the real test split. What was cut "
             "to bound the run on a shared 2-core machine: `digits_image` and the U-Net "
             "families" + (" (but the one added below)" if payload.get("added") else "")
             + ", longer training, several seeds; the figures compare guidance weights "
             "at this budget, not converged models.", ""]
    for added in payload.get("added", []):
        lines += [f"Added afterwards with `{added['command']}` ({added['machine']}; "
                  f"{added['seconds'] / 60:.1f} min): " + ", ".join(added["families"]) + f", "
                  f"{added['steps']} training steps of batch 256 with EMA 0.999 and label "
                  f"dropout {CFG_DROPOUT}, on `digits_image` (the same pixels as 1x8x8 "
                  "images; its U-Net sees the label's embedding beside the time's); sampled "
                  "and scored exactly as above.", ""]
    rows = []
    for name, res in d["families"].items():
        for w, r in res["by_guidance"].items():
            rows.append([name, w, f"{r['accuracy']:.1%}", f"{r['diversity']:.2f}",
                         f"{res['train_seconds']:.0f}"])
    lines += ["Accuracy of the fixed classifier on the samples (their own class) and diversity "
              "(mean pairwise distance within a class over the real class's; 1 = as spread as "
              "the data):", "",
              markdown_table(["family", "guidance", "accuracy", "diversity",
                              "train + export s"], rows), ""]
    best0 = max(r["by_guidance"]["0.0"]["accuracy"] for r in d["families"].values())
    rising = {name: [r["by_guidance"][str(w)]["accuracy"] for w in GUIDANCE]
              for name, r in d["families"].items() if len(r["by_guidance"]) > 1}
    rises = {n: all(b >= a for a, b in zip(v, v[1:], strict=False)) for n, v in rising.items()}
    lines += [f"Targets: ≥ 90 % at guidance 0 for the best family: "
              f"{'met' if best0 >= 0.9 else 'not met'} ({best0:.1%}). Accuracy rising with "
              "guidance: " + "; ".join(f"{n}: {'met' if ok else 'not met'}"
                                       for n, ok in rises.items()) + ".", ""]
    for n, ok in rises.items():
        if not ok:
            v = rising[n]
            drop, at = max((a - b, b) for a, b in zip(v, v[1:], strict=False))
            se = (at * (1 - at) / payload["samples"]) ** 0.5
            lines += [f"{n}: accuracy falls by {drop:.1%} at most between guidance weights, "
                      + (f"within one standard error of a {payload['samples']}-sample share "
                         f"({se:.1%}): it saturates rather than reverses."
                         if drop <= se else f"more than one standard error ({se:.1%})."), ""]
    if best0 < 0.9:
        lines += [f"Why the first target is missed: at {payload['steps']} steps the best "
                  f"unguided family is the one at {best0:.1%}; the ODE models without guidance "
                  "sit far lower and reach it only with guidance, at some cost in diversity. "
                  "Longer training was not run here (this run took "
                  f"{payload['seconds'] / 60:.0f} min on a machine shared with other test "
                  "runs), so whether more steps reach 90 % unguided is not measured.", ""]
    methods = list(a["detect"]["normal"])
    rows = [[kind] + [f"{a['detect'][kind][m]:.1%}" for m in methods] for kind in a["detect"]]
    lines += [f"Conditional anomaly detection on gmm6 ({a['classes']} components as labels; "
              f"both models maf, {payload['anomaly_steps']} steps on 20 000 rows; target "
              f"false-positive rate {TARGET_FPR:.0%}, calibrated on each model's validation "
              f"rows, per class for the conditional one). Share flagged among {a['rows']} "
              "fresh rows of each kind:", "",
              markdown_table(["rows", *methods], rows), ""]
    rows = [[m] + [f"{v:.1%}" for v in a["fpr_by_class"][m]] for m in methods]
    lines += ["False-positive rate on fresh normal rows, per class:", "",
              markdown_table(["model", *[f"class {c}" for c in range(a["classes"])]], rows),
              ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.conditional",
                                description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--samples", type=int, default=SAMPLES)
    p.add_argument("--anomaly-steps", type=int, default=ANOMALY_STEPS)
    p.add_argument("--no-write", action="store_true", help="print, write nothing")
    p.add_argument("--render", action="store_true",
                   help="rewrite the section from docs/bench/conditional.json without running")
    p.add_argument("--add", nargs="+", choices=sorted(ADDED_FAMILIES | FAMILIES),
                   metavar="FAMILY", help="run only these digits families and add them to "
                   "the recorded run: " + ", ".join(ADDED_FAMILIES))
    ns = p.parse_args(argv)
    json_path = Path(__file__).resolve().parents[1] / "docs" / "bench" / "conditional.json"
    if ns.render:
        rerender(SECTION, render, json_path)
        return 0
    if ns.add:
        return _add(ns, argv, json_path)
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="genserve-conditional-") as tmp:
        folder = Path(tmp)
        payload = {"command": "python -m bench.conditional " + shlex.join(argv or sys.argv[1:]),
                   "machine": machine_line(), "steps": ns.steps, "samples": ns.samples,
                   "anomaly_steps": ns.anomaly_steps,
                   "digits": digits(ns.steps, ns.samples, folder, log),
                   "anomaly": anomaly(ns.anomaly_steps, folder, log)}
    payload["seconds"] = time.perf_counter() - start
    text = render(payload)
    if ns.no_write:
        print(text)
    else:
        write_results(SECTION, text, json_path, payload)
        print(text)
    return 0


def _add(ns: argparse.Namespace, argv: list[str] | None, json_path: Path) -> int:
    """Train and sample ``ns.add``'s families; add them to the recorded run's digits part."""
    import torch

    torch.set_num_threads(1)
    payload = json.loads(json_path.read_text())
    if ns.samples != payload["samples"]:
        raise SystemExit(f"--samples must equal the recorded run's ({payload['samples']}) so "
                         "the rows compare")
    start = time.perf_counter()
    chosen = {n: (ADDED_FAMILIES | FAMILIES)[n] for n in ns.add}
    with tempfile.TemporaryDirectory(prefix="genserve-conditional-") as tmp:
        res = digits(ns.steps, ns.samples, Path(tmp),
                     lambda m: print(m, file=sys.stderr, flush=True), chosen)
    payload["digits"]["families"].update(res["families"])
    payload.setdefault("added", []).append({
        "families": list(chosen), "steps": ns.steps, "machine": machine_line(),
        "command": "python -m bench.conditional " + shlex.join(argv or sys.argv[1:]),
        "seconds": time.perf_counter() - start})
    text = render(payload)
    if not ns.no_write:
        write_results(SECTION, text, json_path, payload)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
