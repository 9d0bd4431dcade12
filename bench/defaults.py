"""Defaults on data nobody tuned for (issue #30): our defaults next to zuko's and torchcfm's.

Two phases over ``bench/suite.py``:

* ``tune``: a bounded search on the **tuning half's validation splits** only: a few
  candidate configurations per model group (flows: nsf, nsf_ar, maf alike; fields: ddpm, cfm,
  otcfm alike), mean gap to the true validation log-likelihood (flows) and mean W2 excess at
  16 NFE (fields). Its JSON goes to ``docs/bench/defaults_tune.json``.
* ``confirm``: the defaults of ``training/config.py`` (whatever they are at the time) and the
  peers on the **confirmation half**, once, at 3000 x 256: per set the gap to the true test
  log-likelihood of each default flow and of ``--model auto`` beside zuko's NSF and MAF (its
  own defaults: 5 transforms, hidden (128, 128), Adam 1e-3, final weights), and the W2 excess
  at 1/4/16/100 NFE of the default OT-CFM, CFM and DDPM beside torchcfm's OT-CFM and CFM
  (3 x 256 SELU MLP of its examples, sigma 0, Adam 1e-3, Euler), with paired standard errors
  and seconds per 1000 steps. It writes the section of docs/BENCHMARKS.md.

``--groups resflow`` runs the residual flow alone: ``tune`` weighs its candidates (learning
rate and Lipschitz coefficient) on the flows' tuning sets, ``confirm`` its default's gap on
the confirmation sets with a true density, set beside the flows' table of the same set, and
its validation log-likelihood, from which ``render`` puts ``--model auto`` (whose candidates
include it) beside the best default on every set.
``tune --groups ffjord`` weighs FFJORD's learning rates the same way (its log-likelihood by
the PF-ODE); ``--candidates`` splits a group's candidates between processes, and ``render``
merges every ``defaults_tune*.json``.

Peers train on the same rows, standardized with the training split's mean and std (the
log-det is counted, so every log-likelihood is in data units).

    python -m bench.defaults tune
    python -m bench.defaults confirm
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.suite import SUITE, SuiteSet, suite_splits

__all__ = ["CANDIDATES", "main", "peer_field", "peer_flow", "render", "train_ours"]

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 3000, 256
TUNE_STEPS = 1000
NFES = (1, 4, 16, 100)
W2_ROWS = 2000
W2_SEEDS = 3  # noise seeds of the 16-NFE cell (paired standard errors)
FLOWS = ("nsf", "nsf_ar", "maf")
FIELDS = ("otcfm", "cfm", "ddpm")

# The search, cut to what 2 shared cores run in about 15 minutes per group: 1000 steps, not
# 3000; two tuning sets for the density groups and three for fields; otcfm stands for the
# fields.
_RESFLOW_NET = {"hidden_features": 128, "hidden_layers": 2, "transforms": 5}
_FFJORD_NET = {"hidden_features": 64, "hidden_layers": 2}
CANDIDATES: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any]]]] = {
    "flow": {
        "w64 (old default)": ({"hidden_features": 64}, {}),
        "w128": ({"hidden_features": 128}, {}),
    },
    # the residual flow on the other flows' default network (the width rule of D, 2 layers,
    # 5 blocks): its spectrally normalised blocks and the flows' lr 1e-3 (bench.resflow_ablation)
    "resflow": {
        "lr 1e-3, Lipschitz 0.9 (old default)": (_RESFLOW_NET, {}),
        "lr 1e-2, Lipschitz 0.97": (_RESFLOW_NET | {"lipschitz": 0.97}, {"lr": 1e-2}),
        "lr 2e-2, Lipschitz 0.97": (_RESFLOW_NET | {"lipschitz": 0.97}, {"lr": 2e-2}),
        "lr 4e-2, Lipschitz 0.97": (_RESFLOW_NET | {"lipschitz": 0.97}, {"lr": 4e-2}),
    },
    # FFJORD on its class network (64 x 2, the width rule of D on top): only the rate, which
    # moved its 400-step gap from 1.04 to 0.055 nats on gmm2 (bench.ffjord_rate)
    "ffjord": {
        "lr 1e-3 (old default)": (_FFJORD_NET, {}),
        "lr 1e-2": (_FFJORD_NET, {"lr": 1e-2}),
        "lr 3e-2": (_FFJORD_NET, {"lr": 3e-2}),
    },
    "field": {
        "64x2 (old default)": ({"hidden_features": 64, "hidden_layers": 2}, {}),
        "128x3, lr 2e-3, EMA": ({"hidden_features": 128, "hidden_layers": 3},
                                {"lr": 2e-3, "ema_decay": 0.999}),
        "256x3, lr 3e-3, EMA": ({"hidden_features": 256, "hidden_layers": 3},
                                {"lr": 3e-3, "ema_decay": 0.999}),
    },
}
TUNE_SETS = {"flow": ("gmm10_t", "tmix4_t"), "resflow": ("gmm10_t", "tmix4_t"),
             "ffjord": ("gmm10_t", "tmix4_t"), "field": ("gmm10_t", "tmix4_t", "curve8_t")}
DENSITY_GROUPS = {"flow": FLOWS, "resflow": ("resflow",), "ffjord": ("ffjord",)}
"""The tuning groups scored by the gap to the true validation log-likelihood, and their
model types (each candidate trained once per type and set)."""


# --------------------------------------------------------------------------- training


def _summary(s: SuiteSet, train: np.ndarray) -> Any:
    from training.checkpoint import DataSummary

    return DataSummary(name=s.name, source="suite", rows=len(train), dim=train.shape[1],
                       mean=train.mean(0).tolist(), std=train.std(0).tolist())


def train_ours(kind: str, s: SuiteSet, steps: int, model: dict[str, Any] | None = None,
               train: dict[str, Any] | None = None) -> tuple[Any, float]:
    """A checkpoint of ``kind`` (the defaults unless ``model``/``train`` say), and its s."""
    from training.config import (
        ModelConfig,
        TrainConfig,
        default_model_config,
        default_train_config,
    )
    from training.fit import fit_arrays

    x_train, x_val, _ = suite_splits(s)
    model_cfg = (default_model_config(kind, s.dim) if model is None
                 else ModelConfig(**model))
    fields = {"steps": steps, "batch_size": BATCH, "progress": False}
    train_cfg = (default_train_config(kind, **fields) if train is None
                 else TrainConfig(**(train | fields)))
    t0 = time.perf_counter()
    ckpt = fit_arrays(kind, x_train, x_val, data=_summary(s, x_train), model_cfg=model_cfg,
                      train_cfg=train_cfg)
    return ckpt, time.perf_counter() - t0


def _standardizer(x_train: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    mean, std = x_train.mean(0), x_train.std(0)
    return mean, std, float(np.log(std).sum())


def peer_flow(kind: str, s: SuiteSet, steps: int, seed: int = 0
              ) -> tuple[Callable[[np.ndarray], np.ndarray], float]:
    """zuko's NSF or MAF with its own defaults; returns ``log p(x)`` in data units and its s."""
    import torch
    import zuko

    torch.manual_seed(seed)
    x_train, _, _ = suite_splits(s)
    mean, std, log_std = _standardizer(x_train)
    xt = torch.as_tensor((x_train - mean) / std, dtype=torch.float32)
    build = {"nsf": zuko.flows.NSF, "maf": zuko.flows.MAF}[kind]
    flow = build(s.dim, transforms=5, hidden_features=(128, 128))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = xt[torch.randint(len(xt), (BATCH,), generator=gen)]
        loss = -flow().log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0

    def log_prob(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            u = torch.as_tensor((x - mean) / std, dtype=torch.float32)
            return flow().log_prob(u).double().numpy() - log_std

    return log_prob, seconds


def peer_field(kind: str, s: SuiteSet, steps: int, seed: int = 0
               ) -> tuple[Callable[[int, int, int], np.ndarray], float]:
    """torchcfm's OT-CFM or CFM (its examples' 3 x 256 SELU MLP, sigma 0, Adam 1e-3);
    returns ``sample(n, nfe, seed)`` (Euler, data units) and its s."""
    import torch
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )
    from torchcfm.models.models import MLP

    torch.manual_seed(seed)
    x_train, _, _ = suite_splits(s)
    mean, std, _ = _standardizer(x_train)
    xt = torch.as_tensor((x_train - mean) / std, dtype=torch.float32)
    matcher = {"otcfm": ExactOptimalTransportConditionalFlowMatcher,
               "cfm": ConditionalFlowMatcher}[kind](sigma=0.0)
    net = MLP(dim=s.dim, w=256, time_varying=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        x1 = xt[torch.randint(len(xt), (BATCH,), generator=gen)]
        x0 = torch.randn(x1.shape, generator=gen)
        t, x_t, u_t = matcher.sample_location_and_conditional_flow(x0, x1)
        loss = ((net(torch.cat([x_t, t[:, None]], -1)) - u_t) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0

    def sample(n: int, nfe: int, seed_: int) -> np.ndarray:
        g = torch.Generator().manual_seed(seed_)
        x = torch.randn((n, s.dim), generator=g)
        with torch.no_grad():
            for i in range(nfe):
                t = torch.full((n, 1), i / nfe)
                x = x + net(torch.cat([x, t], -1)) / nfe
        return x.double().numpy() * std + mean

    return sample, seconds


# --------------------------------------------------------------------------- metrics


def _ours_log_prob(ckpt: Any) -> Callable[[np.ndarray], np.ndarray]:
    from training.evaluate import data_log_prob

    return lambda x: data_log_prob(ckpt, x)["log_prob"]


def _ours_sampler(ckpt: Any) -> Callable[[int, int, int], np.ndarray]:
    from training.evaluate import sample_data

    return lambda n, nfe, seed: sample_data(ckpt, n, seed=seed, steps=nfe)


def _w2_floor(s: SuiteSet, ref: np.ndarray) -> float:
    from training.metrics import wasserstein2

    return wasserstein2(s.density().sample(len(ref), np.random.default_rng(99)), ref)


def _w2_excess(sample: Callable[[int, int, int], np.ndarray], ref: np.ndarray, floor: float,
               nfe: int, seed: int) -> float:
    from training.metrics import wasserstein2

    x = sample(len(ref), nfe, seed)
    if not np.isfinite(x).all():
        return math.inf
    return wasserstein2(x, ref) - floor


def _paired(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = np.asarray(a, float) - np.asarray(b, float)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return {"mean": float(d.mean()), "se": se}


# --------------------------------------------------------------------------- phases


def tune(groups: tuple[str, ...] = ("flow", "field"), only: list[str] | None = None
         ) -> dict[str, Any]:
    """Each candidate on the tuning half's validation splits (mean over sets)."""
    from bench.report import machine_line

    out: dict[str, Any] = {"machine": machine_line(), "steps": TUNE_STEPS, "batch": BATCH,
                           "sets": {g: TUNE_SETS[g] for g in groups},
                           **{g: {} for g in groups}}
    for group, kinds in DENSITY_GROUPS.items():
        for label, (model, train) in CANDIDATES[group].items() if group in groups else ():
            if only and label not in only:
                continue
            rows = {}
            for name in TUNE_SETS[group]:
                s = SUITE[name]
                _, x_val, _ = suite_splits(s)
                truth = float(s.density().log_density(x_val).mean())
                for kind in kinds:
                    ckpt, secs = train_ours(kind, s, TUNE_STEPS, _width(model, s.dim), train)
                    gap = truth - float(_ours_log_prob(ckpt)(x_val).mean())
                    rows[f"{name}/{kind}"] = {"gap": gap, "seconds": secs}
                    print(f"tune {group} {label} {name} {kind}: gap {gap:.4f} ({secs:.0f} s)",
                          file=sys.stderr, flush=True)
            out[group][label] = rows
    for label, (model, train) in CANDIDATES["field"].items() if "field" in groups else ():
        if only and label not in only:
            continue
        rows = {}
        for name in TUNE_SETS["field"]:
            s = SUITE[name]
            _, x_val, _ = suite_splits(s)
            floor = _w2_floor(s, x_val)
            ckpt, secs = train_ours("otcfm", s, TUNE_STEPS, model, train)
            w2 = _w2_excess(_ours_sampler(ckpt), x_val, floor, 16, 0)
            rows[f"{name}/otcfm"] = {"w2_excess_16": w2, "seconds": secs}
            print(f"tune field {label} {name}: W2 excess {w2:.4f} ({secs:.0f} s)",
                  file=sys.stderr, flush=True)
        out["field"][label] = rows
    return out


def _width(model: dict[str, Any], dim: int) -> dict[str, Any]:
    """The flow candidates' width under the config's rule of D (at least 4 D)."""
    return model | {"hidden_features": max(model["hidden_features"], 4 * dim)}


def confirm_set(name: str, groups: tuple[str, ...] = ("flow", "field")) -> dict[str, Any]:
    """Our defaults and the peers on one confirmation set, at ``STEPS`` x ``BATCH``."""
    from training.auto import best_by_validation

    s = SUITE[name]
    _, _, x_test = suite_splits(s)
    density = s.density()
    truth = None if density is None else density.log_density(x_test)
    res: dict[str, Any] = {"set": name, "dim": s.dim, "summary": s.summary}
    if "flow" in groups:
        ll, secs, val = {}, {}, {}
        for kind in FLOWS:
            ckpt, secs[kind] = train_ours(kind, s, STEPS)
            ll[kind] = _ours_log_prob(ckpt)(x_test)
            val[kind] = validation_log_likelihood_rows(ckpt, s)
            print(f"confirm {name} {kind}: {ll[kind].mean():.4f} ({secs[kind]:.0f} s)",
                  file=sys.stderr, flush=True)
        auto = best_by_validation(val)
        for kind in ("nsf", "maf"):
            f, secs[f"zuko_{kind}"] = peer_flow(kind, s, STEPS)
            ll[f"zuko_{kind}"] = f(x_test)
            print(f"confirm {name} zuko_{kind}: {ll[f'zuko_{kind}'].mean():.4f}",
                  file=sys.stderr, flush=True)
        ll["auto"] = ll[auto]
        ref = truth if truth is not None else ll["zuko_nsf"]
        res["flow"] = {
            "auto_chose": auto, "val_log_likelihood": val,
            "seconds_per_1000": {k: v * 1000 / STEPS for k, v in secs.items()},
            "test_log_likelihood": {k: float(v.mean()) for k, v in ll.items()},
            "true_log_likelihood": None if truth is None else float(truth.mean()),
            # gap (truth - model) with its s.e.; tables: minus log-likelihood vs zuko NSF
            "gap": {k: _paired(ref, v) for k, v in ll.items()},
        }
        ours = min(FLOWS, key=lambda k: -ll[k].mean())
        peer = max(("zuko_nsf", "zuko_maf"), key=lambda k: ll[k].mean())
        res["flow"]["best_ours"], res["flow"]["best_peer"] = ours, peer
        res["flow"]["best_vs_peer"] = _paired(ll[peer], ll[ours])  # > 0: ours further
        res["flow"]["auto_vs_best"] = _paired(ll[ours], ll["auto"])
    if "resflow" in groups:
        ckpt, secs_rf = train_ours("resflow", s, STEPS)
        ll_rf = _ours_log_prob(ckpt)(x_test)
        print(f"confirm {name} resflow: {ll_rf.mean():.4f} ({secs_rf:.0f} s)",
              file=sys.stderr, flush=True)
        res["resflow"] = {"seconds_per_1000": {"resflow": secs_rf * 1000 / STEPS},
                          # --model auto's score, to choose among the flows' and this run
                          "val_log_likelihood": validation_log_likelihood_rows(ckpt, s),
                          "test_log_likelihood": float(ll_rf.mean()),
                          "test_se": float(ll_rf.std(ddof=1) / math.sqrt(len(ll_rf))),
                          "true_log_likelihood": None if truth is None else float(truth.mean()),
                          "gap": None if truth is None else _paired(truth, ll_rf)}
    if "field" in groups and density is not None:
        floor = _w2_floor(s, x_test)
        samplers, secs = {}, {}
        for kind in FIELDS:
            ckpt, secs[kind] = train_ours(kind, s, STEPS)
            samplers[kind] = _ours_sampler(ckpt)
            print(f"confirm {name} {kind} trained ({secs[kind]:.0f} s)", file=sys.stderr,
                  flush=True)
        for kind in ("otcfm", "cfm"):
            samplers[f"torchcfm_{kind}"], secs[f"torchcfm_{kind}"] = peer_field(kind, s, STEPS)
        w2: dict[str, dict[str, list[float]]] = {}
        for k, f in samplers.items():
            w2[k] = {str(n): [_w2_excess(f, x_test, floor, n, seed)
                              for seed in range(W2_SEEDS if n == 16 else 1)] for n in NFES}
            print(f"confirm {name} {k}: W2 excess {w2[k]}", file=sys.stderr, flush=True)
        ours = min(FIELDS, key=lambda k: np.mean(w2[k]["16"]))
        peer = min(("torchcfm_otcfm", "torchcfm_cfm"), key=lambda k: np.mean(w2[k]["16"]))
        res["field"] = {"floor": floor, "w2_excess": w2,
                        "seconds_per_1000": {k: v * 1000 / STEPS for k, v in secs.items()},
                        "best_ours": ours, "best_peer": peer,
                        "best_vs_peer_16": _paired(np.array(w2[ours]["16"]),
                                                   np.array(w2[peer]["16"]))}
    return res


def validation_log_likelihood_rows(ckpt: Any, s: SuiteSet) -> float:
    """``--model auto``'s score on a suite set: mean log-likelihood of its validation rows."""
    _, x_val, _ = suite_splits(s)
    return float(np.mean(_ours_log_prob(ckpt)(x_val)))


# --------------------------------------------------------------------------- report


def _pm(d: dict[str, float]) -> str:
    return f"{d['mean']:.3f} ± {d['se']:.3f}"


def _tune_tables(tune_: dict[str, Any]) -> list[str]:
    from bench.report import markdown_table

    out = []
    for group, kinds in DENSITY_GROUPS.items():
        cands = tune_.get(group, {})
        if cands:
            rows = [[label] + [float(np.mean([v["gap"] for k, v in res.items()
                                              if k.endswith("/" + kind)])) for kind in kinds]
                    + ([", ".join(f"{k.split('/')[0]} {v['gap']:.3f}" for k, v in res.items())]
                       if len(kinds) == 1 else [])
                    for label, res in cands.items()]
            out.append(markdown_table([f"{group} candidate",
                                       *[f"{k}: mean gap" for k in kinds]]
                                      + (["per set"] if len(kinds) == 1 else []), rows))
    fields = tune_.get("field", {})
    if fields:
        rows = [[label, float(np.mean([v["w2_excess_16"] for v in res.values()])),
                 ", ".join(f"{k.split('/')[0]} {v['w2_excess_16']:.3f}"
                           for k, v in res.items())]
                for label, res in fields.items()]
        out.append(markdown_table(["field candidate (otcfm)", "mean W2 excess, 16 NFE",
                                   "per set"], rows))
    return out


def _flow_rows(results: list[dict[str, Any]]) -> tuple[list[list[Any]], list[float], int]:
    rows, ratios, met = [], [], 0
    for r in results:
        f = r.get("flow")
        if f is None:
            continue
        g = f["gap"]
        ours, peer = g[f["best_ours"]]["mean"], g[f["best_peer"]]["mean"]
        ok = ours <= peer
        met += ok
        if peer > 0 and r.get("flow", {}).get("true_log_likelihood") is not None:
            ratios.append(ours / peer)
        rows.append([r["set"], r["dim"], *[_pm(g[k]) for k in (*FLOWS, "auto")],
                     f["auto_chose"], _pm(g["zuko_nsf"]), _pm(g["zuko_maf"]),
                     _pm(f["best_vs_peer"]), "met" if ok else "missed",
                     _pm(f["auto_vs_best"])])
    return rows, ratios, met


def _resflow_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for r in results:
        rf, f = r.get("resflow"), r.get("flow")
        if rf is None or f is None or rf["gap"] is None:
            continue
        ours, peer = f["gap"][f["best_ours"]], f["gap"][f["best_peer"]]
        diff = {"mean": rf["gap"]["mean"] - peer["mean"],
                "se": math.hypot(rf["gap"]["se"], peer["se"])}
        rows.append([r["set"], r["dim"], _pm(rf["gap"]), f"{f['best_ours']} {_pm(ours)}",
                     f"{f['best_peer']} {_pm(peer)}", _pm(diff),
                     "closer" if diff["mean"] <= 0 else "further"])
    return rows


def _auto_rows(results: list[dict[str, Any]]) -> tuple[list[list[Any]], int]:
    """``--model auto`` over ``AUTO_CANDIDATES`` (the flows' run and the residual flow's run
    of the same set): its choice by validation, and its test log-likelihood against the best
    candidate's (s.e. of a difference of two runs' means where they differ, not paired)."""
    from training.auto import AUTO_CANDIDATES, best_by_validation

    rows, met = [], 0
    for r in results:
        rf, f = r.get("resflow"), r.get("flow")
        if rf is None or f is None or "val_log_likelihood" not in rf:
            continue
        val = f["val_log_likelihood"] | {"resflow": rf["val_log_likelihood"]}
        test = f["test_log_likelihood"] | {"resflow": rf["test_log_likelihood"]}
        # the s.e. of each candidate's mean: paired against the truth (or zuko NSF's rows)
        # for the flows' run; the resflow run's against the truth, or its rows' own spread
        se = {k: f["gap"][k]["se"] for k in FLOWS} | {
            "resflow": rf["gap"]["se"] if rf["gap"] is not None else rf["test_se"]}
        chose = best_by_validation({k: val[k] for k in AUTO_CANDIDATES})
        best = max(AUTO_CANDIDATES, key=test.__getitem__)
        diff = {"mean": test[best] - test[chose],
                "se": 0.0 if chose == best else math.hypot(se[best], se[chose])}
        ok = diff["mean"] <= diff["se"]
        met += ok
        rows.append([r["set"], r["dim"], chose, f"{test[chose]:.3f}", best, f"{test[best]:.3f}",
                     _pm(diff), "met" if ok else "missed"])
    return rows, met


def _field_rows(results: list[dict[str, Any]]) -> tuple[list[list[Any]], list[float], int]:
    kinds = (*FIELDS, "torchcfm_otcfm", "torchcfm_cfm")
    rows, ratios, met = [], [], 0
    for r in results:
        f = r.get("field")
        if f is None:
            continue
        w2 = f["w2_excess"]
        for n in NFES:
            rows.append([r["set"], n, *[f"{np.mean(w2[k][str(n)]):.3f}" for k in kinds]])
        ours, peer = np.mean(w2[f["best_ours"]]["16"]), np.mean(w2[f["best_peer"]]["16"])
        met += bool(ours <= peer)
        if peer > 0:
            ratios.append(float(ours / peer))
        rows.append([r["set"], "16: best ours − best peer", _pm(f["best_vs_peer_16"]),
                     f["best_ours"], f["best_peer"], "met" if ours <= peer else "missed", ""])
    return rows, ratios, met


def render(tune_: dict[str, Any] | None, confirm: dict[str, Any] | None, command: str,
           notes: str = "") -> str:
    from bench.report import machine_line, markdown_table

    parts = ["## Defaults on data nobody tuned for (issue #30)", "",
             f"Machine: {machine_line()}; shared with other work (timings move with load; the "
             "quality figures do not). Sets: `bench/suite.py` (tuning and confirmation "
             "halves fixed in the code before any run). Commands:", "", "```", command,
             "```", ""]
    if tune_:
        where = {"flow": "flows", "resflow": "the residual flow", "ffjord": "FFJORD",
                 "field": "fields (otcfm for all three)"}
        parts += [f"**Search on the tuning half** ({tune_['steps']} steps x {tune_['batch']}, "
                  "validation splits; cut from 3000 steps and from the whole half to what two "
                  "shared cores run in minutes: " + ", ".join(
                      f"{where[g]} on {', '.join(sets)}" for g, sets in tune_["sets"].items())
                  + "):", ""]
        parts += [t + "\n" for t in _tune_tables(tune_)]
    if confirm:
        res = confirm["results"]
        rows, ratios, met = _flow_rows(res)
        n_flow = len(rows)
        parts += [f"**Confirmation half, once**, {confirm['steps']} steps x {confirm['batch']}"
                  ", defaults of `training/config.py`. Density: gap = true − model test "
                  "log-likelihood (nats/row, ± paired s.e. over test rows; the table "
                  "breast_cancer has no true density: its 'gap' is zuko NSF's log-likelihood "
                  "minus the model's). 'best − peer' = our best default's gap minus the best "
                  "zuko flow's (< 0: ours closer).", ""]
        parts.append(markdown_table(
            ["set", "D", *FLOWS, "best of 3 by val", "it chose", "zuko NSF", "zuko MAF",
             "best − peer", "target", "it − best of 3"], rows))
        mean_ratio = float(np.mean(ratios)) if ratios else math.nan
        parts += ["", f"Density target (every set at least as close as the peer's best): "
                  f"**{'met' if met == n_flow else 'missed'}**: met on {met} of {n_flow} sets; "
                  "mean gap ratio ours/peer over the sets with a true density: "
                  f"**{mean_ratio:.2f}** (target ≤ 0.8: "
                  f"**{'met' if mean_ratio <= 0.8 else 'missed'}**).", ""]
        frows, fratios, fmet = _field_rows(res)
        n_field = sum(1 for r in res if r.get("field"))
        if frows:
            parts += [f"Samples: W2 excess over the finite-sample floor ({W2_ROWS} generated "
                      f"vs {W2_ROWS} test rows; 16 NFE: mean of {W2_SEEDS} noise seeds, the "
                      "paired s.e. over them), each family's default solver; torchcfm with "
                      "Euler.", ""]
            parts.append(markdown_table(["set", "NFE", *FIELDS, "torchcfm OT-CFM",
                                         "torchcfm CFM"], frows))
            fr = float(np.mean(fratios)) if fratios else math.nan
            parts += ["", f"Sample target at 16 NFE: **{'met' if fmet == n_field else 'missed'}"
                      f"**: met on {fmet} of {n_field} sets; mean ratio ours/peer **{fr:.2f}** "
                      f"(≤ 0.8: **{'met' if fr <= 0.8 else 'missed'}**; excesses near or below "
                      "the finite-sample floor make this ratio noisy).", ""]
        rrows = _resflow_rows(res)
        if rrows:
            parts += ["The residual flow's default (chosen on the tuning half after the run "
                      "above; this is its one look at the confirmation half; sets with a "
                      "true density): its gap next to our best of nsf / nsf_ar / maf and "
                      "the best zuko flow from the table above ('resflow − peer' < 0: "
                      "closer; s.e. of a difference of two runs' means, not paired).", ""]
            parts.append(markdown_table(["set", "D", "resflow", "best of ours above",
                                         "best peer", "resflow − peer", ""], rrows))
            parts.append("")
        arows, amet = _auto_rows(res)
        if arows:
            parts += ["`--model auto` with the residual flow among its candidates (nsf, "
                      "nsf_ar, maf, resflow; the flows' run and the residual flow's run of each "
                      "set): its choice by validation log-likelihood, and its test "
                      "log-likelihood (nats/row) against the best candidate's.", ""]
            parts.append(markdown_table(["set", "D", "auto chose", "its test log-lik",
                                         "best candidate", "its test log-lik",
                                         "best − auto", "within 1 s.e."], arows))
            parts += ["", f"`--model auto` within one standard error of the best default: "
                      f"**{'met' if amet == len(arows) else 'missed'}** on {amet} of "
                      f"{len(arows)} sets.", ""]
        secs: dict[str, list[float]] = {}
        for r in res:
            for g in ("flow", "resflow", "field"):
                for k, v in r.get(g, {}).get("seconds_per_1000", {}).items():
                    secs.setdefault(k, []).append(v)
        parts.append(markdown_table(["model", "s per 1000 steps (median over sets)"],
                                    [[k, float(np.median(v))] for k, v in secs.items()]))
    if notes:
        parts += ["", notes]
    return "\n".join(parts)


def _merged(paths: list[Path]) -> dict[str, Any] | None:
    """The confirmation JSONs of separate runs (flows, fields) merged set by set."""
    if not paths:
        return None
    merged: dict[str, dict[str, Any]] = {}
    payload: dict[str, Any] = {}
    for path in paths:
        payload = json.loads(path.read_text())
        for r in payload["results"]:
            merged.setdefault(r["set"], {}).update(r)
    order = [k for k in SUITE if k in merged]
    return {"steps": payload["steps"], "batch": payload["batch"],
            "results": [merged[k] for k in order]}


def _merged_tune(paths: list[Path]) -> dict[str, Any] | None:
    """The tuning JSONs of separate runs (``tune --groups ... --out ...``) merged group by
    group, in ``TUNE_SETS``' order."""
    if not paths:
        return None
    merged: dict[str, Any] = {}
    sets: dict[str, Any] = {}
    for path in paths:
        payload = json.loads(path.read_text())
        sets |= {g: v for g, v in payload["sets"].items() if payload.get(g)}
        for k, v in payload.items():
            if k in TUNE_SETS:  # a group: its candidates, from every run that tried some
                merged[k] = merged.get(k, {}) | v
            elif k != "sets":
                merged[k] = v
    merged["sets"] = {g: sets[g] for g in TUNE_SETS if g in sets}
    return merged


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=["tune", "confirm", "render"])
    p.add_argument("--sets", nargs="+", help="confirm: these confirmation sets only")
    p.add_argument("--groups", nargs="+", default=["flow", "field"])
    p.add_argument("--out", type=Path, help="JSON to write (default under docs/bench/)")
    p.add_argument("--candidates", nargs="+", help="tune: these candidates only (labels)")
    p.add_argument("--notes", type=Path, help="render: a Markdown file of findings to append")
    p.add_argument("--command", help="render: the commands that produced the JSONs")
    ns = p.parse_args(argv)
    torch.set_num_threads(1)
    if ns.phase == "tune":
        payload = tune(tuple(ns.groups), ns.candidates)
        path = ns.out or ROOT / "docs/bench/defaults_tune.json"
    elif ns.phase == "confirm":  # the JSON is rewritten after every set (a cut run keeps them)
        sets = ns.sets or [k for k, v in SUITE.items() if v.half == "confirmation"]
        path = ns.out or ROOT / f"docs/bench/defaults_confirm_{'_'.join(ns.groups)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"steps": STEPS, "batch": BATCH, "results": []}
        for name in sets:
            payload["results"].append(confirm_set(name, tuple(ns.groups)))
            path.write_text(json.dumps(payload, indent=1, default=float))
    else:
        from bench.report import write_section

        md = render(_merged_tune(sorted((ROOT / "docs/bench").glob("defaults_tune*.json"))),
                    _merged(sorted((ROOT / "docs/bench").glob("defaults_confirm_*.json"))),
                    ns.command or "python -m bench.defaults tune && python -m bench.defaults "
                    "confirm && python -m bench.defaults render",
                    ns.notes.read_text() if ns.notes else "")
        write_section("defaults", md)
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float))
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
