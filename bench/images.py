"""Image benchmark: bits/dim on scikit-learn digits (1x8x8, 17 levels), test split.

    python -m bench.images [--quick] [--models glow_image realnvp_image ddpm_image cfm_image
                                              tarflow_image] [--merge]

Each model trains through the project's one loop on ``digits_image`` (1797 images, split
80/10/10 with seed 0; uniform dequantization then ``logit(0.05 + 0.9 u)``, both log-dets
counted) and is scored on the test split in bits per dimension of the 17-level data:
``-log p(x) / (64 ln 2)`` with ``x`` dequantized by seeded uniform noise, i.e. the usual
variational bound on the discrete log-mass (uniform noise over 17 levels scores log2 17 =
4.09). Flows are exact; diffusion and flow matching integrate the probability-flow ODE
(dopri5, rtol = atol = 1e-5) with the Hutchinson trace estimator (8 Rademacher probes per
row), the default for image models; the standard error over rows is reported.

Sanity floor, on the same dequantized and logit-transformed training data and the same test
rows (log-dets counted): an independent Gaussian per pixel and a full-covariance Gaussian.
Every model must beat the full Gaussian.

Writes the ``images`` section of ``docs/BENCHMARKS.md``, ``docs/bench/images.json`` and one
sample grid per model, ``docs/img/digits-<model>.png`` (64 samples, 8x8, rounded to levels).
``--merge`` keeps the rows of models not run from the JSON, each with the command and date
that measured it (the quality figures do not depend on load; the training seconds do).

TarFlow (issue #24) runs at glow_image's parameter count (125 312 against 127 344): 4 blocks
of one causal transformer layer, width 60, 4 heads, 2x2 patches (16 tokens of 4 values),
glow_image's steps, batch and learning rate, no training noise (a likelihood model).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
JSON_PATH = ROOT / "docs" / "bench" / "images.json"
IMG_DIR = ROOT / "docs" / "img"
SECTION = "images"
DATA = "digits_image"
SEED = 0
LEVELS = 17
DIM = 64
MODELS = ("glow_image", "realnvp_image", "ddpm_image", "cfm_image", "tarflow_image")
TARFLOW_GAP = 0.1  # issue #24: tarflow_image within this many bits/dim of glow_image

# Architecture and budget per model type (chosen on the validation split).
CONFIGS: dict[str, dict[str, Any]] = {
    "glow_image": {"model": {"hidden_features": 32, "hidden_layers": 1, "transforms": 3,
                             "scales": 2},
                   "train": {"steps": 2000, "batch_size": 64, "lr": 1e-3}},
    "realnvp_image": {"model": {"hidden_features": 32, "hidden_layers": 1, "transforms": 2,
                                "scales": 2},
                      "train": {"steps": 2000, "batch_size": 64, "lr": 1e-3}},
    "ddpm_image": {"model": {"hidden_features": 16, "scales": 1, "time_embedding": 16,
                             "schedule": "cosine", "prediction": "v"},
                   "train": {"steps": 3000, "batch_size": 64, "lr": 2e-3, "ema_decay": 0.999}},
    "cfm_image": {"model": {"hidden_features": 16, "scales": 1, "time_embedding": 16},
                  "train": {"steps": 3000, "batch_size": 64, "lr": 2e-3, "ema_decay": 0.999}},
    # glow_image's parameter count, steps, batch and learning rate (not tuned)
    "tarflow_image": {"model": {"hidden_features": 60, "transforms": 4, "hidden_layers": 1,
                                "heads": 4, "patch_size": 2},
                      "train": {"steps": 2000, "batch_size": 64, "lr": 1e-3}},
}
QUICK_STEPS = 150


def _train(kind: str, quick: bool) -> Any:
    from training.config import ModelConfig, TrainConfig
    from training.fit import fit

    spec = CONFIGS[kind]
    train = dict(spec["train"])
    if quick:
        train["steps"] = QUICK_STEPS
    train_cfg = TrainConfig(**train, eval_every=max(train["steps"] // 10, 1), warmup_steps=100,
                            progress=False, seed=SEED)
    return fit(kind, DATA, data_seed=SEED, split_seed=SEED, model_cfg=ModelConfig(**spec["model"]),
               train_cfg=train_cfg)


def _score(ckpt: Any, x_test: np.ndarray) -> dict[str, Any]:
    from training.evaluate import data_log_prob
    from training.metrics import likelihood_summary

    options = {} if ckpt.config.family == "flow" else {"method": "hutchinson", "solver": "dopri5"}
    start = time.perf_counter()
    lp = data_log_prob(ckpt, x_test, seed=SEED, **options)
    out = likelihood_summary(lp["log_prob"], DIM)
    out |= {"method": lp["method"], "nfe": lp["nfe"],
            "eval_seconds": round(time.perf_counter() - start, 1)}
    if lp["std_error"] is not None:
        out["hutchinson_se_bits"] = float(np.mean(lp["std_error"])) / (DIM * math.log(2))
    return out


def _sample_grid(ckpt: Any, kind: str) -> str:
    from PIL import Image

    from training.evaluate import sample_data

    x = sample_data(ckpt, 64, seed=SEED)
    pixels = np.clip(np.round(x), 0, LEVELS - 1) * (255 / (LEVELS - 1))
    tiles = pixels.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, 64)
    path = IMG_DIR / f"digits-{kind.removesuffix('_image')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    big = Image.fromarray(tiles.astype(np.uint8), mode="L").resize((256, 256), Image.NEAREST)
    big.save(path)
    return str(path.relative_to(ROOT / "docs"))


def gaussian_baselines(seed: int = SEED) -> dict[str, float]:
    """Independent-pixel and full-covariance Gaussians fitted on the dequantized, logit-
    transformed training images (4 noise draws per image), scored on the test split with the
    preprocessing log-det: bits/dim of the 17-level data."""
    import torch

    from training.data import load_data, split
    from training.fit import default_preprocess
    from training.preprocess import Preprocessor

    splits = split(load_data(DATA).x, seed=SEED)
    pre = Preprocessor.fit(default_preprocess(LEVELS), splits.train, LEVELS)
    pre = pre.double().eval()
    generator = torch.Generator().manual_seed(seed)

    def model_space(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u, ladj = pre(torch.as_tensor(x), generator=generator)
        return u.numpy(), ladj.numpy()

    u_train, _ = model_space(np.repeat(splits.train, 4, axis=0))
    u_test, ladj = model_space(splits.test)
    mean, std = u_train.mean(0), u_train.std(0)
    cov = np.cov(u_train.T, bias=True)
    chol = np.linalg.cholesky(cov + 1e-9 * np.eye(DIM))
    z = np.linalg.solve(chol, (u_test - mean).T).T
    const = 0.5 * DIM * math.log(2 * math.pi)
    full = -0.5 * (z**2).sum(1) - np.log(np.diag(chol)).sum() - const + ladj
    indep = (-0.5 * ((u_test - mean) / std) ** 2 - np.log(std)).sum(1) - const + ladj
    bits = lambda lp: float(-lp.mean() / (DIM * math.log(2)))  # noqa: E731
    return {"independent_gaussian": bits(indep), "full_gaussian": bits(full)}


def run_one(kind: str, quick: bool) -> dict[str, Any]:
    """Train, score and draw one model (its own process when ``--jobs`` > 1)."""
    import torch

    from training.evaluate import checkpoint_splits

    torch.set_num_threads(1)
    print(f"[images] training {kind}", file=sys.stderr, flush=True)
    ckpt = _train(kind, quick)
    row = _score(ckpt, checkpoint_splits(ckpt).test)
    row |= {"train_seconds": ckpt.config.summary["train_seconds"],
            "steps": ckpt.config.summary["steps"],
            "best_step": ckpt.config.summary["best_step"],
            "params": sum(p.numel() for p in ckpt.model.parameters()),
            "grid": _sample_grid(ckpt, kind), "config": CONFIGS[kind]}
    print(f"[images] {kind}: {row['bits_per_dim']:.3f} bits/dim", file=sys.stderr, flush=True)
    return row


def run(models: list[str], quick: bool, jobs: int = 1) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor

    load_before = os.getloadavg()
    results: dict[str, Any] = {"baselines": gaussian_baselines(), "models": {}}
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {kind: pool.submit(run_one, kind, quick) for kind in models}
        results["models"] = {kind: f.result() for kind, f in futures.items()}
    results["load"] = {"before": load_before, "after": os.getloadavg(), "jobs": jobs}
    return results


def markdown(results: dict[str, Any], command: str) -> str:
    from bench.report import machine_line, markdown_table

    base = results["baselines"]
    runs = list(dict.fromkeys(r.get("run", command) for r in results["models"].values()))
    rows = []
    for kind, r in results["models"].items():
        se = r["bits_per_dim_se"]
        beats = "yes" if r["bits_per_dim"] < base["full_gaussian"] else "**no**"
        rows.append([kind, f"{r['bits_per_dim']:.3f} ± {se:.3f}", r["method"], r["nfe"],
                     r["params"], r["steps"], f"{r['train_seconds']:.0f}", beats,
                     runs.index(r.get("run", command)) + 1])
    rows.append(["independent Gaussian per pixel", f"{base['independent_gaussian']:.3f}",
                 "exact", "-", 128, "-", "-", "-", "-"])
    rows.append(["full-covariance Gaussian", f"{base['full_gaussian']:.3f}", "exact", "-",
                 64 + 64 * 65 // 2, "-", "-", "-", "-"])
    table = markdown_table(["model", "test bits/dim (± s.e.)", "likelihood", "NFE", "params",
                            "steps", "train s", "beats full Gaussian", "run"], rows)
    table += "\n\n" + "\n".join(f"Run {i + 1}: {run}." for i, run in enumerate(runs))
    models = results["models"]
    if "tarflow_image" in models and "glow_image" in models:
        t, g = models["tarflow_image"], models["glow_image"]
        gap = t["bits_per_dim"] - g["bits_per_dim"]
        table += (f"\n\ntarflow_image minus glow_image: {gap:+.3f} bits/dim (s.e. "
                  f"{math.hypot(t['bits_per_dim_se'], g['bits_per_dim_se']):.3f}, unpaired) at "
                  f"{t['params']} against {g['params']} parameters; target within "
                  f"{TARFLOW_GAP} bits/dim: **{'met' if gap <= TARFLOW_GAP else 'not met'}**.")
    grids = " ".join(f"![{k}]({r['grid']})" for k, r in results["models"].items())
    names = " · ".join(results["models"])
    load = results["load"]
    return f"""## Images: bits/dim on digits (1x8x8, 17 levels)

Reproduce: the runs below the table (the last: {machine_line()}; {load['jobs']} models trained
side by side, one thread each; load average {load['before'][0]:.1f} before,
{load['after'][0]:.1f} after: the machine is shared, so training seconds are indicative).

Test split of `digits_image` (180 images), bits per dimension of the 17-level data: uniform
dequantization and the logit transform are part of the model and their log-dets are counted
(uniform noise scores log2 17 = 4.09). Flows are exact; diffusion and flow matching integrate
the probability-flow ODE with dopri5 and Hutchinson's trace estimator (8 probes per row),
"NFE" counting graph evaluations of the whole batch. The Gaussians are fitted on the same
dequantized, logit-transformed training images.

{table}

Samples (64 per model, rounded to the 17 levels; {names}):

{grids}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.images", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} steps per model")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--jobs", type=int, default=1, help="models trained side by side")
    parser.add_argument("--no-write", action="store_true", help="print only; write nothing")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models' rows from docs/bench/images.json")
    args = parser.parse_args(argv)
    from bench.report import command_line, machine_line

    command = command_line("bench.images", argv)
    run_line = f"`{command}` ({machine_line()})"
    results = run(args.models, args.quick, args.jobs)
    for row in results["models"].values():
        row["run"] = run_line
    if args.merge and JSON_PATH.exists():
        old = json.loads(JSON_PATH.read_text())
        results["models"] = {kind: results["models"].get(kind) or
                             old["models"][kind] | {"run": old["models"][kind].get(
                                 "run", f"`{old.get('command', 'python -m bench.images')}`")}
                             for kind in MODELS
                             if kind in results["models"] or kind in old["models"]}
    results["command"] = command
    text = markdown(results, command)
    print(text)
    if not args.no_write:
        from bench.report import write_section

        JSON_PATH.parent.mkdir(parents=True, exist_ok=True)
        JSON_PATH.write_text(json.dumps(results, indent=2) + "\n")
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
