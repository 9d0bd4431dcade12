"""EDM next to DDPM (epsilon and v) and OT-CFM: W2 excess by NFE and PF-ODE log-likelihood.

    python -m bench.edm [--sets gmm2 8gaussians 3clusters] [--steps 800] [--rows 10000]

A bounded run of the issue's comparison (#25), sized for a shared 2-core machine: on each
set with an exact density (``gmm2`` and the 2-D toys ``8gaussians`` and ``3clusters``,
``training.data.gaussian_mixture``) it trains, with the same seed, data, network (``HIDDEN``)
and budget, ``edm`` (Karras et al. 2022 defaults), ``ddpm`` with epsilon and with v
prediction (cosine schedule) and ``otcfm``, all through the project's one training loop.

Sample quality: exact W2 (``training.metrics.wasserstein2``) between ``HELD_OUT`` samples and
as many held-out test rows, minus the floor (the mean W2 of ``bench.families.FLOOR_DRAWS``
fresh true draws to the same rows), at NFE 8, 16, 32 and 64: EDM's Heun sampler (2
evaluations per sigma step, so NFE/2 steps) and its stochastic sampler (``S_churn`` =
``CHURN``, likewise 2 per step), DPM-Solver++(2M) and DDIM on both DDPMs (1 per step), OT-CFM
with Euler and Heun. Every sampler starts from the same noise seed.

Density: PF-ODE test log-likelihood (dopri5, rtol = atol = 1e-5, exact divergence) on the
first ``LL_ROWS`` test rows, next to the true log-density. Writes the ``edm`` section of
``docs/BENCHMARKS.md`` and ``docs/bench/edm.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.families import ModelPlan, _loglik, _w2, floor_draws, load_splits, train_one
from bench.report import machine_line, markdown_table, rerender, write_results

SECTION = "edm"
SETS = ("gmm2", "8gaussians", "3clusters")
NFES = (8, 16, 32, 64)
HELD_OUT = 1000
LL_ROWS = 200
STEPS = 2000
ROWS = 10_000
CHURN = 10.0
STUCK = 0.95  # best validation loss of an EDM / DDPM-v training that learned nothing
HIDDEN = {"hidden_features": 128, "hidden_layers": 3}
_TRAIN = {"lr": 3e-3, "ema_decay": 0.995}
PLANS: dict[str, tuple[str, ModelPlan]] = {
    "edm": ("edm", ModelPlan(HIDDEN | {"s_churn": CHURN}, _TRAIN)),
    "ddpm-eps": ("ddpm", ModelPlan(HIDDEN | {"schedule": "cosine", "prediction": "epsilon"},
                                   _TRAIN)),
    "ddpm-v": ("ddpm", ModelPlan(HIDDEN | {"schedule": "cosine", "prediction": "v"}, _TRAIN)),
    "otcfm": ("otcfm", ModelPlan(HIDDEN, _TRAIN)),
}
# (label, model key, solver, network evaluations per step)
METHODS = (
    ("EDM Heun", "edm", "heun", 2),
    ("EDM stochastic (S_churn 10)", "edm", "edm_stochastic", 2),
    ("DDPM-ε DPM-Solver++(2M)", "ddpm-eps", "dpmpp2m", 1),
    ("DDPM-v DPM-Solver++(2M)", "ddpm-v", "dpmpp2m", 1),
    ("DDPM-v DDIM", "ddpm-v", "ddim", 1),
    ("OT-CFM Euler", "otcfm", "euler", 1),
    ("OT-CFM Heun", "otcfm", "heun", 2),
)


def run_set(name: str, steps: int, rows: int, log: Any = print) -> dict[str, Any]:
    from training.data import gaussian_mixture

    _, splits = load_splits(name, rows=rows)
    ref = splits.test[:HELD_OUT]
    floors = floor_draws(name, ref)
    out: dict[str, Any] = {"set": name, "floor": float(np.mean(floors)),
                           "floor_sd": float(np.std(floors, ddof=1)), "train": {}, "w2": {}}
    ckpts = {}
    for key, (kind, plan) in PLANS.items():
        start = time.perf_counter()
        ckpts[key] = train_one(kind, name, plan, steps)
        out["train"][key] = {"seconds": time.perf_counter() - start,
                             "best_val_loss": ckpts[key].config.summary["best_val_loss"]}
        log(f"{name}: trained {key} in {out['train'][key]['seconds']:.0f} s")
    for label, key, solver, cost in METHODS:
        out["w2"][label] = {str(nfe): _w2(ckpts[key], ref, solver, nfe // cost)["w2"]
                            - out["floor"] for nfe in NFES}
        log(f"{name}: {label}: " + ", ".join(f"{v:.3f}" for v in out["w2"][label].values()))
    x = splits.test[:LL_ROWS]
    out["loglik"] = _loglik(ckpts, x, gaussian_mixture(name).log_density)
    return out


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """EDM Heun at <= 16 NFE beats DDPM + DPM-Solver++ (epsilon and v) at the same NFE."""
    rows = []
    for res in results:
        for nfe in ("8", "16"):
            edm = res["w2"]["EDM Heun"][nfe]
            best_dpm = min(res["w2"]["DDPM-ε DPM-Solver++(2M)"][nfe],
                           res["w2"]["DDPM-v DPM-Solver++(2M)"][nfe])
            rows.append({"set": res["set"], "nfe": int(nfe), "edm": edm, "dpm": best_dpm,
                         "met": edm < best_dpm})
    return rows


def render(payload: dict[str, Any]) -> str:
    lines = ["## EDM next to DDPM and OT-CFM (issue #25)", "",
             f"Command: `{payload['command']}` ({payload['machine']}; "
             f"{payload['seconds'] / 60:.1f} min).", "",
             f"What ran: sets {', '.join(payload['sets'])}; {payload['rows']} rows each (split "
             f"80/10/10); each model {payload['steps']} training steps of batch 256, lr 3e-3, "
             f"EMA 0.995, MLP {HIDDEN['hidden_layers']} x {HIDDEN['hidden_features']}; W2 on "
             f"{HELD_OUT} samples vs {HELD_OUT} test rows, one noise seed; log-likelihood on "
             f"{LL_ROWS} test rows. What was cut from the issue's table, to fit about 10 "
             "minutes of a shared 2-core machine: gmm6 and gmm16, the 3000-step budget and "
             "wider networks of `bench.families`, 2000-point W2, several noise seeds. The "
             "figures rank the samplers at this budget; they are not converged models.", ""]
    for res in payload["results"]:
        header = ["sampler"] + [f"NFE {n}" for n in NFES]
        rows = [[label] + [f"{v:+.3f}" for v in res["w2"][label].values()]
                for label, *_ in METHODS]
        lines += [f"**{res['set']}**: W2 excess over the floor {res['floor']:.3f} "
                  f"(sd {res['floor_sd']:.3f} over fresh draws); lower is better.", "",
                  markdown_table(header, rows), ""]
        ll = res["loglik"]
        rows = [[key, f"{ll[key]['log_likelihood']:.3f} ± {ll[key]['log_likelihood_se']:.3f}",
                 f"{ll[key]['gap']:.3f}", ll[key]["nfe"]] for key in PLANS]
        lines += [f"PF-ODE test log-likelihood on {res['set']} (nats; the true density gives "
                  f"{ll['true']['log_likelihood']:.3f}):", "",
                  markdown_table(["model", "mean ± s.e.", "gap to the truth", "NFE"], rows), ""]
    rows = [[res["set"]] + [f"{res['train'][k]['best_val_loss']:.3f}" for k in PLANS]
            for res in payload["results"]]
    stuck = [f"{k} on {res['set']}" for res in payload["results"] for k in PLANS
             if k != "otcfm" and res["train"][k]["best_val_loss"] > STUCK]
    lines += ["Best validation loss of each training (EDM's and DDPM-v's targets have unit "
              "variance: a network that outputs 0 scores about 1):", "",
              markdown_table(["set", *PLANS], rows), ""]
    if stuck:
        lines += [f"Did not train (validation loss above {STUCK}, the network stayed near 0): "
                  f"{', '.join(stuck)}. Their samplers and likelihoods on that set are those of "
                  "an untrained denoiser and say nothing about the sampler.", ""]
    met = payload["targets"]
    rows = [[t["set"], t["nfe"], f"{t['edm']:+.3f}", f"{t['dpm']:+.3f}",
             "met" if t["met"] else "not met"] for t in met]
    lines += ["Target: EDM with Heun at ≤ 16 NFE beats DDPM + DPM-Solver++ (the better of ε "
              "and v) at the same NFE on every set. Measured on the sets above only (gmm6, "
              "gmm16: not measured):", "",
              markdown_table(["set", "NFE", "EDM Heun excess", "DPM-Solver++ excess", "target"],
                             rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.edm", description=__doc__.split("\n")[0])
    p.add_argument("--sets", nargs="+", default=list(SETS))
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--rows", type=int, default=ROWS)
    p.add_argument("--no-write", action="store_true", help="print, write nothing")
    p.add_argument("--render", action="store_true",
                   help="rewrite the section from docs/bench/edm.json without running")
    ns = p.parse_args(argv)
    json_path = Path(__file__).resolve().parents[1] / "docs" / "bench" / "edm.json"
    if ns.render:
        rerender(SECTION, render, json_path)
        return 0
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    results = [run_set(name, ns.steps, ns.rows, log=lambda m: print(m, file=sys.stderr))
               for name in ns.sets]
    payload = {"command": "python -m bench.edm " + shlex.join(argv or sys.argv[1:]),
               "machine": machine_line(), "sets": ns.sets, "steps": ns.steps, "rows": ns.rows,
               "seconds": time.perf_counter() - start, "results": results}
    payload["targets"] = targets(results)
    text = render(payload)
    if ns.no_write:
        print(text)
        print(json.dumps(payload["targets"], indent=1))
    else:
        write_results(SECTION, text, json_path, payload)
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
