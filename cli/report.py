"""``genserve report``: flow vs diffusion vs flow matching on one 2-D set, or an anomaly
model's score report."""

from __future__ import annotations

import argparse
import sys

from cli.options import add_model_args, add_progress_arg, add_train_args, pick
from report.anomaly import anomaly_report
from report.compare import DEFAULT_MODELS, ReportConfig, parse_models, report
from report.manifolds import manifold_report
from training.config import ModelConfig, TrainConfig

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="flow vs diffusion vs flow matching on one 2-D set: "
                       "figures, GIFs and a metrics table (or an anomaly model's report)")
    p.add_argument("--out", required=True, help="folder to write the report into")
    p.add_argument("--data", default="3clusters", help="named 2-D set or a 2-column "
                   ".npy/.npz/.csv file (3clusters)")
    p.add_argument("--models", help="model types to train, e.g. flow=nsf,diffusion=ddpm,"
                   "flow_matching=otcfm (the default)")
    p.add_argument("--checkpoints", nargs="+", metavar="DIR", help="load these checkpoints "
                   "instead of training (their own data set is used)")
    p.add_argument("--reflow", action="store_true", help="add a reflowed copy of the "
                   "flow-matching model (straighter paths)")
    p.add_argument("--reflow-pairs", type=int, default=4000, help="pairs for --reflow (4000)")
    p.add_argument("--rows", type=int, help="rows generated for named sets (their default)")
    p.add_argument("--frames", type=int, default=24, help="frames per GIF (24)")
    p.add_argument("--points", type=int, default=1000, help="points per model in figures (1000)")
    p.add_argument("--samples", type=int, default=2000, help="samples for W2 and speed, as "
                   "`genserve evaluate --samples` (2000)")
    p.add_argument("--solver", default="rk4", help="ODE solver for trajectories and GIFs (rk4)")
    p.add_argument("--ode-steps", type=int, default=32, help="ODE steps noise -> data (32)")
    p.add_argument("--grid", type=int, default=80, help="density grid points per axis (80)")
    add_progress_arg(p)
    p.add_argument("--manifold-model", metavar="DIR", help="an rfm checkpoint on S^2 or T^2: "
                   "its samples drawn on the manifold instead of the comparison")
    g = p.add_argument_group("anomaly sub-mode (instead of the comparison)")
    g.add_argument("--anomaly-model", metavar="DIR", help="artifact from fit-anomaly/export")
    g.add_argument("--normal", metavar="FILE", help="rows known to be normal")
    g.add_argument("--anomalous", metavar="FILE", help="rows known to be anomalous")
    add_model_args(p)
    add_train_args(p)
    p.set_defaults(run=run)


def run(ns: argparse.Namespace) -> int:
    if ns.anomaly_model or ns.normal or ns.anomalous:
        if not (ns.anomaly_model and ns.normal and ns.anomalous):
            raise ValueError("the anomaly report needs --anomaly-model, --normal and --anomalous")
        summary = anomaly_report(ns.anomaly_model, ns.normal, ns.anomalous, ns.out)
        print(f"wrote {ns.out}: AUROC {summary['auroc']:.3f}, flagged "
              f"{100 * summary['flagged_normal']:.1f} % of normal and "
              f"{100 * summary['flagged_anomalous']:.1f} % of anomalous rows", file=sys.stderr)
        return 0
    if ns.manifold_model:
        summary = manifold_report(ns.manifold_model, ns.out, points=ns.points,
                                  steps=ns.ode_steps, solver=ns.solver)
        print(f"wrote {ns.out}: rfm on {summary['data']} ({summary['manifold']}), test "
              f"log-likelihood {summary['log_likelihood']:.3f} nats", file=sys.stderr)
        return 0
    if ns.models and ns.checkpoints:
        raise ValueError("give --models (to train) or --checkpoints (to load), not both")
    cfg = ReportConfig(
        out=ns.out, data=ns.data, models=parse_models(ns.models) if ns.models else DEFAULT_MODELS,
        checkpoints=tuple(ns.checkpoints or ()), reflow=ns.reflow, reflow_pairs=ns.reflow_pairs,
        rows=ns.rows, seed=ns.seed or 0, frames=ns.frames, points=ns.points, samples=ns.samples,
        solver=ns.solver, ode_steps=ns.ode_steps, grid=ns.grid, progress=not ns.no_progress,
        model=ModelConfig(**pick(ns, ModelConfig.model_fields)),
        train=TrainConfig(**pick(ns, TrainConfig.model_fields), progress=not ns.no_progress),
    )
    summary = report(cfg)
    print(f"wrote {ns.out}: {', '.join(summary['models'])} on {summary['data']['name']} "
          f"(see metrics.md)", file=sys.stderr)
    return 0
