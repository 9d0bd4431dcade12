"""Flow-zoo benchmark: test log-likelihood of every flow type next to the exact entropy.

    python -m bench.flows [--quick] [--only KIND ...] [--sets NAME ...] [--jobs N]
    python -m bench.flows --only nsf resflow otcfm ffjord --sets 8gaussians \
        --steps 400 --rows 5000   # a reduced budget: the "flows-subset" section
    python -m bench.flows --only nsf ffjord --sets gmm2 --steps 400 --rows 5000 --served
        # ... plus served log_likelihood rows/s; merged into that section's earlier rows
    python -m bench.flows --only ffjord otcfm --sets gmm2 --steps 400 --rows 5000 --equal-time
        # ... plus OT-CFM trained for FFJORD's measured wall time (merged likewise)
    python -m bench.flows --only resflow --sets gmm2 8gaussians --tune --jobs 2
        # TUNE's 8-block candidates (BARE_TUNE) of the residual flow; the best by validation
    python -m bench.flows --only resflow --sets checkerboard 2spirals --tune 3 4 --jobs 2
        # TUNE's candidates 3 and 4 only; a set's earlier row stays if its validation is better
    python -m bench.flows --only ffjord --sets gmm2 8gaussians checkerboard 2spirals
        # FFJORD at its defaults (training.config), in the zoo's tables; only by --only
    python -m bench.flows --render   # the zoo section again from docs/bench/flows.json

Writes the ``flows`` section of ``docs/BENCHMARKS.md`` (through ``bench.report``) and the raw
figures to ``docs/bench/flows.json``. Sets:

* Gaussian mixtures with a closed-form density (gmm2, gmm6, gmm16): the target budget,
  3000 steps of batch 256; the issue's targets are a gap to the true test log-likelihood of
  at most 0.01 / 0.05 / 0.25 nats for the best flow.
* 2D toys (8gaussians, checkerboard with exact entropy floors; 2spirals without), same
  budget.
* digits (bits/dim, integers 0..16 dequantized) and small tables (breast_cancer, wine) with
  early stopping on the validation split and weight decay.

"gap" is ``mean(log p_true(x)) - mean(log p_model(x))`` over the same test rows (an estimate
of KL(p_true || p_model) >= 0); its standard error is the paired one (per-row differences).
Model selection (early stopping / best validation state, hyper-parameters) only ever looks at
the validation split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "bench" / "flows.json"
SECTION = "flows"

TARGETS = {"gmm2": 0.01, "gmm6": 0.05, "gmm16": 0.25}
GROUPS: dict[str, list[str]] = {
    "Gaussian mixtures with known density (target budget: 3000 steps x batch 256)": [
        "gmm2",
        "gmm6",
        "gmm16",
    ],
    "2D toys (3000 steps x batch 256; 2spirals has no closed-form density)": [
        "8gaussians", "checkerboard", "2spirals"],
    "digits (8x8, 17 levels, dequantized; bits/dim)": ["digits"],
    "small tables (nats/sample; early stopping, weight decay)": ["breast_cancer", "wine"],
}
ALL_SETS = [s for sets in GROUPS.values() for s in sets]
SEED = 0
ODE_KINDS = ("otcfm", "ffjord")
"""Continuous models --only also accepts, to compare FFJORD with OT-CFM side by side."""
SUBSET_SECTION = "flows-subset"
SUBSET_JSON = ROOT / "docs" / "bench" / "flows_subset.json"


@dataclass(frozen=True)
class Arch:
    """The ``ModelConfig`` fields this benchmark sets (the rest keep their defaults)."""

    hidden_features: int = 128
    hidden_layers: int = 2
    transforms: int = 8
    bins: int = 16
    tail_bound: float = 5.0
    lipschitz: float = 0.9


@dataclass(frozen=True)
class Plan:
    """How one set is trained and scored."""

    rows: int | None  # None: every row of a fixed table
    steps: int
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    ema_decay: float | None = None
    warmup_steps: int = 100
    eval_every: int = 250
    patience: int | None = None
    arch: Arch = field(default_factory=Arch)
    # per-flow overrides of the fields above (the best flows of a set, tuned on validation)
    by_kind: dict[str, dict[str, Any]] = field(default_factory=dict)
    # PreprocessConfig fields; None: training.fit.default_preprocess
    preprocess: dict[str, Any] | None = None
    # per-flow overrides of the step cap (IAF's density needs D sequential MADE passes)
    max_steps: dict[str, int] = field(default_factory=dict)
    # wall-clock budget of the training loop (TrainConfig.max_seconds); None: steps only
    max_seconds: float | None = None


def _defaults_of(kind: str, dim: int) -> dict[str, Any]:
    """The plan overrides that train ``kind`` as ``genserve train`` does on ``dim``-D rows:
    its default rate and network (``training.config``)."""
    from training.config import default_model_config, default_train_config

    net = default_model_config(kind, dim)
    return {"lr": default_train_config(kind).lr,
            "arch": Arch(hidden_features=net.hidden_features, hidden_layers=net.hidden_layers)}


# the tuned variant tried for the best-flow candidates: higher peak lr, EMA of the weights
_FAST: dict[str, Any] = {"lr": 2e-3, "ema_decay": 0.999}
# the residual flow's candidates of TUNE that won on each set's validation split
_RESFLOW_1E2: dict[str, Any] = {"lr": 1e-2, "arch": Arch(lipschitz=0.97)}
_RESFLOW_2E2: dict[str, Any] = {"lr": 2e-2, "arch": Arch(lipschitz=0.97)}
_RESFLOW_4E2: dict[str, Any] = {"lr": 4e-2, "arch": Arch(lipschitz=0.97)}
# 32 and 64 blocks: where the 8-block flow trails NSF most (checkerboard, 2spirals), the rate
# no longer moves it (its three rates within 0.05 nats on validation); depth is the next
# lever. One 3000-step run of these takes 10 (32 blocks) to 20 minutes (64) on one core, so
# they run on those two sets only, by position: --tune 3 4 5 6
_RESFLOW_DEEP_2E2: dict[str, Any] = {"lr": 2e-2, "arch": Arch(lipschitz=0.97, transforms=32)}
_RESFLOW_DEEP_4E2: dict[str, Any] = {"lr": 4e-2, "arch": Arch(lipschitz=0.97, transforms=32)}
_RESFLOW_DEEPER_2E2: dict[str, Any] = {"lr": 2e-2, "arch": Arch(lipschitz=0.97, transforms=64)}
_RESFLOW_DEEPER_4E2: dict[str, Any] = {"lr": 4e-2, "arch": Arch(lipschitz=0.97, transforms=64)}
# FFJORD at its defaults (training.config: the class network, 64 x 2, and its own rate, chosen
# on bench.suite's tuning half); at the flows' lr 1e-3 its velocity hardly leaves zero
_FFJORD_DEFAULT: dict[str, Any] = _defaults_of("ffjord", 2)  # the 2-D toys only

PLANS: dict[str, Plan] = {
    # Generated sets: 100k rows (80k train, 10k val, 10k test); 3000 x 256 = 768k draws, so
    # the smaller 30k-row sets were over-fitted (best validation before the last step).
    # by_kind: the configuration with the lower validation gap (Tuning table of the section).
    "gmm2": Plan(rows=100_000, steps=3000,
                 by_kind={"resflow": _RESFLOW_1E2, "ffjord": _FFJORD_DEFAULT}),
    "gmm6": Plan(rows=100_000, steps=3000, max_steps={"iaf": 500},
                 by_kind={"nsf": _FAST, "nsf_ar": _FAST, "resflow": _RESFLOW_1E2}),
    "gmm16": Plan(rows=100_000, steps=3000, max_steps={"iaf": 300},
                  by_kind={"maf": _FAST | {"arch": Arch(hidden_features=256)}, "nsf": _FAST,
                           "resflow": _RESFLOW_1E2}),
    "8gaussians": Plan(rows=100_000, steps=3000,
                       by_kind={"resflow": _RESFLOW_4E2, "ffjord": _FFJORD_DEFAULT}),
    "checkerboard": Plan(rows=100_000, steps=3000,
                         by_kind={"resflow": _RESFLOW_DEEPER_2E2, "ffjord": _FFJORD_DEFAULT}),
    "2spirals": Plan(rows=100_000, steps=3000,
                     by_kind={"resflow": _RESFLOW_DEEPER_4E2, "ffjord": _FFJORD_DEFAULT}),
    # default_preprocess (dequantize + standardize) fits the std at the cell midpoint, so the
    # always-zero pixels get std = STD_FLOOR and the dequantization noise is blown up by 1e8;
    # dequantize + logit instead (RealNVP's image preprocessing), log-dets counted as always.
    "digits": Plan(rows=None, steps=3000, weight_decay=1e-4, eval_every=100, patience=5,
                   preprocess={"dequantize": True, "levels": 17, "standardize": False,
                               "logit_alpha": 0.05},
                   max_steps={"iaf": 300}, by_kind={"resflow": _RESFLOW_4E2}),
    "breast_cancer": Plan(rows=None, steps=2000, weight_decay=1e-3, eval_every=50, patience=6,
                          max_steps={"iaf": 1000}, by_kind={"resflow": _RESFLOW_1E2}),
    "wine": Plan(rows=None, steps=2000, weight_decay=1e-3, eval_every=50, patience=6,
                 by_kind={"resflow": _RESFLOW_2E2}),
}


TUNE: dict[str, list[dict[str, Any]]] = {
    # --tune: candidate overrides of a set's plan per flow type, compared on the validation
    # split only. The residual flow barely leaves its initial state at the plans' lr 1e-3
    # (bench.resflow_ablation), so its candidates are higher rates, each with a Lipschitz
    # coefficient of 0.97
    "resflow": [_RESFLOW_1E2, _RESFLOW_2E2, _RESFLOW_4E2, _RESFLOW_DEEP_2E2, _RESFLOW_DEEP_4E2,
                _RESFLOW_DEEPER_2E2, _RESFLOW_DEEPER_4E2],
}
BARE_TUNE: dict[str, int] = {"resflow": 3}
"""How many leading candidates of ``TUNE`` a bare ``--tune`` (no positions) trains: the
residual flow's deep ones (hours on every set) run only where named by position, so the
commands recorded before they existed still mean the same runs."""


def plan_for(plan: Plan, kind: str) -> Plan:
    """``plan`` with the overrides of flow type ``kind`` applied."""
    return replace(plan, by_kind={}, **plan.by_kind.get(kind, {}))


def _cost(kind: str, name: str, plan: Plan) -> float:
    """Rough relative cost of a run (to start the long ones first when running side by side)."""
    from training.data import DATASETS

    dim = DATASETS[name].dim
    plan = plan_for(plan, kind)
    width = (plan.arch.hidden_features / 128) * (plan.arch.transforms / 8)
    steps = min(plan.steps, plan.max_steps.get(kind, plan.steps))
    per_step = {"iaf": dim, "nsf": 3.0 + dim / 8, "nsf_ar": 4.0 + dim / 8}.get(kind, 1 + dim / 32)
    return steps * per_step * max(width, 0.5)


def flow_kinds() -> list[str]:
    """The flow types of vector rows (the image flows have their own benchmark,
    ``bench.images``)."""
    from training.registry import MODEL_TYPES, is_image_model

    return [k for k, spec in MODEL_TYPES.items()
            if spec.family == "flow" and not is_image_model(k)]


SUBSET_ARCH = Arch(hidden_features=64, hidden_layers=2, transforms=4, bins=8)
"""Every model's network at the reduced budget."""


def subset_plan(plan: Plan, steps: int | None = None, rows: int | None = None) -> Plan:
    """``plan`` at a reduced budget: ``steps`` and ``rows`` where given, ``SUBSET_ARCH``, no
    per-flow overrides or step caps."""
    steps = steps or plan.steps
    return replace(plan, steps=steps, rows=rows or plan.rows,
                   eval_every=min(plan.eval_every, steps), arch=SUBSET_ARCH, max_steps={},
                   by_kind={})


def quick_plan(plan: Plan) -> Plan:
    """A smoke-test version of a plan: few steps, few rows, small nets."""
    return replace(
        plan,
        rows=None if plan.rows is None else 3000,
        steps=40,
        eval_every=20,
        patience=None if plan.patience is None else 2,
        arch=replace(plan.arch, hidden_features=32, transforms=2),
        max_steps={},
        by_kind={k: {f: v for f, v in o.items() if f != "arch"} for k, o in plan.by_kind.items()},
    )


# --------------------------------------------------------------------------- one run


def load_splits(name: str, rows: int | None, seed: int = SEED) -> tuple[Any, Any]:
    from training.data import load_data, split

    dataset = load_data(name, n=rows, seed=seed)
    return dataset, split(dataset.x, seed=seed)


def configs(plan: Plan, kind: str, *, seed: int = SEED, progress: bool = False
            ) -> tuple[Any, Any, Any]:
    """``ModelConfig``, ``TrainConfig`` and ``PreprocessConfig`` (or None) of ``kind`` under
    ``plan`` (its per-flow overrides already applied)."""
    from training.config import ModelConfig, PreprocessConfig, TrainConfig

    model_cfg = ModelConfig(**asdict(plan.arch))
    train_cfg = TrainConfig(
        steps=min(plan.steps, plan.max_steps.get(kind, plan.steps)),
        batch_size=plan.batch_size,
        lr=plan.lr,
        weight_decay=plan.weight_decay,
        ema_decay=plan.ema_decay,
        warmup_steps=plan.warmup_steps,
        eval_every=plan.eval_every,
        patience=plan.patience,
        max_seconds=plan.max_seconds,
        seed=seed,
        progress=progress,
    )
    pre_cfg = None if plan.preprocess is None else PreprocessConfig(**plan.preprocess)
    return model_cfg, train_cfg, pre_cfg


SERVED_ROWS = 64
"""Rows per ``log_likelihood`` call of the served-speed figure (the issue's request size)."""


def served_rows_per_second(ckpt: Any, x: np.ndarray, repeats: int = 15) -> float:
    """``log_likelihood`` rows/s of the model exported to ONNX and run by the service's
    runtime in process (one thread, the model's default method: exact), ``SERVED_ROWS``-row
    calls, median of ``repeats`` after a warm-up: the graphs' and solver's cost without
    HTTP."""
    import tempfile

    from bench.serving import rows_per_second
    from service.runtime import open_runtime
    from training.export import export_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(ckpt, Path(tmp) / "m", formats=("onnx",), calibration=False)
        rt = open_runtime(Path(tmp) / "m", runtime="onnx", threads=1, device="cpu")
        rows = x[:SERVED_ROWS]
        return rows_per_second(lambda: rt.log_likelihood(rows), len(rows), repeats)


def run_one(kind: str, name: str, plan: Plan, *, seed: int = SEED, progress: bool = False,
            served: bool = False) -> dict[str, Any]:
    """Train ``kind`` on set ``name`` under ``plan``; score the test (and validation) split;
    with ``served``, the exported model's ``log_likelihood`` rows/s too."""
    import torch

    torch.set_num_threads(1)
    from training.data import true_log_density
    from training.evaluate import data_log_prob
    from training.fit import fit
    from training.metrics import likelihood_summary

    plan = plan_for(plan, kind)
    arch = plan.arch
    model_cfg, train_cfg, pre_cfg = configs(plan, kind, seed=seed, progress=progress)
    # fit() loads and splits the set itself (same seeds); the splits are rebuilt here to score
    ckpt = fit(kind, name, rows=plan.rows, data_seed=seed, split_seed=seed,
               model_cfg=model_cfg, pre_cfg=pre_cfg, train_cfg=train_cfg)
    dataset, splits = load_splits(name, plan.rows, seed)
    train = ckpt.config.summary
    dim = int(splits.train.shape[1])
    truth = true_log_density(name)
    out: dict[str, Any] = {
        "kind": kind,
        "set": name,
        "dim": dim,
        "rows": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "levels": dataset.levels,
        "model": model_cfg.model_dump(include=set(asdict(arch))),
        "train": train_cfg.model_dump(exclude={"progress"}),
        "preprocess": ckpt.config.preprocess.model_dump(),
        "steps_run": int(train["steps"]),
        "best_step": int(train["best_step"]),
        "stopped_early": bool(train["stopped_early"]),
        "train_seconds": float(train["train_seconds"]),
        "seconds_per_1000_steps": 1000 * float(train["train_seconds"]) / int(train["steps"]),
        "parameters": int(sum(p.numel() for p in ckpt.model.parameters())),
        "target_gap": TARGETS.get(name),
    }
    for split_name, x in (("val", splits.val), ("test", splits.test)):
        lp = data_log_prob(ckpt, x, seed=seed)["log_prob"]
        finite = np.isfinite(lp)
        res: dict[str, Any] = likelihood_summary(lp, dim) | {"nonfinite": int((~finite).sum())}
        if truth is not None:
            true_lp = truth(x)
            diff = true_lp - lp
            res["true_log_likelihood"] = float(true_lp.mean())
            res["gap"] = float(diff.mean())
            res["gap_se"] = float(diff.std(ddof=1) / math.sqrt(len(diff)))
        out[split_name] = res
    if out["target_gap"] is not None:
        out["target_met"] = bool(out["test"]["gap"] <= out["target_gap"])
    if served:
        out["served_rows_per_s"] = served_rows_per_second(ckpt, splits.test)
    return out


def _job(kind: str, name: str, plan: Plan, seed: int, served: bool = False,
         overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    print(f"[flows] start {name} {kind}" + (f" {overrides}" if overrides else ""), flush=True)
    start = time.perf_counter()
    res = run_one(kind, name, plan, seed=seed, served=served)
    res["wall_seconds"] = time.perf_counter() - start
    res["loadavg_end"] = list(os.getloadavg())
    if overrides is not None:
        res["overrides"] = overrides
    return res


def _changed(arch: Arch) -> dict[str, Any]:
    """The fields of ``arch`` that differ from ``Arch()``."""
    default = Arch()
    return {f: v for f, v in asdict(arch).items() if v != getattr(default, f)}


def tuning_jobs(kinds: list[str], sets: list[str], plans: dict[str, Plan], served: bool,
                picks: list[int] | None = None) -> list[tuple[Any, ...]]:
    """``--tune``: one job per candidate of ``TUNE`` (each on top of the set plan without
    its per-flow overrides; those at positions ``picks`` when given, else the first
    ``BARE_TUNE`` of them) for every (flow, set) it names."""
    jobs: list[tuple[Any, ...]] = []
    for name in sets:
        for kind in kinds:
            cands = TUNE.get(kind, [])
            chosen = (cands[:BARE_TUNE.get(kind, len(cands))] if picks is None
                      else [cands[i] for i in picks])
            for cand in chosen:
                base = replace(plans[name], by_kind={})
                fields = dict(cand)
                if "arch" in cand:  # only the fields it changes from Arch(), on the set's
                    fields["arch"] = replace(base.arch, **_changed(cand["arch"]))
                shown = cand | ({"arch": _changed(cand["arch"])} if "arch" in cand else {})
                jobs.append((kind, name, replace(base, **fields), SEED, served, shown))
    return jobs


def pick_tuned(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                       list[dict[str, Any]]]:
    """Split ``--tune`` runs into (the highest validation log-likelihood, so the lowest
    validation gap, per (flow, set), the tuning records of every candidate); runs without
    ``overrides`` pass through."""
    plain = [r for r in results if "overrides" not in r]
    tuned = [r for r in results if "overrides" in r]
    records = [{"set": r["set"], "kind": r["kind"], "overrides": r["overrides"],
                "val_log_likelihood": r["val"]["log_likelihood"],
                "val_gap": r["val"].get("gap"), "val_gap_se": r["val"].get("gap_se"),
                "steps_run": r["steps_run"], "best_step": r["best_step"],
                "train": r["train"], "model": r["model"]} for r in tuned]
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in tuned:
        key = (r["set"], r["kind"])
        if key not in best or r["val"]["log_likelihood"] > best[key]["val"]["log_likelihood"]:
            best[key] = r
    return plain + [{k: v for k, v in r.items() if k != "overrides"} for r in best.values()
                    ], records


def kept_if_better(results: list[dict[str, Any]], tuning: list[dict[str, Any]],
                   old: dict[str, Any]) -> list[dict[str, Any]]:
    """``results`` of a ``--tune`` run over some candidates, each tuned (flow, set) row
    swapped for the earlier run's where that one's validation log-likelihood is higher."""
    tuned = {(t["kind"], t["set"]) for t in tuning}
    before = {(r["kind"], r["set"]): r for r in old.get("results", [])}
    out = []
    for r in results:
        prev = before.get((r["kind"], r["set"]))
        better = prev is not None and (r["kind"], r["set"]) in tuned and \
            prev["val"]["log_likelihood"] > r["val"]["log_likelihood"]
        out.append(prev if better else r)
    return out


# --------------------------------------------------------------------------- report


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}"


def _table(results: list[dict[str, Any]], name: str) -> str:
    from bench.report import markdown_table

    rows = [r for r in results if r["set"] == name]
    if not rows:
        return ""
    first = rows[0]
    bits = first["levels"] is not None
    has_truth = "gap" in first["test"]
    target = TARGETS.get(name)
    header = ["flow"]
    header += ["test bits/dim ± s.e." if bits else "test log-lik ± s.e. (nats)"]
    if bits:
        header += ["test log-lik (nats)"]
    if has_truth:
        header += ["true log-lik", "gap ± s.e. (nats)"]
        if target is not None:
            header += [f"gap ≤ {target}?"]
    header += ["val log-lik", "steps (best)", "s / 1000 steps"]
    table = []
    best = min((r["test"]["gap"] for r in rows), default=None) if has_truth else None
    for r in rows:
        t = r["test"]
        line: list[object] = [r["kind"]]
        if bits:
            line += [f"{_fmt(t['bits_per_dim'])} ± {_fmt(t['bits_per_dim_se'])}",
                     _fmt(t["log_likelihood"], 1)]
        else:
            line += [f"{_fmt(t['log_likelihood'])} ± {_fmt(t['log_likelihood_se'])}"]
        if has_truth:
            gap = f"{_fmt(t['gap'], 4)} ± {_fmt(t['gap_se'], 4)}"
            line += [_fmt(t["true_log_likelihood"]), f"**{gap}**" if t["gap"] == best else gap]
            if target is not None:
                line += ["yes" if r["target_met"] else "no"]
        if t["nonfinite"]:
            line[1] = f"{line[1]} ({t['nonfinite']} non-finite rows)"
        stop = " early" if r["stopped_early"] else ""
        line += [_fmt(r["val"]["log_likelihood"]), f"{r['steps_run']} ({r['best_step']}){stop}",
                 f"{r['seconds_per_1000_steps']:.1f}"]
        table.append(line)
    rows_info = first["rows"]
    caption = (f"**{name}** (dim {first['dim']}; train/val/test rows "
               f"{rows_info['train']}/{rows_info['val']}/{rows_info['test']})")
    return caption + "\n\n" + markdown_table(header, table)


def targets(results: list[dict[str, Any]], kinds: list[str]) -> list[dict[str, Any]]:
    """Per target set: the best flow by test gap, its gap ± s.e., and the verdict."""
    out = []
    for name, target in TARGETS.items():
        rows = sorted((r for r in results if r["set"] == name), key=lambda r: r["test"]["gap"])
        if not rows:
            continue
        best = rows[0]
        gap, se = best["test"]["gap"], best["test"]["gap_se"]
        out.append({
            "set": name,
            "target": target,
            "best": best["kind"],
            "gap": gap,
            "gap_se": se,
            "met": gap <= target,
            "met_by": [r["kind"] for r in rows if r["target_met"]],
            "missing": [k for k in kinds if k not in {r["kind"] for r in rows}],
        })
    return out


def _targets_table(rows: list[dict[str, Any]]) -> str:
    from bench.report import markdown_table

    table = []
    for t in rows:
        verdict = ("**met**" if t["met"] else
                   f"**not met** (by {t['gap'] - t['target']:.3f} nats)")
        if t["met"] and t["gap"] + 2 * t["gap_se"] > t["target"]:
            verdict += " (within 2 s.e. of the target)"
        flows = ", ".join(t["met_by"]) or "none"
        if t["missing"]:
            flows += f" (not run: {', '.join(t['missing'])})"
        table.append([t["set"], f"≤ {t['target']}", t["best"],
                      f"{t['gap']:.4f} ± {t['gap_se']:.4f}", verdict, flows])
    return markdown_table(["set", "target gap (nats)", "best flow", "its test gap ± s.e.",
                           "verdict", "flows meeting it"], table)


def _standing(results: list[dict[str, Any]]) -> str:
    lines = []
    for name, target in TARGETS.items():
        rows = sorted((r for r in results if r["set"] == name), key=lambda r: r["test"]["gap"])
        if not rows:
            continue
        best = rows[0]
        met = [r["kind"] for r in rows if r["target_met"]]
        order = ", ".join(f"{r['kind']} {r['test']['gap']:.3f}" for r in rows)
        verdict = (f"**met** by {', '.join(met)}" if met else "**not met** by any flow")
        lines.append(
            f"- **{name}** (target gap ≤ {target} nats): {verdict}; best {best['kind']} "
            f"gap {best['test']['gap']:.4f} ± {best['test']['gap_se']:.4f}. "
            f"All gaps (best first): {order}."
        )
    return "\n".join(lines)


def _tuning_table(payload: dict[str, Any]) -> str:
    """The configurations tried, by validation gap; "used" marks the one in the table."""
    from bench.report import markdown_table

    used = {(r["set"], r["kind"]): (r["train"], r["model"]) for r in payload["results"]}
    rows = []
    def order(t: dict[str, Any]) -> tuple[int, str, float]:
        worse = t["val_gap"] if t.get("val_gap") is not None else -t["val_log_likelihood"]
        return ALL_SETS.index(t["set"]), t["kind"], worse

    for t in sorted(payload["tuning"], key=order):
        mark = "yes" if used.get((t["set"], t["kind"])) == (t["train"], t["model"]) else ""
        over = json.dumps(t["overrides"], sort_keys=True) if t["overrides"] else "(set plan)"
        val = (f"{t['val_gap']:.4f} ± {t['val_gap_se']:.4f}" if t.get("val_gap") is not None
               else f"(no true density) val log-lik {t['val_log_likelihood']:.4f}")
        rows.append([t["set"], t["kind"], over, val, f"{t['steps_run']} ({t['best_step']})",
                     mark])
    return markdown_table(["set", "flow", "overrides of the set's plan", "val gap ± s.e.",
                           "steps (best)", "used"], rows)


def render(payload: dict[str, Any]) -> str:

    results = payload["results"]
    parts = ["## Flow zoo: test log-likelihood against exact entropy", ""]
    if payload.get("quick"):
        parts += ["**Quick smoke run (few steps, small nets): not a result.**", ""]
    cmds = sorted({r.get("command", payload["command"]) for r in results})
    loads = [r["loadavg_end"][0] for r in results if "loadavg_end" in r]
    load = (f"1-minute load average {min(loads):.1f}–{max(loads):.1f} (median "
            f"{float(np.median(loads)):.1f}) when runs finished" if loads else "load not recorded")
    walls = payload.get("wall_by_command", {payload["command"]: payload["wall_seconds"]})
    wall = "; ".join(f"{w:.0f} s" for w in walls.values())
    parts += ["Reproduce: " + "; ".join(f"`{c}`" for c in cmds), "",
              f"Machine: {payload['machine']}; wall time {wall}. One torch thread per run, "
              + (f"up to {payload['jobs']} runs side by side" if payload["jobs"] > 1 else
                 "one run at a time") + " on a 2-core machine shared with other "
              f"work ({load}): the s / 1000 steps are loaded timings, compare within this "
              "table only; they include the periodic validation passes.", ""]
    parts += ["Log-likelihoods are of the user's data units (standardization's log-det "
              "counted), on the test split; models keep their best-validation weights. "
              "\"gap\" = true − model test log-likelihood on the same rows (≈ KL, ≥ 0 in "
              "expectation), paired standard error.", ""]
    if any(r["set"] in TARGETS for r in results):
        parts += ["### Targets", "",
                  "Best flow per set by test gap (true − model test log-likelihood, nats), "
                  "at the target budget of 3000 steps of batch 256 (each flow's "
                  "configuration was chosen on the validation split; see Tuning).", "",
                  _targets_table(payload["targets"]), "",
                  "### Where each model stands against the target", "", _standing(results), ""]
    family_lines = subset_targets(results)
    if family_lines:
        parts += ["### The newer flow families against NSF (issue #24)", "", *family_lines, ""]
    for title, sets in GROUPS.items():
        tables = [t for t in (_table(results, s) for s in sets) if t]
        if tables:
            parts += [f"### {title}", ""]
            for t in tables:
                parts += [t, ""]
    kinds_all = flow_kinds()
    have = {(r["kind"], r["set"]) for r in results}
    missing = {s: [k for k in kinds_all if (k, s) not in have] for s in ALL_SETS}
    missing = {s: ks for s, ks in missing.items() if ks}
    if missing:
        parts += ["### Not measured", "",
                  "No figures yet for: " + "; ".join(
                      f"{s} ({'all flows' if len(ks) == len(kinds_all) else ', '.join(ks)})"
                      for s, ks in missing.items()) + ".", ""]
    if payload.get("tuning"):
        parts += ["### Tuning (validation split only)", "", _tuning_table(payload), ""]
    parts += ["### Configurations", ""]
    for name, cfg in payload["plans"].items():
        if any(r["set"] == name for r in results):
            parts.append(f"- **{name}**: {json.dumps(cfg, sort_keys=True)}")
    if payload.get("notes"):
        parts += ["", "### Notes", "", payload["notes"]]
    return "\n".join(parts).rstrip() + "\n"


NOTES = """\
- Earlier tuning (validation split only; val gap = true − model log-likelihood on the
  validation rows), 128x2 nets, 8 transforms, lr 1e-3: with 30k rows and 8 bins, gmm2 val
  gaps were nsf 0.016, nsf_ar 0.013, maf 0.044, and gmm16 maf 0.41, nsf_ar 0.53 (nsf_ar's best
  validation at step 1000 of 3000: over-fitting); with 100k rows, gmm2 nsf 0.011, nsf_ar
  0.0097, gmm16 maf 0.24; 16 bins instead of 8: gmm2 nsf 0.0085. Adopted: 100k rows for every
  generated set, 16 bins for every spline flow, no early stopping on the generated sets (the
  best-validation weights are kept).
- Each set's plan (`PLANS` in `bench/flows.py`) is the same for every flow; the candidates
  for best flow also got per-flow overrides (`by_kind`: lr 2e-3 with cosine decay, EMA 0.999
  of the weights, sometimes a wider net). Every configuration tried is in the Tuning table
  with its validation gap; the one with the lower validation gap is in `PLANS` and in the
  tables (test figures were not looked at to choose). The rows were trained by the tuning
  driver through `bench.flows.run_one` with those plans, so the reproduce command retrains
  the same rows.
- Coupling flows use alternating masks (NSF has no permutation or LU layer between its
  couplings: `training/flows/spline.py:build_nsf`). Data are standardized on the training
  split (log-det counted), so the splines' tail bound of 5 covers ±5 standard deviations.
- IAF evaluates densities with D sequential MADE passes, so its training step costs about D
  times MAF's; it gets a lower step cap (`max_steps`: gmm6 500, gmm16 300), shown in its
  "steps" column: IAF rows on those sets are below the target budget.
- The residual flow (8 blocks of ActNorm and a 128x2 LipSwish network, exact log-det in
  every figure here) trains at higher rates than the plans' 1e-3: `--tune` tries lr 1e-2,
  2e-2 and 4e-2 with a Lipschitz coefficient of 0.97 per layer and keeps the highest
  validation log-likelihood per set (Tuning table). Those candidates came from exploratory
  runs on gmm2 and 8gaussians (lr 1e-3 to 2e-2, coefficient 0.9 or 0.97, 4 to 16 blocks; the
  400-step ones are `python -m bench.resflow_ablation`), in which the rate mattered most.
  With them the residual flow is the closest flow on gmm6 and gmm16 and within 0.05 nats of
  NSF on gmm2 and 8gaussians. On checkerboard and 2spirals (a density with sharp edges, and
  thin curved arms) the 8-block flow stays 0.28 and 0.35 nats behind NSF, and the three
  rates' validation figures lie within 0.02 (checkerboard) and 0.05 nats (2spirals) of each
  other, so the rate no longer explains the rest. Depth does, in part: 32 and 64 blocks
  (`--tune 3 5` on checkerboard, `--tune 4 6` on 2spirals, at the rate that won there at 8
  blocks) bring checkerboard to 0.17 and 0.12 nats behind NSF and 2spirals to 0.09 and
  0.07, each still short of 0.05, at 190 to 390 s per 1000 steps (5 to 11 times the
  8-block flow's, 5 to 18 times NSF's). Each doubling of depth gains less (2spirals: 0.26
  nats from 8 to 32 blocks, 0.02 from 32 to 64). A likely reason, not measured here: a
  spline draws a sharp edge in one coordinate, while a composition of smooth residual maps
  with bounded slopes approaches one only slowly. One seed per candidate: the validation
  gaps do not fall monotonically with the rate (gmm2: 0.021, 0.054, 0.029 at 1e-2, 2e-2,
  4e-2), so the choice between neighbouring rates is partly noise. Evaluated and exported,
  every spectral norm is exact (`ResidualFlow.eval()` sets each layer's singular vectors by
  an SVD): the per-step power iteration lags weights that move at these rates.
- The residual flow on digits and the small tables (`--tune 0 1 2`: the three 8-block
  candidates, early stopping as every flow there): on digits 2.137 bits/dim, third after
  nsf_ar and nsf (2.018, 2.026) and ahead of maf and realnvp, at 85 to 100 s per 1000 steps
  (the exact 64-dimensional log-det is only evaluated on the validation and test rows); on
  breast_cancer the highest test log-likelihood of every flow but TarFlow (37.9 nats, glow
  31.8; TarFlow 40.2), also second on validation; on wine among the others (-26.8; 18 test
  rows, s.e. 3.7).
- TarFlow (vector tokens of one value each) trains with the plans' network and rate: 8 blocks
  of 2 causal transformer layers of width 128 (2.1 million parameters, 10 to 15 times the
  other flows'), lr 1e-3. Its gaps: gmm2 0.097, gmm6 0.094, gmm16 0.375, 8gaussians 0.140,
  checkerboard 0.211; on 2spirals 0.39 nats below NSF. It is level with NSF on gmm6 and ahead
  of it on gmm16 (0.475), behind the residual flow and MAF there (0.105, 0.202). On the 2-D
  sets a block has two tokens: it maps the first coordinate by a constant affine map and the
  second by an affine map given the first, which is an affine coupling. So it lands beside
  RealNVP and Glow (8gaussians 0.139, 0.121), not beside the splines: the attention has one
  earlier token to read. TarFlow's issue target is on images (digits_image against
  glow_image at equal parameters: met, images section). On wine (13 tokens, early
  stopping) it scores -29.8 nats against NSF's -25.8 (18 test rows, s.e. 3.6). On
  breast_cancer (30 tokens) it has the highest test log-likelihood of every flow, 40.2 nats
  (s.e. 2.7) against the residual flow's 37.9 and NSF's 23.3, and the best validation too
  (44.2): with 30 tokens the attention has context to use. Not run here: digits (a 64-token
  sequence per row).
- FFJORD runs at its defaults (`training.config`: the 64 x 2 velocity network, 5.5 thousand
  parameters, at its own rate of 1e-2, chosen on bench.suite's tuning half), Hutchinson's
  trace in training, the exact divergence for validation and test, and only by `--only
  ffjord` (it is a flow-matching model for serving). Its gaps: gmm2 0.097, 8gaussians 0.068,
  checkerboard 0.452; on 2spirals 0.018 nats below NSF, ahead of the residual flow and
  TarFlow (the other flows measured there). Each step is an adaptive dopri5 solve
  backpropagated step by step, at 510 to 800 s per 1000 steps here (loaded timings), the
  dearest flow in these tables per step with the fewest parameters. On checkerboard, whose
  density has sharp edges, a smooth velocity field of this size does worst of all; on the
  thin curved arms of 2spirals it is close to NSF. FFJORD's issue target is against OT-CFM
  at equal wall time, not against NSF (sections "FFJORD against OT-CFM at equal wall time").
  There it is missed on 8gaussians at 400 and at 2000 steps. Not run here: gmm6, gmm16,
  digits and the tables.
"""


def _plan_json(plan: Plan) -> dict[str, Any]:
    return asdict(plan)


def publish(results: list[dict[str, Any]], *, command: str, quick: bool, jobs: int,
            wall: float, plans: dict[str, Plan], write: bool = True,
            tuning: list[dict[str, Any]] | None = None) -> str:
    """Merge ``results`` into ``docs/bench/flows.json`` and write the ``flows`` section.

    A partial run (``--only`` / ``--sets``) replaces its (flow, set) rows of an earlier run of
    the same kind (quick or not) and keeps the others. ``tuning``: validation-only figures of
    the configurations tried (``set``, ``kind``, ``overrides``, ``val_gap``, ...), kept across
    runs per (set, kind, overrides).
    """
    from bench.report import machine_line, write_results

    payload: dict[str, Any] = {
        "command": command,
        "machine": machine_line(),
        "quick": quick,
        "jobs": jobs,
        "wall_seconds": wall,
        "plans": {s: _plan_json(p) for s, p in plans.items()},
        "notes": NOTES,
        "results": results,
        "tuning": list(tuning or []),
        "wall_by_command": {command: wall},
    }
    if JSON_PATH.exists() and write:
        old = json.loads(JSON_PATH.read_text())
        if bool(old.get("quick")) == quick:
            done = {(r["kind"], r["set"]) for r in results}
            kept = [r for r in old["results"] if (r["kind"], r["set"]) not in done]
            payload["results"] = kept + results
            payload["plans"] = old.get("plans", {}) | payload["plans"]
            payload["jobs"] = max(jobs, old.get("jobs", jobs))  # of every merged run
            if kept:
                old_walls = old.get("wall_by_command",
                                    {old["command"]: old.get("wall_seconds", 0.0)})
                payload["wall_by_command"] = old_walls | {command: wall}

            def key(t: dict[str, Any]) -> str:
                return json.dumps([t["set"], t["kind"], t["overrides"]], sort_keys=True)

            new_keys = {key(t) for t in payload["tuning"]}
            payload["tuning"] = [t for t in old.get("tuning", []) if key(t) not in new_keys
                                 ] + payload["tuning"]
    kinds_all = flow_kinds()
    order = {(k, s): i for i, (s, k) in enumerate(
        (s, k) for s in ALL_SETS for k in kinds_all)}
    payload["results"].sort(key=lambda r: order.get((r["kind"], r["set"]), 1 << 30))
    payload["targets"] = targets(payload["results"], kinds_all)
    markdown = render(payload)
    if write:
        write_results(SECTION, markdown, JSON_PATH, payload)
        print(f"[flows] wrote {JSON_PATH} and the '{SECTION}' section", flush=True)
    else:
        print(markdown)
    return markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flows", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: few steps, small nets")
    parser.add_argument("--only", nargs="+", metavar="KIND", help="flow types (default: all)")
    parser.add_argument("--sets", nargs="+", metavar="NAME", choices=ALL_SETS,
                        help=f"data sets (default: all of {', '.join(ALL_SETS)})")
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (1 thread each)")
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing")
    parser.add_argument("--steps", type=int, help="reduced budget: steps per run (writes the "
                        f"'{SUBSET_SECTION}' section, not the zoo table)")
    parser.add_argument("--rows", type=int, help="reduced budget: rows of generated sets")
    parser.add_argument("--served", action="store_true", help="also the exported model's "
                        f"log_likelihood rows/s at {SERVED_ROWS}-row calls")
    parser.add_argument("--render", action="store_true", help="rewrite the zoo section from "
                        f"{JSON_PATH.relative_to(ROOT)} and the notes in this file; run nothing")
    parser.add_argument("--tune", nargs="*", type=int, metavar="I", help="train the "
                        "candidates of TUNE (those at positions I; none given: the first "
                        "BARE_TUNE of each flow) for the flows in --only "
                        "that it names, keep the one with the lowest validation gap (an "
                        "earlier run's row stays where its gap is lower) and record the "
                        "others in the Tuning table")
    parser.add_argument("--equal-time", action="store_true", help="reduced budget: also "
                        "OT-CFM trained for as long as FFJORD took on each set (needs ffjord "
                        "in --only)")
    args = parser.parse_args(argv)

    if args.render:
        from bench.report import publish as publish_section

        publish_section(SECTION, render, JSON_PATH,
                        json.loads(JSON_PATH.read_text()) | {"notes": NOTES})
        return 0
    kinds_all = flow_kinds()
    kinds = args.only or kinds_all
    unknown = [k for k in kinds if k not in kinds_all + list(ODE_KINDS)]
    if unknown:
        parser.error(f"not flow types: {unknown}; choose from {kinds_all}")
    sets = args.sets or ALL_SETS
    plans = {s: quick_plan(PLANS[s]) if args.quick else PLANS[s] for s in sets}
    subset = args.steps is not None or args.rows is not None
    if subset:
        plans = {s: subset_plan(p, args.steps, args.rows) for s, p in plans.items()}
    from bench.report import command_line

    command = command_line("bench.flows", argv)

    jobs = [(k, s, plans[s], SEED, args.served) for s in sets for k in kinds
            if not (args.tune is not None and k in TUNE)]
    if args.tune is not None:
        if subset:
            parser.error("--tune chooses configurations at the zoo's budget: drop --steps "
                         "and --rows")
        jobs += tuning_jobs(kinds, sets, plans, args.served, args.tune or None)
    if args.jobs > 1:
        jobs.sort(key=lambda j: -_cost(j[0], j[1], j[2]))
    print(f"[flows] {len(jobs)} runs, jobs={args.jobs}: {command}", flush=True)
    start = time.perf_counter()
    results: list[dict[str, Any]] = []

    def report(res: dict[str, Any]) -> None:
        t = res["test"]
        extra = (f" gap {t['gap']:.4f}±{t['gap_se']:.4f}" if "gap" in t else "")
        print(f"[flows] {time.perf_counter() - start:7.0f}s {res['set']:>13} {res['kind']:>7}: "
              f"test ll {t['log_likelihood']:.4f}±{t['log_likelihood_se']:.4f}{extra} "
              f"bpd {t['bits_per_dim']:.3f} steps {res['steps_run']} "
              f"{res['seconds_per_1000_steps']:.1f}s/1k"
              + (f" served {res['served_rows_per_s']:.0f} rows/s" if "served_rows_per_s" in res
                 else ""), flush=True)
        res["command"] = command
        results.append(res)

    from bench.jobs import run_jobs

    run_jobs(_job, jobs, args.jobs, report)
    if args.equal_time:
        if not subset or "ffjord" not in kinds:
            parser.error("--equal-time needs --steps or --rows and ffjord in --only")
        timed = [("otcfm", r["set"], replace(plans[r["set"]], steps=TIMED_STEP_CAP,
                                             max_seconds=r["train_seconds"]), SEED, False)
                 for r in list(results) if r["kind"] == "ffjord"]

        def report_timed(res: dict[str, Any]) -> None:
            res["kind"] = EQUAL_TIME_KIND
            report(res)

        run_jobs(_job, timed, args.jobs, report_timed)
    wall = time.perf_counter() - start
    print(f"[flows] done in {wall:.0f}s", flush=True)

    if subset:
        publish_subset(results, command=command, wall=wall, write=not args.no_write,
                       merge=args.served or args.equal_time)
        return 0
    results, tuning = pick_tuned(results)
    if args.tune and JSON_PATH.exists() and not args.quick:  # some candidates: the best stays
        results = kept_if_better(results, tuning, json.loads(JSON_PATH.read_text()))
    for r in tuning:
        print(f"[flows] tuning {r['set']} {r['kind']} {r['overrides'] or '(set plan)'}: "
              f"val log-lik {r['val_log_likelihood']:.4f}", flush=True)
    publish(results, command=command, quick=args.quick, jobs=args.jobs, wall=wall,
            plans=plans, write=not args.no_write, tuning=tuning)
    return 0


EQUAL_TIME_KIND = "otcfm, FFJORD's time"
TIMED_STEP_CAP = 1_000_000  # --equal-time: the wall-clock budget, not this, ends OT-CFM's run


def subset_targets(results: list[dict[str, Any]]) -> list[str]:
    """The issue's targets a reduced run can speak to, each met / not met / not measured."""
    by = {(r["set"], r["kind"]): r["test"] for r in results}
    pace = {(r["set"], r["kind"]): r["seconds_per_1000_steps"] for r in results}
    from training.data import DATASETS

    lines = []
    for name in sorted({r["set"] for r in results}):
        ff, ot = by.get((name, "ffjord")), by.get((name, "otcfm"))
        if ff and ot:
            diff = ff["log_likelihood"] - ot["log_likelihood"]
            ratio = pace[(name, "ffjord")] / pace[(name, "otcfm")]
            timed = by.get((name, EQUAL_TIME_KIND))
            at_time = ("not measured" if timed is None else
                       f"{ff['log_likelihood'] - timed['log_likelihood']:+.3f} nats, **"
                       + ("met" if ff["log_likelihood"] > timed["log_likelihood"]
                          else "not met") + "**")
            lines.append(f"- {name}: FFJORD test log-likelihood {diff:+.3f} nats vs OT-CFM's "
                         f"PF-ODE at the same network and steps (target > 0): "
                         f"**{'met' if diff > 0 else 'not met'}** at equal steps; FFJORD took "
                         f"{ratio:.1f}x OT-CFM's training time; at equal wall time "
                         f"(`{EQUAL_TIME_KIND}`): {at_time}")
        rf, nsf = by.get((name, "resflow")), by.get((name, "nsf"))
        if rf and nsf:
            diff = nsf["log_likelihood"] - rf["log_likelihood"]
            side = "below" if diff > 0 else "above"
            # the issue sets this target on the 2-D toys; other sets show the difference only
            dim = DATASETS[name].dim
            verdict = (f"(target: at most 0.05 below): **{'met' if diff <= 0.05 else 'not met'}**"
                       if dim == 2 else f"(D = {dim}: no target, which the issue sets on the "
                       "2-D toys)")
            lines.append(f"- {name}: residual flow {abs(diff):.3f} nats {side} NSF {verdict}")
        for kind, label, target in _NO_NSF_TARGET:
            other = by.get((name, kind))
            if other and nsf and not (kind == "ffjord" and ot):
                diff = nsf["log_likelihood"] - other["log_likelihood"]
                lines.append(f"- {name}: {label} {abs(diff):.3f} nats "
                             f"{'below' if diff > 0 else 'above'} NSF (no target against NSF: "
                             f"{target})")
    return lines


# the newer families whose issue #24 target is not a distance to NSF: (kind, label, where it is)
_NO_NSF_TARGET = (
    ("tarflow", "TarFlow", "its target is on digits_image, in the images section"),
    ("ffjord", "FFJORD", "its target is OT-CFM at equal wall time, in the sections \"FFJORD "
     "against OT-CFM at equal wall time\""),
)


def _merged(results: list[dict[str, Any]], command: str) -> list[dict[str, Any]]:
    """``results`` (each tagged with ``command``) and the earlier run's rows of the other
    (set, model) pairs from ``SUBSET_JSON``, tagged with that run's command."""
    if not SUBSET_JSON.exists():
        return results
    old = json.loads(SUBSET_JSON.read_text())
    fresh = {(r["set"], r["kind"]) for r in results}
    kept = [r | {"command": r.get("command", old["command"])} for r in old["results"]
            if (r["set"], r["kind"]) not in fresh]
    return kept + [r | {"command": command} for r in results]


SUBSET_NOTES = """\
Runs 1 and 2 trained on the same rows with the same seeds: run 2's gmm2 test
log-likelihoods for NSF, TarFlow, OT-CFM and the residual flow repeat run 1's to the fourth
decimal (run 1 was stopped by
its 900 s limit before FFJORD on gmm2; run 2 measured it). Seconds per 1000 steps depend on
the machine's load during each run (other engineers' suites ran beside both): compare them
only within a run. Run 4 retrains the residual flow after its spectral norms were made
exact at evaluation (`ResidualFlow.eval()`): its test log-likelihoods moved by under 0.001
nats.

The rows/s column (run 2): `log_likelihood` of the test split's first 64 rows, the model
exported to ONNX and run in process by the service's runtime (`ModelRuntime.log_likelihood`:
preprocessing, the family's graphs, the PF-ODE solver for OT-CFM and FFJORD with their
default exact divergence and dopri5), one thread, median of 15 calls after a warm-up. It is
the served path without HTTP: per-request HTTP cost is not in it (the serving section
measures that). Next to NSF: the residual flow's exact 2-D log-det graph answers 1.20x NSF's
rows/s, TarFlow 0.039x (its one pass runs two transformer layers per block), FFJORD 0.021x
and OT-CFM 0.017x (tens of adaptive dopri5 steps, each a velocity and divergence call).

Here 400 steps on 5000 rows: every model is far from converged, so the gaps say more about
speed of learning than about capacity. The residual flow at the zoo's budget (3000 steps on
100k rows; gmm2, gmm6, gmm16, 8gaussians, checkerboard, 2spirals) is in the flow zoo
section, and so are TarFlow (vector tokens: the Gaussian mixtures and the 2-D toys) and
FFJORD at its defaults (the 2-D toys). **Not measured** at that budget: TarFlow on digits,
FFJORD on the other sets. TarFlow on digits_image
against glow_image at equal parameters, with its samples beside glow_image's, is in the
images section (`python -m bench.images`).

Run 3 repeats FFJORD and OT-CFM at 400 steps (the same test log-likelihoods as runs 1 and
2, to the fourth decimal) and then trains OT-CFM for as long as FFJORD's loop took on each
set (`TrainConfig.max_seconds`: OT-CFM's cosine schedule then runs on the clock). At equal
wall time OT-CFM takes 7.5 (gmm2) and 6.2 (8gaussians) times the steps, and its PF-ODE
log-likelihood ends 0.64 (gmm2) and 0.83 (8gaussians) nats above FFJORD's: maximum likelihood
learns more per step, the simulation-free loss more per second, at this budget and rate. At
each model's own rate, chosen on validation (`python -m bench.ffjord_rate`, section "FFJORD
against OT-CFM at equal wall time, each at its own rate"), the two tie on gmm2 and OT-CFM
leads by 0.06 nats on 8gaussians.

Why the residual flow misses here: its learning rate. Every model above trains at lr 1e-3;
changing one thing at a time on the same rows (`python -m bench.resflow_ablation`, section
"Residual flow at the reduced budget") shows that training on the exact log-det instead of
the roulette estimator, a Lipschitz coefficient of 0.97 or four times the blocks move the gap
little, and a learning rate of 1e-2 most. At the zoo's budget, with its learning rate chosen
on the validation split, the residual flow's gap to NSF is in the flow zoo section.
"""


def publish_subset(results: list[dict[str, Any]], *, command: str, wall: float,
                   write: bool, merge: bool = False) -> str:
    """The reduced-budget comparison of the newer families with NSF / OT-CFM; with
    ``merge``, this run's rows replace the earlier run's for the same (set, model) and the
    others are kept (each row names the command that measured it)."""
    from bench.report import machine_line, markdown_table, write_results

    if merge:
        results = _merged(results, command)
    commands = list(dict.fromkeys(r.get("command", command) for r in results))
    served = any("served_rows_per_s" in r for r in results)
    rows = [[r["set"], r["kind"], r["parameters"], r["steps_run"],
             f"{r['seconds_per_1000_steps']:.1f}", f"{r['test']['log_likelihood']:.4f}",
             _fmt(r["test"].get("gap")), _fmt(r["test"].get("gap_se"))]
            + ([_fmt(r.get("served_rows_per_s"), 0)] if served else [])
            + ([commands.index(r.get("command", command)) + 1] if len(commands) > 1 else [])
            for r in results]
    header = ["set", "model", "parameters", "steps", "s / 1000 steps", "test log-lik (nats)",
              "gap to truth", "gap s.e."]
    header += [f"log_likelihood rows/s ({SERVED_ROWS}-row calls)"] if served else []
    header += ["run"] if len(commands) > 1 else []
    runs = "; ".join(f"run {i}: `{c}`" if len(commands) > 1 else f"`{c}`"
                     for i, c in enumerate(commands, start=1))
    markdown = "\n".join([
        "## Flow families at a reduced budget: FFJORD, residual flow, TarFlow",
        "",
        f"{runs} ({wall:.0f} s wall for the last, {machine_line()}). Every model: hidden 64, "
        "2 layers, "
        "4 transforms (TarFlow: 4 blocks of 2 transformer layers, width 64), batch 256, the "
        "same rows and seed; test log-likelihood with each model's own exact method "
        "(flows one pass; OT-CFM and FFJORD the PF-ODE by dopri5 with the exact divergence). "
        "A reduced budget, not the zoo table's 3000 steps on 100k rows.",
        "",
        markdown_table(header, rows),
        "",
        *subset_targets(results),
        "",
        SUBSET_NOTES,
    ]).rstrip() + "\n"
    if write:
        write_results(SUBSET_SECTION, markdown, SUBSET_JSON,
                      {"command": command, "commands": commands, "wall_seconds": wall,
                       "results": results})
    else:
        print(markdown)
    return markdown


if __name__ == "__main__":
    raise SystemExit(main())
