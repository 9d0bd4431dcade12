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
re-derived with ``genserve evaluate``. ``anomaly_report`` is the sub-mode for anomaly models
(score histograms with the threshold, ROC curve). Plotting lives in ``training.plots``.

Example:
    >>> summary = report(ReportConfig(out="report", steps=500))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from training.checkpoint import Checkpoint
from training.config import ModelConfig, TrainConfig
from training.data import DataError

__all__ = [
    "DEFAULT_MODELS",
    "FIELD_TIMES",
    "Generation",
    "ReportConfig",
    "anomaly_report",
    "generation",
    "parse_models",
    "report",
    "roc_curve",
]

DEFAULT_MODELS = ("nsf", "ddpm", "otcfm")
FIELD_TIMES = (0.9, 0.5, 0.2, 0.05)
"""Times at which ``vector_fields.png`` shows each field (t = 1 noise, t = 0 data)."""
SNAPSHOTS = 5
REFLOW_PAIR_STEPS = 32  # RK4 steps per reflow pair, as `genserve reflow` defaults
FAMILIES = ("flow", "diffusion", "flow_matching")


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
        from service.solvers import SOLVERS

        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        return solver


@dataclass(frozen=True)
class Generation:
    """One model's generation process, in data units.

    Attributes:
        name: file-safe model name (``nsf``, ``otcfm-reflow``).
        family: ``flow``, ``diffusion`` or ``flow_matching``.
        process: honest words for what was run (solver, steps, layers).
        path_times: ``(T,)`` position along the process, 1 = noise, 0 = data (flows: the
            share of layers still to invert).
        path: ``(T, n, 2)`` states along the process; ``path[0]`` noise, ``path[-1]`` samples.
        frames: ``(F,)`` indices into ``path`` shown in the GIFs.
        nfe: network evaluations over the whole process (flows: 1 inverse pass).
        color: the model's colour index, the same in every figure.
    """

    name: str
    family: str
    process: str
    path_times: np.ndarray
    path: np.ndarray
    frames: np.ndarray
    nfe: int
    color: int = 0

    @property
    def label(self) -> str:
        return f"{self.name} ({self.family.replace('_', ' ')})"

    def straightness(self) -> float:
        """Mean over points of path length / distance from start to end (1 = straight)."""
        length = np.linalg.norm(np.diff(self.path, axis=0), axis=-1).sum(0)
        chord = np.linalg.norm(self.path[-1] - self.path[0], axis=-1)
        return float(np.mean(length / np.maximum(chord, 1e-12)))

    def time_label(self, index: int) -> str:
        if self.family == "flow":
            layers = len(self.path_times) - 1
            return f"layer {index}/{layers} inverted"
        return f"t = {self.path_times[index]:.2f}"


# --------------------------------------------------------------------------- models


def parse_models(spec: str) -> tuple[str, ...]:
    """``"flow=nsf,diffusion=ddpm,flow_matching=otcfm"`` (or ``"nsf,ddpm,otcfm"``) -> types.

    The ``family=`` prefixes are optional and checked against the registry.
    """
    from training.registry import MODEL_TYPES

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
    from training.fit import fit

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
    from training.checkpoint import load_checkpoint

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
    from training.checkpoint import save_checkpoint
    from training.flow_matching import reflow_checkpoint

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

    Flows: the inverse pass layer by layer (a layer's output is held for the frames between
    layers). Diffusion and flow matching: the ODE ``dx/dt = velocity(x, t)`` from ``t = 1``
    to ``t_min`` (for diffusion, the probability-flow ODE) with ``solver`` on a uniform grid
    of at least ``steps`` steps, a multiple of ``frames - 1``.
    """
    from service.solvers import trajectory

    model = ckpt.model
    family = ckpt.config.family
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        if family == "flow":
            z = torch.randn(n, model.dim, generator=generator, dtype=dtype)
            states = [z]
            for transform in reversed(model.transforms):
                states.append(transform.inverse(states[-1]))
            layers = len(model.transforms)
            times = np.linspace(1.0, 0.0, layers + 1)
            index = np.round(np.linspace(0, layers, frames)).astype(int)
            process = f"inverse pass, {layers} layers, NFE 1"
            path, nfe = torch.stack(states), 1
        else:
            per_frame = math.ceil(steps / (frames - 1))
            times = np.linspace(1.0, model.t_min, (frames - 1) * per_frame + 1)
            sol = trajectory(model.velocity, model.noise(n, generator), times, method=solver)
            ode = "probability-flow ODE" if family == "diffusion" else "ODE"
            process = f"{ode}, {solver}, {len(times) - 1} steps, NFE {sol.nfe}"
            index = np.arange(frames) * per_frame
            path, nfe = sol.states, sol.nfe
    return Generation(name, family, process, times, _to_data(ckpt, path), index, nfe, color)


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
    import inspect

    from training.evaluate import sample_data

    model = ckpt.model
    if ckpt.config.family == "flow":
        return sample_data(ckpt, n, seed=seed), "inverse pass, NFE 1"
    with _CountCalls(model.net) as count:
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
                    if c.config.family == "flow_matching" and not n.endswith("-reflow")]
        if not teachers:
            raise ValueError("--reflow needs a flow-matching model (cfm, otcfm or si)")
        bar.set_postfix_str("reflow")
        name = teachers[0].config.model_type + "-reflow"
        loaded |= _load_all((_reflow(teachers[0], cfg, folder / name),))
        bar.update()
    order = {f: i for i, f in enumerate(FAMILIES)}
    return dict(sorted(loaded.items(), key=lambda kv: (order[kv[1][1].config.family], kv[0])))


def _metrics_row(path: Path, ckpt: Checkpoint, cfg: ReportConfig, sampler: str,
                 gen: Generation) -> dict[str, Any]:
    from training.evaluate import evaluate

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
    from training.data import load_data

    if cfg.checkpoints:
        _load_all(cfg.checkpoints)
    else:
        _require_2d(load_data(cfg.data, n=cfg.rows, seed=cfg.seed).dim, cfg.data)


def report(cfg: ReportConfig) -> dict[str, Any]:
    """Train or load the models, write every figure, GIF and table; returns the metrics."""
    from training.progress import progress_bar

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
    from training import plots
    from training.evaluate import checkpoint_splits

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
    from training import plots

    side = 15
    xs, ys = np.linspace(*limits[0], side), np.linspace(*limits[1], side)
    points = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    fields = [(gens[name], [(t, _velocity_field(ckpt, points, t)) for t in FIELD_TIMES])
              for name, (_, ckpt) in models.items() if ckpt.config.family != "flow"]
    plots.vector_fields_figure(fields, points, shown, limits, cfg.out / "vector_fields.png")


def _density_figure(models: dict[str, tuple[Path, Checkpoint]], limits: Any,
                    cfg: ReportConfig) -> None:
    from training import plots
    from training.evaluate import data_log_prob

    xs, ys = np.linspace(*limits[0], cfg.grid), np.linspace(*limits[1], cfg.grid)
    points = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    panels: list[tuple[str, np.ndarray]] = []
    data = next(iter(models.values()))[1].config.data
    truth = data.true_log_density()
    if truth is not None:
        panels.append((f"true log p(x): {data.name}", truth(points)))
    for name, (_, ckpt) in models.items():
        if ckpt.config.family == "flow":
            lp = data_log_prob(ckpt, points)["log_prob"]
            panels.append((f"{name} (flow): learned log p(x)", lp))
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


# --------------------------------------------------------------------------- anomaly


def roc_curve(normal: np.ndarray, anomalous: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """ROC of the rule ``score > threshold`` over every threshold; higher score = anomalous.

    Returns ``fpr: (k,)``, ``tpr: (k,)`` from (0, 0) to (1, 1), and the AUROC (the
    Mann-Whitney probability that an anomalous row outscores a normal one, ties half).
    """
    from scipy.stats import rankdata

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
    from service.runtime import ModelRuntime
    from training import plots
    from training.data import check_dim, load_data

    out = Path(out)
    runtime = ModelRuntime(model_dir)
    if runtime.manifest.calibration is None:
        raise DataError(f"model '{runtime.name}' has no anomaly calibration; make it with "
                        "`genserve fit-anomaly` or `genserve export`")
    results = {}
    for role, path in (("normal", normal), ("anomalous", anomalous)):
        x = load_data(path).x
        check_dim(x, runtime.dim, str(path), runtime.name)
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
