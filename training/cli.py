"""The ``genserve`` command line: one console script, one subcommand per user task."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str) -> Callable[[Callable[[argparse.Namespace], int]], Any]:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return register


def _model_types_help() -> str:
    from training.registry import ALL_MODEL_TYPES, IMAGE_MODEL_TYPES

    return "; ".join(f"{k} ({v.family}{', images' if k in IMAGE_MODEL_TYPES else ''})"
                     for k, v in ALL_MODEL_TYPES.items())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("architecture (fields of ModelConfig; unset = the default)")
    g.add_argument("--hidden", dest="hidden_features", type=int, help="hidden layer width")
    g.add_argument("--layers", dest="hidden_layers", type=int, help="hidden layers per network")
    g.add_argument("--transforms", type=int, help="flows: number of flow steps")
    g.add_argument("--bins", type=int, help="spline flows: bins")
    g.add_argument("--tail-bound", dest="tail_bound", type=float, help="spline interval [-B, B]")
    g.add_argument("--schedule", choices=["linear", "cosine"], help="diffusion noise schedule")
    g.add_argument("--prediction", choices=["epsilon", "v"], help="diffusion target")
    g.add_argument("--sigma-min", dest="sigma_min", type=float, help="flow matching sigma_min")
    g.add_argument("--gamma", type=float, help="stochastic interpolant noise level")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (fields of TrainConfig)")
    g.add_argument("--steps", type=int, help="optimizer steps (default 2000)")
    g.add_argument("--batch-size", dest="batch_size", type=int, help="minibatch rows (256)")
    g.add_argument("--lr", type=float, help="peak learning rate (1e-3)")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, help="AdamW decay (0)")
    g.add_argument("--warmup", dest="warmup_steps", type=int, help="warmup steps (100)")
    g.add_argument("--grad-clip", dest="grad_clip", type=float, help="max gradient norm (5)")
    g.add_argument("--ema", dest="ema_decay", type=float, help="EMA decay, e.g. 0.999 (off)")
    g.add_argument("--eval-every", dest="eval_every", type=int, help="steps between evals")
    g.add_argument("--patience", type=int, help="evals without improvement before stopping")
    g.add_argument("--seed", type=int, help="seed for initialisation and batches (0)")


def _pick(ns: argparse.Namespace, fields: Sequence[str]) -> dict[str, Any]:
    return {f: getattr(ns, f) for f in fields if getattr(ns, f, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genserve",
        description="Train, evaluate, export and serve likelihood-based generative models "
        "(normalizing flows, diffusion, flow matching).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fit a model to a named data set or a file")
    p.add_argument("--model", required=True, metavar="TYPE", help=_model_types_help())
    p.add_argument(
        "--family",
        choices=["flow", "diffusion", "flow_matching"],
        help="optional check that --model belongs to this family",
    )
    p.add_argument("--data", required=True, help="named set (see `genserve data --list`) "
                   "or a .npy/.npz/.csv file")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--rows", type=int, help="rows to generate for named toy sets")
    p.add_argument("--data-seed", type=int, default=0, help="seed of generated data sets")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (or set TQDM_DISABLE=1)")
    p.add_argument("--distributed", type=int, metavar="N", help="data-parallel training on N "
                   "local processes (torchrun; gloo on CPU, nccl on GPU); --batch-size is global")
    _add_model_args(p)
    _add_train_args(p)

    p = sub.add_parser("evaluate", help="print JSON: test log-likelihood, samples, speed")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--data", help=".npy/.npz/.csv to score instead of the test split")
    p.add_argument("--method", choices=["exact", "hutchinson"], help="divergence (ODE models)")
    p.add_argument("--solver", help="ODE/diffusion solver for likelihood and samples")
    p.add_argument("--steps", type=int, help="solver steps (adaptive dopri5 when unset)")
    p.add_argument("--samples", type=int, default=2000, help="samples for W2 and speed (2000)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("reflow", help="rectified-flow reflow of a flow-matching checkpoint "
                       "(straighter paths: good samples in 1-2 steps)")
    p.add_argument("checkpoint", help="trained cfm/otcfm/si checkpoint")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--pairs", type=int, default=20000, help="noise/sample pairs (20000)")
    p.add_argument("--pair-steps", type=int, default=32, help="RK4 steps per pair (32)")
    p.add_argument("--u-shape", type=float, default=0.0,
                   help="U-shaped training times p(t) ~ cosh(a(2t-1)), more weight where 1-2 "
                        "step samplers read the field (0 = uniform; docs/BENCHMARKS.md uses 4)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (or set TQDM_DISABLE=1)")
    _add_train_args(p)

    p = sub.add_parser("export", help="write a served artifact (manifest + graphs)")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("--format", choices=["onnx", "torchscript", "both"], default="onnx")
    p.add_argument("--out", required=True, help="artifact directory, e.g. exported_models/NAME")
    p.add_argument("--name", help="served model name (default: the --out folder's name)")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="anomaly threshold's false-positive rate on normal data (0.01)")

    p = sub.add_parser("serve", help="serve the models over HTTP and gRPC on loopback")
    p.add_argument("--models", help="models directory (GENSERVE_MODELS_DIR, exported_models)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    p.add_argument("--port", type=int, default=3000, help="HTTP port (3000)")
    p.add_argument("--grpc-port", type=int, default=None,
                   help="gRPC (Open Inference Protocol v2) port (8001; GENSERVE_GRPC_PORT)")
    p.add_argument("--no-grpc", action="store_true", help="serve HTTP only")
    p.add_argument("--workers", type=int, help="worker processes (GENSERVE_WORKERS, 1)")

    p = sub.add_parser("fit-anomaly", help="one-command anomaly model from normal rows "
                       "(trained, calibrated, exported)")
    p.add_argument("data", help=".csv/.npy/.npz of normal rows (.npz with y: its y == 0 rows)")
    p.add_argument("--out", required=True, help="artifact directory (served name = folder)")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="share of normal rows the threshold flags (0.01)")
    p.add_argument("--model", nargs="+", help="model type(s) to try instead of the defaults")
    p.add_argument("--ensemble", type=int, default=1,
                   help="seeds per candidate; above 1 the served model is an equal-weight "
                        "mixture of them (exact density), chosen by validation NLL (1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--smoothing-search", nargs="+", type=float, metavar="S",
                   help="train the winning model type again with Gaussian smoothing of S "
                        "standard deviations on every column (each in (0, 2]) and keep the "
                        "lowest validation NLL (default 0.2 0.5; none with --ensemble)")
    g.add_argument("--no-smoothing-search", dest="smoothing_search", action="store_const",
                   const=[], help="train the candidates unsmoothed only")
    p.add_argument("--steps", type=int, help="cap on optimizer steps per candidate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=["onnx", "torchscript", "both"], default="onnx")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (or set TQDM_DISABLE=1)")

    p = sub.add_parser("score", help="score a file in chunks: CSV of score, percentile, "
                       "is_anomaly per row (the numbers /anomaly_score returns)")
    p.add_argument("--model", required=True, help="artifact directory")
    p.add_argument("--in", dest="in_path", required=True, help=".csv/.npy/.npz rows to score")
    p.add_argument("--out", required=True, help="CSV to write (atomically)")
    p.add_argument("--chunk-rows", type=int, default=65536, help="rows read at a time")
    p.add_argument("--per-dim", action="store_true", help="scores in nats per dimension")
    p.add_argument("--target-fpr", type=float, help="override the calibrated rate")

    p = sub.add_parser("data", help="write a named data set to .npy or .csv")
    p.add_argument("name", nargs="?", help="data set name")
    p.add_argument("--out", help="file to write (.npy or .csv)")
    p.add_argument("--rows", type=int, help="rows for generated sets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the named sets")

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
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (or set TQDM_DISABLE=1)")
    g = p.add_argument_group("anomaly sub-mode (instead of the comparison)")
    g.add_argument("--anomaly-model", metavar="DIR", help="artifact from fit-anomaly/export")
    g.add_argument("--normal", metavar="FILE", help="rows known to be normal")
    g.add_argument("--anomalous", metavar="FILE", help="rows known to be anomalous")
    _add_model_args(p)
    _add_train_args(p)

    return parser


@command("train")
def _train(ns: argparse.Namespace) -> int:
    import os

    from training.config import ModelConfig, TrainConfig
    from training.distributed import is_main_process, launch
    from training.fit import fit
    from training.registry import family_of

    if ns.distributed and ns.distributed > 1 and "WORLD_SIZE" not in os.environ:
        return launch(ns.distributed, ns.argv)
    if ns.family is not None and family_of(ns.model) != ns.family:
        raise ValueError(f"model {ns.model!r} is a {family_of(ns.model)} model, not {ns.family}")
    model_cfg = ModelConfig(**_pick(ns, ModelConfig.model_fields))
    train_cfg = TrainConfig(**_pick(ns, TrainConfig.model_fields), progress=not ns.no_progress)
    ckpt = fit(
        ns.model,
        ns.data,
        out=ns.out,
        rows=ns.rows,
        data_seed=ns.data_seed,
        split_seed=ns.split_seed,
        model_cfg=model_cfg,
        train_cfg=train_cfg,
    )
    s = ckpt.config.summary
    if not is_main_process():
        return 0
    print(
        f"saved {ns.out}: {ns.model} on {ckpt.config.data.name} ({ckpt.config.dim}-D), "
        f"best validation loss {s['best_val_loss']:.4f} at step {s['best_step']}, "
        f"{s['train_seconds']:.1f} s",
        file=sys.stderr,
    )
    return 0


@command("evaluate")
def _evaluate(ns: argparse.Namespace) -> int:
    from training.checkpoint import load_checkpoint
    from training.data import check_dim, load_data
    from training.evaluate import evaluate

    ckpt = load_checkpoint(ns.checkpoint)
    x = None
    if ns.data is not None:
        x = load_data(ns.data).x
        check_dim(x, ckpt.config.dim, ns.data)
    report = evaluate(
        ckpt, x, method=ns.method, steps=ns.steps, solver=ns.solver,
        samples=ns.samples, seed=ns.seed,
    )
    print(json.dumps(report, indent=2))
    return 0


@command("reflow")
def _reflow(ns: argparse.Namespace) -> int:
    from training.checkpoint import load_checkpoint, save_checkpoint
    from training.config import TrainConfig
    from training.flow_matching import reflow_checkpoint

    cfg = TrainConfig(**_pick(ns, TrainConfig.model_fields), progress=not ns.no_progress)
    student = reflow_checkpoint(load_checkpoint(ns.checkpoint), ns.pairs, cfg,
                                pair_steps=ns.pair_steps, u_shape=ns.u_shape,
                                teacher_name=str(ns.checkpoint))
    save_checkpoint(student, ns.out)
    print(f"saved {ns.out}: reflowed {student.config.model_type} ({ns.pairs} pairs)",
          file=sys.stderr)
    return 0


@command("export")
def _export(ns: argparse.Namespace) -> int:
    from training.checkpoint import load_checkpoint
    from training.export import export_checkpoint

    formats = ("onnx", "torchscript") if ns.format == "both" else (ns.format,)
    ckpt = load_checkpoint(ns.checkpoint)
    manifest = export_checkpoint(ckpt, ns.out, formats=formats, name=ns.name,
                                 target_fpr=ns.target_fpr)
    print(f"exported {manifest.name} ({manifest.family} {manifest.model_type}) to {ns.out}: "
          f"{', '.join(sorted(manifest.graphs))} as {', '.join(formats)}", file=sys.stderr)
    return 0


@command("serve")
def _serve(ns: argparse.Namespace) -> int:
    import os
    import signal
    import subprocess
    import time

    env = dict(os.environ)
    if ns.models:
        env["GENSERVE_MODELS_DIR"] = ns.models
    if ns.workers:
        env["GENSERVE_WORKERS"] = str(ns.workers)
    models = Path(env.get("GENSERVE_MODELS_DIR", "exported_models"))
    if not models.is_dir():
        raise FileNotFoundError(f"models directory {models} does not exist; run `make models` "
                                "or set GENSERVE_MODELS_DIR")
    scheme = _check_security_settings(env)
    cmds = [[sys.executable, "-m", "bentoml", "serve", "service.api:GenServe",
             "--host", ns.host, "--port", str(ns.port)]]
    where = f"{scheme}://{ns.host}:{ns.port}"
    if not ns.no_grpc:
        grpc_port = ns.grpc_port or int(env.get("GENSERVE_GRPC_PORT") or 8001)
        local = "127.0.0.1" if ns.host in ("0.0.0.0", "::", "") else ns.host
        local = f"[{local}]" if ":" in local else local
        cmds.append([sys.executable, "-m", "service.grpc_server", "--host", ns.host,
                     "--port", str(grpc_port), "--http-url", f"{scheme}://{local}:{ns.port}"])
        where += f" and grpc://{ns.host}:{grpc_port} (Open Inference Protocol v2)"
    print(f"serving {models} on {where}", file=sys.stderr)
    procs = [subprocess.Popen(cmd, env=env) for cmd in cmds]

    def stop(*_: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:  # one process gone (crash or signal) stops the other: no half-served state
        while all(proc.poll() is None for proc in procs):
            time.sleep(0.5)
    finally:
        stop()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return max(proc.returncode or 0 for proc in procs)


def _check_security_settings(env: dict[str, str]) -> str:
    """Fail before anything starts on unreadable keys or TLS files; the HTTP scheme."""
    from service.auth import security_config
    from service.settings import load_settings

    settings = load_settings(env)
    try:
        security_config(settings)
    except SystemExit as err:  # one line, exit 2, like every other bad input
        raise ValueError(str(err).removeprefix("genserve: ")) from None
    return "https" if settings.tls_certfile else "http"


@command("fit-anomaly")
def _fit_anomaly(ns: argparse.Namespace) -> int:
    from training.anomaly import fit_anomaly, format_summary

    formats = ("onnx", "torchscript") if ns.format == "both" else (ns.format,)
    summary = fit_anomaly(ns.data, ns.out, target_fpr=ns.target_fpr, seed=ns.seed,
                          ensemble=ns.ensemble, model=ns.model, steps=ns.steps,
                          smoothing_search=ns.smoothing_search, formats=formats,
                          progress=not ns.no_progress)
    print(format_summary(summary), file=sys.stderr)
    return 0


@command("score")
def _score(ns: argparse.Namespace) -> int:
    from training.anomaly import score_file

    out = score_file(ns.model, ns.in_path, ns.out, chunk_rows=ns.chunk_rows,
                     per_dim=ns.per_dim, target_fpr=ns.target_fpr)
    print(json.dumps(out), file=sys.stderr)
    return 0


@command("data")
def _data(ns: argparse.Namespace) -> int:
    from training.data import DATASETS, load_data, save_data

    if ns.list or ns.name is None:
        for name, spec in DATASETS.items():
            print(f"{name:14s} {spec.summary}")
        return 0
    if ns.out is None:
        raise ValueError("give --out FILE (.npy or .csv) to write the data set")
    data = load_data(ns.name, n=ns.rows, seed=ns.seed)
    save_data(data.x, ns.out)
    print(f"wrote {ns.out}: {data.x.shape[0]} rows x {data.x.shape[1]} columns", file=sys.stderr)
    return 0


@command("report")
def _report(ns: argparse.Namespace) -> int:
    from training.config import ModelConfig, TrainConfig
    from training.report import DEFAULT_MODELS, ReportConfig, anomaly_report, parse_models, report

    if ns.anomaly_model or ns.normal or ns.anomalous:
        if not (ns.anomaly_model and ns.normal and ns.anomalous):
            raise ValueError("the anomaly report needs --anomaly-model, --normal and --anomalous")
        summary = anomaly_report(ns.anomaly_model, ns.normal, ns.anomalous, ns.out)
        print(f"wrote {ns.out}: AUROC {summary['auroc']:.3f}, flagged "
              f"{100 * summary['flagged_normal']:.1f} % of normal and "
              f"{100 * summary['flagged_anomalous']:.1f} % of anomalous rows", file=sys.stderr)
        return 0
    if ns.models and ns.checkpoints:
        raise ValueError("give --models (to train) or --checkpoints (to load), not both")
    cfg = ReportConfig(
        out=ns.out, data=ns.data, models=parse_models(ns.models) if ns.models else DEFAULT_MODELS,
        checkpoints=tuple(ns.checkpoints or ()), reflow=ns.reflow, reflow_pairs=ns.reflow_pairs,
        rows=ns.rows, seed=ns.seed or 0, frames=ns.frames, points=ns.points, samples=ns.samples,
        solver=ns.solver, ode_steps=ns.ode_steps, grid=ns.grid, progress=not ns.no_progress,
        model=ModelConfig(**_pick(ns, ModelConfig.model_fields)),
        train=TrainConfig(**_pick(ns, TrainConfig.model_fields), progress=not ns.no_progress),
    )
    summary = report(cfg)
    print(f"wrote {ns.out}: {', '.join(summary['models'])} on {summary['data']['name']} "
          f"(see metrics.md)", file=sys.stderr)
    return 0


def _one_line(err: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --distributed relaunch
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:
        print(f"genserve {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
