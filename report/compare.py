"""``genserve report``: a flow, a diffusion model and a flow-matching model side by side.

``report(cfg)`` trains (or loads) one model per family on the same 2-D data set and writes,
into ``cfg.out``:

* ``samples.png`` -- real test rows next to each model's samples (its default sampler);
* ``trajectories.png`` -- paths of individual points from noise to data, with their
  straightness (mean path length / chord length; 1 is a straight line);
* ``snapshots.png`` -- the distribution at several times of the generation process;
* ``vector_fields.png`` -- the learned generation velocity ``-dx/dt`` at several times
  (diffusion: the probability-flow ODE; flow matching: the learned field);
* ``density.png`` -- each flow's log p(x) over a grid, next to the true log-density when the
  data set has one;
* ``generation_<name>.gif`` per model and ``generation_all.gif`` with every model;
* ``metrics.json`` and ``metrics.md`` -- for each model, exactly what ``genserve evaluate
  CKPT --samples S --seed SEED`` prints (test log-likelihood, W2 to held-out rows, NFE,
  speed), plus the sampler behind ``samples.png`` and the straightness of the paths.

Trained checkpoints are saved under ``cfg.out/checkpoints/<name>``, so every number can be
re-derived with ``genserve evaluate``. The sub-mode for anomaly models
(score histograms with the threshold, ROC curve) lives in ``report.anomaly``; plotting in
``report.plots``.

Example:
    >>> summary = report(ReportConfig(out="report", steps=500))  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from artifact.families import FAMILIES, family
from numerics.solvers import SOLVERS
from report import plots
from report.plots import Generation
from service.progress import progress_bar
from training.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from training.config import ModelConfig, TrainConfig
from training.data import DataError, load_data
from training.evaluate import (
    THREADS,
    checkpoint_splits,
    data_log_prob,
    evaluate,
    sample_data,
)
from training.fit import fit
from training.flow_matching import FlowMatchingModel
from training.reflow import reflow_checkpoint
from training.registry import MODEL_TYPES
from training.train import intra_op_threads

__all__ = [
    "DEFAULT_MODELS",
    "FIELD_TIMES",
    "ReportConfig",
    "generation",
    "parse_models",
    "report",
]

DEFAULT_MODELS = ("nsf", "ddpm", "otcfm")
FIELD_TIMES = (0.9, 0.5, 0.2, 0.05)
"""Times at which ``vector_fields.png`` shows each field (t = 1 noise, t = 0 data)."""
SNAPSHOTS = 5
REFLOW_PAIR_STEPS = 32  # RK4 steps per reflow pair, as `genserve reflow` defaults


class ReportConfig(BaseModel):
    """What ``genserve report`` does; every field has a CLI option of the same name."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    out: Path
    data: str = Field("3clusters", description="named 2-D set or .npy/.npz/.csv file")
    models: tuple[str, ...] = Field(DEFAULT_MODELS, description="model types to train")
    checkpoints: tuple[Path, ...] = Field((), description="load these instead of training")
    reflow: bool = Field(False, description="add a reflowed copy of the flow-matching model")
    reflow_pairs: int = Field(4000, ge=10, description="noise/sample pairs for reflow")
    rows: int | None = Field(None, ge=10, description="rows generated for named sets")
    seed: int = Field(0, ge=0, description="data, split, training and sampling seed")
    frames: int = Field(24, ge=2, le=500, description="frames per GIF")
    points: int = Field(1000, ge=2, description="points drawn per model in the figures")
    samples: int = Field(2000, ge=0, description="samples for W2 and speed, as in evaluate")
    solver: str = Field("rk4", description="ODE solver for trajectories, snapshots and GIFs")
    ode_steps: int = Field(32, ge=1, description="ODE steps noise -> data for trajectories")
    grid: int = Field(80, ge=4, le=400, description="density grid points per axis")
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    progress: bool = True

    @field_validator("solver")
    @classmethod
    def _known_solver(cls, solver: str) -> str:

        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        return solver


# --------------------------------------------------------------------------- models


def parse_models(spec: str) -> tuple[str, ...]:
    """``"flow=nsf,diffusion=ddpm,flow_matching=otcfm"`` (or ``"nsf,ddpm,otcfm"``) -> types.

    The ``family=`` prefixes are optional and checked against the registry.
    """

    types: list[str] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        family, _, kind = item.rpartition("=")
        if kind not in MODEL_TYPES:
            raise ValueError(f"unknown model type {kind!r} in --models; choose from: "
                             f"{', '.join(MODEL_TYPES)}")
        if family and family not in FAMILIES:
            raise ValueError(f"unknown family {family!r} in --models; choose from: "
                             f"{', '.join(FAMILIES)}")
        if family and MODEL_TYPES[kind].family != family:
            raise ValueError(f"{kind!r} is a {MODEL_TYPES[kind].family} model, not {family}")
        if kind in types:
            raise ValueError(f"{kind!r} is listed twice in --models")
        types.append(kind)
    if not types:
        raise ValueError("--models names no model; e.g. flow=nsf,diffusion=ddpm,"
                         "flow_matching=otcfm")
    return tuple(types)


def _require_2d(dim: int, what: str) -> None:
    if dim != 2:
        raise DataError(f"the report draws 2-D figures but {what} has {dim} columns; use a "
                        "2-D set (3clusters, moons, 8gaussians, ...) or a 2-column file")


def _train_all(cfg: ReportConfig, folder: Path, bar: Any) -> dict[str, Path]:

    paths = {}
    for kind in cfg.models:
        bar.set_postfix_str(f"training {kind}")
        fit(kind, cfg.data, out=folder / kind, rows=cfg.rows, data_seed=cfg.seed,
            split_seed=cfg.seed, model_cfg=cfg.model, train_cfg=cfg.train)
        paths[kind] = folder / kind
        bar.update()
    return paths


def _checkpoint_name(ckpt: Checkpoint) -> str:
    reflowed = "reflow" in ckpt.config.summary
    return ckpt.config.model_type + ("-reflow" if reflowed else "")


def _load_all(paths: dict[str, Path] | tuple[Path, ...]) -> dict[str, tuple[Path, Checkpoint]]:

    loaded: dict[str, tuple[Path, Checkpoint]] = {}
    for path in paths.values() if isinstance(paths, dict) else paths:
        ckpt = load_checkpoint(path)
        name = _checkpoint_name(ckpt)
        if name in loaded:
            raise ValueError(f"two checkpoints are {name} models ({loaded[name][0]}, {path}); "
                             "give one of each")
        _require_2d(ckpt.config.dim, f"checkpoint {path}")
        loaded[name] = (Path(path), ckpt)
    datasets = {(c.config.data.name, c.config.data.rows, c.config.data.data_seed)
                for _, c in loaded.values()}
    if len(datasets) > 1:
        found = ", ".join(sorted(f"{n} ({r} rows, seed {s})" for n, r, s in datasets))
        raise ValueError(f"the checkpoints were trained on different data ({found}); a "
                         "side-by-side report needs one data set")
    return loaded


def _reflow(teacher: Checkpoint, cfg: ReportConfig, out: Path) -> Path:

    save_checkpoint(reflow_checkpoint(teacher, cfg.reflow_pairs, cfg.train,
                                      pair_steps=REFLOW_PAIR_STEPS), out)
    return out


# --------------------------------------------------------------------------- processes


def _to_data(ckpt: Checkpoint, states: torch.Tensor) -> np.ndarray:
    """``(T, n, dim)`` model-space states -> data units, as numpy float64."""
    with torch.no_grad():
        return np.stack([ckpt.preprocessor.inverse(s).double().numpy() for s in states])


def generation(
    ckpt: Checkpoint, name: str, n: int, *, frames: int, solver: str = "rk4",
    steps: int = 32, seed: int = 0, color: int = 0,
) -> Generation:
    """Follow ``n`` points from noise to data (seeded); ``frames`` states go to the GIFs.

    The model moves them its own way (``generation``: a flow layer by layer; an ODE model
    with ``solver`` on a grid of at least ``steps`` steps).
    """
    model = ckpt.model
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    z = torch.randn(n, model.dim, generator=generator, dtype=dtype)
    with torch.no_grad():
        path, labels, process = model.generation(z, frames=frames, solver=solver, steps=steps)
    index = np.round(np.linspace(0, len(path.times) - 1, frames)).astype(int)
    return Generation(name, ckpt.config.family, process, path.times, _to_data(ckpt, path.states),
                      labels, index, path.nfe, color)


class _CountCalls:
    """Counts forward calls of a network (a sampler's NFE), as a context manager."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net, self.calls = net, 0

    def __enter__(self) -> _CountCalls:
        self.handle = self.net.register_forward_hook(self._hook)
        return self

    def _hook(self, *_: object) -> None:
        self.calls += 1

    def __exit__(self, *_: object) -> None:
        self.handle.remove()


def _default_samples(ckpt: Checkpoint, n: int, seed: int) -> tuple[np.ndarray, str]:
    """Samples from the model's default sampler (as ``evaluate`` draws them) and its label."""

    model = ckpt.model
    net = getattr(model, "net", None)  # the network an ODE sampler calls step by step
    if net is None:
        return sample_data(ckpt, n, seed=seed), "inverse pass, NFE 1"
    with _CountCalls(net) as count:
        x = sample_data(ckpt, n, seed=seed)
    solver = inspect.signature(model.sample).parameters["solver"].default
    return x, f"{solver}, NFE {count.calls}"


def _velocity_field(
    ckpt: Checkpoint, points: np.ndarray, t: float, h: float = 1e-3
) -> np.ndarray:
    """Generation direction ``-dx/dt`` in data units at ``points: (m, 2)``: ``(m, 2)``.

    The field lives in model space; it is carried to data units by a finite difference of the
    preprocessing's inverse (exact for standardization, which is affine).
    """
    model, pre = ckpt.model, ckpt.preprocessor
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        u, _ = pre(torch.as_tensor(points, dtype=dtype))
        v = model.velocity(u, torch.full((len(u),), t, dtype=dtype))
        moved = pre.inverse(u - h * v) - pre.inverse(u)
    return moved.double().numpy() / h


def _limits(arrays: list[np.ndarray]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Axis limits covering 99% of every point set, padded by 10%."""
    pts = np.concatenate([a.reshape(-1, 2) for a in arrays])
    lo, hi = np.quantile(pts, 0.005, axis=0), np.quantile(pts, 0.995, axis=0)
    pad = 0.1 * (hi - lo)
    return (float(lo[0] - pad[0]), float(hi[0] + pad[0])), (
        float(lo[1] - pad[1]), float(hi[1] + pad[1]))


# --------------------------------------------------------------------------- report


def _models(cfg: ReportConfig, bar: Any) -> dict[str, tuple[Path, Checkpoint]]:
    folder = cfg.out / "checkpoints"
    loaded = _load_all(cfg.checkpoints or _train_all(cfg, folder, bar))
    if cfg.reflow:
        teachers = [c for n, (_, c) in loaded.items()
                    if isinstance(c.model, FlowMatchingModel) and not n.endswith("-reflow")]
        if not teachers:
            raise ValueError("--reflow needs a flow-matching model (cfm, otcfm or si)")
        bar.set_postfix_str("reflow")
        name = teachers[0].config.model_type + "-reflow"
        loaded |= _load_all((_reflow(teachers[0], cfg, folder / name),))
        bar.update()
    order = {kind: i for i, kind in enumerate(MODEL_TYPES)}  # the registry's order
    return dict(sorted(loaded.items(),
                       key=lambda kv: (order.get(kv[1][1].config.model_type, 0), kv[0])))


def _metrics_row(path: Path, ckpt: Checkpoint, cfg: ReportConfig, sampler: str,
                 gen: Generation) -> dict[str, Any]:
    with intra_op_threads(THREADS):  # as `genserve evaluate` runs, to the last digit
        result = evaluate(ckpt, samples=cfg.samples, seed=cfg.seed)
    return {
        "checkpoint": str(path),
        "evaluate": result,
        "evaluate_command": f"genserve evaluate {path} --samples {cfg.samples} "
                            f"--seed {cfg.seed}",
        "sampler": sampler,
        "sampling_seconds": (cfg.samples / result["samples_per_second"]
                             if cfg.samples else None),
        "trajectory": gen.process,
        "straightness": gen.straightness(),
    }


def _check_input(cfg: ReportConfig) -> None:
    """Bad input fails here, with one line, before any training."""

    if cfg.checkpoints:
        _load_all(cfg.checkpoints)
    else:
        _require_2d(load_data(cfg.data, n=cfg.rows, seed=cfg.seed).dim, cfg.data)


def report(cfg: ReportConfig) -> dict[str, Any]:
    """Train or load the models, write every figure, GIF and table; returns the metrics."""

    _check_input(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    total = (0 if cfg.checkpoints else len(cfg.models)) + int(cfg.reflow) + 3
    with progress_bar(total=total, desc="report", disable=not cfg.progress) as bar:
        models = _models(cfg, bar)
        bar.total = bar.n + 2 * len(models) + 3
        gens, samples, metrics = {}, {}, {}
        for color, (name, (path, ckpt)) in enumerate(models.items()):
            bar.set_postfix_str(f"sampling {name}")
            gens[name] = generation(ckpt, name, cfg.points, frames=cfg.frames, color=color,
                                    solver=cfg.solver, steps=cfg.ode_steps, seed=cfg.seed)
            samples[name] = _default_samples(ckpt, cfg.points, cfg.seed)
            bar.update()
            bar.set_postfix_str(f"evaluating {name}")
            metrics[name] = _metrics_row(path, ckpt, cfg, samples[name][1], gens[name])
            bar.update()
        _draw(cfg, models, gens, samples, metrics, bar)
        summary = _write_metrics(cfg, next(iter(models.values()))[1], metrics)
        bar.update()
    return summary


def _draw(cfg: ReportConfig, models: dict[str, tuple[Path, Checkpoint]],
          gens: dict[str, Generation], samples: dict[str, tuple[np.ndarray, str]],
          metrics: dict[str, dict[str, Any]], bar: Any) -> None:
    """Every figure and GIF, on shared axis limits."""

    real = checkpoint_splits(next(iter(models.values()))[1]).test
    limits = _limits([real, *(g.path[[0, -1]] for g in gens.values())])
    shown, out, every = real[: cfg.points], cfg.out, list(gens.values())
    bar.set_postfix_str("figures")
    w2 = {n: m["evaluate"].get("w2_to_test") for n, m in metrics.items()}
    plots.samples_figure(shown, [(gens[n], x, s, w2[n]) for n, (x, s) in samples.items()],
                         limits, out / "samples.png")
    plots.trajectories_figure(every, shown, limits, out / "trajectories.png")
    plots.snapshots_figure(every, limits, out / "snapshots.png", SNAPSHOTS)
    _field_figure(models, gens, shown, limits, cfg)
    _density_figure(models, limits, cfg)
    bar.update()
    bar.set_postfix_str("GIFs")
    for gen in every:
        plots.generation_gif([gen], shown, limits, out / f"generation_{gen.name}.gif")
    plots.generation_gif(every, shown, limits, out / "generation_all.gif")
    bar.update()


def _field_figure(models: dict[str, tuple[Path, Checkpoint]], gens: dict[str, Generation],
                  shown: np.ndarray, limits: Any, cfg: ReportConfig) -> None:

    side = 15
    xs, ys = np.linspace(*limits[0], side), np.linspace(*limits[1], side)
    points = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    fields = [(gens[name], [(t, _velocity_field(ckpt, points, t)) for t in FIELD_TIMES])
              for name, (_, ckpt) in models.items() if hasattr(ckpt.model, "velocity")]
    plots.vector_fields_figure(fields, points, shown, limits, cfg.out / "vector_fields.png")


def _density_figure(models: dict[str, tuple[Path, Checkpoint]], limits: Any,
                    cfg: ReportConfig) -> None:

    xs, ys = np.linspace(*limits[0], cfg.grid), np.linspace(*limits[1], cfg.grid)
    points = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    panels: list[tuple[str, np.ndarray]] = []
    data = next(iter(models.values()))[1].config.data
    truth = data.true_log_density()
    if truth is not None:
        panels.append((f"true log p(x): {data.name}", truth(points)))
    for name, (_, ckpt) in models.items():
        if family(ckpt.config.family).one_pass_likelihood:  # a grid of ODE solves is costly
            lp = data_log_prob(ckpt, points)["log_prob"]
            panels.append((f"{name} ({ckpt.config.family}): learned log p(x)", lp))
    shape = (cfg.grid, cfg.grid)
    plots.density_figure([(t, v.reshape(shape)) for t, v in panels], limits,
                         cfg.out / "density.png")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_metrics(cfg: ReportConfig, first: Checkpoint,
                   metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    data = first.config.data
    summary = {
        "data": {"name": data.name, "source": data.source, "rows": data.rows,
                 "data_seed": data.data_seed, "split_seed": data.split_seed},
        "seed": cfg.seed,
        "samples": cfg.samples,
        "models": _jsonable(metrics),
    }
    (cfg.out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (cfg.out / "metrics.md").write_text(_markdown(summary))
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# Report: {summary['data']['name']} ({summary['data']['rows']} rows, seed "
        f"{summary['seed']})",
        "",
        "Test log-likelihood in nats per row (± s.e.) on the held-out test split; W2 from "
        f"{summary['samples']} samples to the test rows; likelihood NFE as `genserve evaluate` "
        "reports it (adaptive dopri5 for ODE models); sampling NFE of the default sampler.",
        "",
        "| model | family | test log-lik (nats) | bits/dim | W2 to test | likelihood NFE "
        "| sampler | sampling time (s) | path straightness |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["models"].items():
        e = m["evaluate"]
        lines.append(
            f"| {name} | {e['family']} | {e['log_likelihood']:.3f} ± "
            f"{_fmt(e['log_likelihood_se'], '.3f')} | {e['bits_per_dim']:.3f} | "
            f"{_fmt(e.get('w2_to_test'), '.3f')} | {e['nfe']} | {m['sampler']} | "
            f"{_fmt(m['sampling_seconds'], '.3f')} | {m['straightness']:.3f} |")
    truth = [m["evaluate"].get("true_log_likelihood") for m in summary["models"].values()]
    if truth and truth[0] is not None:
        lines += ["", f"True log-likelihood of the test rows: {truth[0]:.3f} nats."]
    lines += ["", "Reproduce a row: " + "; ".join(
        f"`{m['evaluate_command']}`" for m in summary["models"].values()), ""]
    return "\n".join(lines)
