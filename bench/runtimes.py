"""Runtime benchmark: eager torch vs TorchScript vs ONNX Runtime, per graph, in one process.

For each default architecture (trained briefly: timings do not depend on quality) every
exported graph is timed at batch 1, 64 and 4096 with the same thread count for all three
runtimes (``torch.set_num_threads(T)``, ONNX Runtime ``intra_op_num_threads=T``):

- eager: the exact ``nn.Module`` wrapper that ``training.export`` exports
  (``export_graphs``; flows use ``model.frozen()``), called under ``torch.no_grad`` on float32
  tensors;
- TorchScript and ONNX Runtime (CPU provider): the service's own executors
  (``service.runtime.graphs.TorchScriptGraph`` / ``OnnxGraph``), numpy in and out, as
  serving calls them.

Each measurement is a block of ``k`` back-to-back calls (``k`` chosen so a block lasts about
``--block-ms``), reported as time per call; the three runtimes are interleaved block by block
(rotating their order) so that load drifts on the shared machine hit all of them equally. We
report the median and p10/p90 of the per-block latencies after warm-up.

    python -m bench.runtimes [--threads 1 [2]] [--repeats N]

Writes the ``runtimes`` section of docs/BENCHMARKS.md and raw data to docs/bench/runtimes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import machine_line, write_section

RAW = Path(__file__).resolve().parents[1] / "docs" / "bench" / "runtimes.json"
BATCHES = (1, 64, 4096)
RUNTIMES = ("eager", "torchscript", "onnx")
CELL_BUDGET_S = 20.0  # wall-time cap per (graph, batch) cell, so a loaded machine stays bounded
MIN_ROUNDS = 5


@dataclass(frozen=True)
class BenchModel:
    name: str
    model_type: str
    data: str
    model: dict[str, Any]


MODELS = (
    BenchModel("moons-nsf", "nsf", "moons", {"hidden_features": 64, "transforms": 4}),
    BenchModel("moons-maf", "maf", "moons", {"hidden_features": 64, "transforms": 4}),
    BenchModel("moons-ddpm", "ddpm", "moons", {"hidden_features": 128, "hidden_layers": 3}),
    BenchModel("moons-otcfm", "otcfm", "moons", {"hidden_features": 128, "hidden_layers": 3}),
    BenchModel(
        "breast_cancer-maf", "maf", "breast_cancer", {"hidden_features": 64, "transforms": 3}
    ),
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- models


def build(spec: BenchModel, root: Path, steps: int) -> tuple[Any, Path]:
    """Train ``spec`` briefly and export it in both formats; returns (checkpoint, artifact dir)."""
    from training.config import ModelConfig, TrainConfig
    from training.export import export_checkpoint
    from training.fit import fit

    start = time.perf_counter()
    ckpt = fit(
        spec.model_type,
        spec.data,
        rows=None if spec.data != "moons" else 10_000,
        model_cfg=ModelConfig(**spec.model),
        train_cfg=TrainConfig(steps=steps, progress=False, eval_every=max(steps, 1)),
    )
    trained = time.perf_counter()
    out = root / spec.name
    export_checkpoint(ckpt, out, formats=("onnx", "torchscript"))
    log(
        f"{spec.name}: trained in {trained - start:.0f} s, exported in "
        f"{time.perf_counter() - trained:.0f} s"
    )
    return ckpt, out


def example_inputs(specs: list[Any], batch: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for s in specs:
        shape = [batch if a == "batch" else int(a) for a in s.shape]
        if s.name == "time":
            arrays.append(rng.uniform(0.1, 0.9, size=shape).astype(np.float32))
        else:
            arrays.append(rng.standard_normal(shape).astype(np.float32))
    return arrays


# --------------------------------------------------------------------------- timing


def _block(fn: Callable[[], object], k: int) -> float:
    start = time.perf_counter()
    for _ in range(k):
        fn()
    return (time.perf_counter() - start) / k


def _calibrate(fn: Callable[[], object], block_s: float, warmup_s: float) -> int:
    """Warm ``fn`` up for about ``warmup_s`` (at least 2 calls); return calls per block."""
    fn()  # first call: allocation, lazy init; not timed
    per_call, start = float("inf"), time.perf_counter()
    while per_call == float("inf") or time.perf_counter() - start < warmup_s:
        per_call = min(per_call, _block(fn, 1))
    return max(1, int(round(block_s / max(per_call, 1e-7))))


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    block_s: float,
    warmup_s: float,
    budget_s: float = CELL_BUDGET_S,
) -> dict[str, dict[str, Any]]:
    """``repeats`` rounds of one block per runtime, order rotating; a round is not started
    once the cell has used ``budget_s`` and at least ``MIN_ROUNDS`` rounds are in."""
    start = time.perf_counter()
    ks = {name: _calibrate(fn, block_s, warmup_s) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        if r >= MIN_ROUNDS and time.perf_counter() - start > budget_s:
            break
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            samples[name].append(_block(fns[name], ks[name]))
    out = {}
    for name, xs in samples.items():
        a = np.asarray(xs)
        out[name] = {
            "median_s": float(np.median(a)),
            "p10_s": float(np.quantile(a, 0.1)),
            "p90_s": float(np.quantile(a, 0.9)),
            "calls_per_block": ks[name],
            "blocks": len(xs),
            "block_latencies_s": [float(v) for v in xs],
        }
    return out


# --------------------------------------------------------------------------- benchmark


def _eager_fn(module: torch.nn.Module, arrays: list[np.ndarray]) -> Callable[[], object]:
    tensors = [torch.from_numpy(a) for a in arrays]

    def call() -> object:
        with torch.no_grad():
            return module(*tensors)

    return call


def _max_diff(ref: object, got: tuple[np.ndarray, ...]) -> float:
    ref_t = ref if isinstance(ref, tuple) else (ref,)
    return max(float(np.max(np.abs(r.numpy() - g))) for r, g in zip(ref_t, got, strict=True))


def _big_reps(repeats: int) -> int:
    """Fewer blocks at batch 4096, where one call is already long: bounded wall time."""
    return min(repeats, max(7, repeats // 2))


def bench_model(
    spec: BenchModel,
    ckpt: Any,
    directory: Path,
    threads: int,
    repeats: int,
    block_s: float,
    warmup_s: float,
) -> list[dict[str, Any]]:
    from artifact.manifest import read_manifest
    from service.runtime.graphs import OnnxGraph, TorchScriptGraph
    from training.export import export_graphs

    torch.set_num_threads(threads)
    manifest = read_manifest(directory)
    rows = []
    for graph, spec in export_graphs(ckpt).items():
        module, inputs = spec.module, spec.inputs
        files = manifest.graphs[graph]
        ts = TorchScriptGraph(
            directory / files["torchscript"].file, files["torchscript"], threads=threads
        )
        ox = OnnxGraph(
            directory / files["onnx"].file, files["onnx"], threads=threads, device="cpu"
        )
        torch.set_num_threads(threads)
        for batch in BATCHES:
            arrays = example_inputs(inputs, batch)
            fns = {
                "eager": _eager_fn(module, arrays),
                "torchscript": lambda ts=ts, arrays=arrays: ts(*arrays),
                "onnx": lambda ox=ox, arrays=arrays: ox(*arrays),
            }
            with torch.no_grad():
                ref = module(*[torch.from_numpy(a) for a in arrays])
            diffs = {
                "torchscript": _max_diff(ref, ts(*arrays)),
                "onnx": _max_diff(ref, ox(*arrays)),
            }
            reps = repeats if batch < 4096 else _big_reps(repeats)
            res = time_interleaved(fns, reps, block_s, warmup_s)
            row = {
                "model": spec.name,
                "model_type": spec.model_type,
                "dim": ckpt.config.dim,
                "graph": graph,
                "batch": batch,
                "threads": threads,
                "max_abs_diff_vs_eager": diffs,
                "providers": ox.providers,
                **res,
            }
            row["onnx_speedup_vs_eager"] = res["eager"]["median_s"] / res["onnx"]["median_s"]
            row["torchscript_speedup_vs_eager"] = (
                res["eager"]["median_s"] / res["torchscript"]["median_s"]
            )
            if batch >= 64 and row["onnx_speedup_vs_eager"] < 1.0:
                row["onnx_profile"] = onnx_profile(directory / files["onnx"].file, arrays, threads)
            rows.append(row)
            log(
                f"  T={threads} {spec.name:18s} {graph:13s} b={batch:5d} "
                f"eager {res['eager']['median_s'] * 1e3:8.3f} ms  "
                f"ts {res['torchscript']['median_s'] * 1e3:8.3f} ms  "
                f"onnx {res['onnx']['median_s'] * 1e3:8.3f} ms  "
                f"x{row['onnx_speedup_vs_eager']:.2f}"
            )
    return rows


def onnx_profile(
    path: Path, arrays: list[np.ndarray], threads: int, runs: int = 10
) -> dict[str, Any]:
    """ONNX Runtime's own per-node profile: share of kernel time by op type (top 6)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="genserve-ort-profile-") as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {i.name: a for i, a in zip(session.get_inputs(), arrays, strict=True)}
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    nodes = set()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e["args"]["op_name"]
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
            nodes.add(e["name"])
    total = sum(by_op.values()) or 1.0
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:6]
    return {
        "nodes": len(nodes),
        "kernel_ms_per_run": total / runs / 1e3,
        "top_ops": [{"op": op, "share": d / total} for op, d in top],
    }


def broadcast_probe(
    threads: int, repeats: int, block_s: float, warmup_s: float
) -> list[dict[str, Any]]:
    """One ONNX ``Sub`` node vs torch: a ``(dim,)`` constant broadcast over ``(4096, dim)`` rows
    against the same op on equal shapes, and a scalar taken from ``(4096, 1)`` against the same
    from ``(4096,)``. Explains where elementwise-heavy graphs lose at large batch (ONNX
    Runtime's CPU broadcast loops over the rows, one short span at a time, and treats a size-1
    axis as such a span: why the spline keeps no size-1 axes, ``training/flows/spline.py``)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def sub_model(xshape: tuple[int, ...], cshape: tuple[int, ...]) -> bytes:
        const = numpy_helper.from_array(np.ones(cshape, np.float32), "c")
        graph = helper.make_graph(
            [helper.make_node("Sub", ["x", "c"], ["y"])],
            "sub",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(xshape))],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [const],
        )
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 18)]
        ).SerializeToString()

    torch.set_num_threads(threads)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    out = []
    for xshape, cshape in (
        ((4096, 2), (2,)),
        ((4096, 2), (4096, 2)),
        ((4096, 30), (30,)),
        ((4096, 30), (4096, 30)),
        ((4096, 1), ()),
        ((4096,), ()),
    ):
        session = ort.InferenceSession(
            sub_model(xshape, cshape), options, providers=["CPUExecutionProvider"]
        )
        x = np.random.default_rng(0).standard_normal(xshape).astype(np.float32)
        xt, ct = torch.from_numpy(x), torch.ones(cshape)
        res = time_interleaved(
            {
                "eager": lambda xt=xt, ct=ct: xt - ct,
                "onnx": lambda s=session, x=x: s.run(None, {"x": x}),
            },
            repeats,
            block_s,
            warmup_s,
        )
        out.append(
            {
                "threads": threads,
                "x": list(xshape),
                "const": list(cshape),
                **{
                    k: {kk: vv for kk, vv in v.items() if kk != "block_latencies_s"}
                    for k, v in res.items()
                },
            }
        )
        log(
            f"  probe T={threads} {xshape} - {cshape}: torch "
            f"{res['eager']['median_s'] * 1e6:.1f} us, onnx {res['onnx']['median_s'] * 1e6:.1f} us"
        )
    return out


# --------------------------------------------------------------------------- report


def _ms(r: dict[str, Any]) -> str:
    def f(v: float) -> str:
        v *= 1e3
        return f"{v:.3g}" if v < 100 else f"{v:.0f}"

    return f"{f(r['median_s'])} ({f(r['p10_s'])}–{f(r['p90_s'])})"


def _rate(v: float) -> str:
    if v < 100:
        return f"{v:.3g}"
    return f"{v:.0f}" if v < 1e4 else f"{v:.2e}".replace("e+0", "e").replace("e+", "e")


def render(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    from bench.report import markdown_table

    lines = [
        "## Graph runtimes: eager torch vs TorchScript vs ONNX Runtime",
        "",
        f"`{meta['command']}` — {meta['machine']}; torch {meta['torch']}, onnxruntime "
        f"{meta['onnxruntime']} (CPUExecutionProvider); wall time {meta['wall_s']:.0f} s; "
        f"1-min load average {meta['loadavg_start'][0]:.1f} at start, "
        f"{meta['loadavg_end'][0]:.1f} at end (other work shares the machine).",
        "",
        "Models trained for "
        f"{meta['steps']} steps only (timings do not depend on quality), architectures as "
        "shipped: nsf (hidden 64, 4 transforms), maf (hidden 64, 4 transforms on moons; 3 on "
        "breast_cancer, 30-D), ddpm and otcfm (hidden 128, 3 layers). Eager is the exported "
        "`nn.Module` wrapper under `torch.no_grad` on float32 tensors; TorchScript and ONNX are "
        "the service's executors (`service.runtime.graphs`, numpy in/out). One process, same "
        "thread count T for all three; each cell is the median (p10–p90) of per-call latency over "
        f"{meta['repeats']} interleaved blocks ({_big_reps(meta['repeats'])} at batch 4096) "
        f"of back-to-back calls (~{meta['block_ms']:g} ms per block) after warm-up; a cell stops "
        f"early (at least {MIN_ROUNDS} blocks) once it has run {CELL_BUDGET_S:g} s. "
        "rows/s = batch / median latency; speedup = eager median / ONNX median (> 1: ONNX "
        "faster). CPU only: no GPU was available to this run, so there is no CUDA provider "
        "column.",
    ]
    for threads in meta["threads"]:
        t_rows = [r for r in rows if r["threads"] == threads]
        lines += ["", f"### T = {threads} thread{'s' if threads > 1 else ''}"]
        for model in dict.fromkeys(r["model"] for r in t_rows):
            m_rows = [r for r in t_rows if r["model"] == model]
            lines += [
                "",
                f"**{model}** ({m_rows[0]['model_type']}, {m_rows[0]['dim']}-D), latency in ms",
                "",
            ]
            table = [
                [
                    r["graph"],
                    r["batch"],
                    _ms(r["eager"]),
                    _ms(r["torchscript"]),
                    _ms(r["onnx"]),
                    _rate(r["batch"] / r["onnx"]["median_s"]),
                    f"{r['onnx_speedup_vs_eager']:.2f}x",
                ]
                for r in m_rows
            ]
            lines.append(
                markdown_table(
                    [
                        "graph",
                        "batch",
                        "eager ms",
                        "TorchScript ms",
                        "ONNX ms",
                        "ONNX rows/s",
                        "ONNX/eager",
                    ],
                    table,
                )
            )
        lines += ["", _verdict(t_rows, threads)]
        if threads != meta["threads"][0]:
            lines += ["", _thread_scaling(rows, meta["threads"][0], threads)]
    losers = [r for r in rows if "onnx_profile" in r]
    if losers:
        lines += [
            "",
            "Where ONNX Runtime is slower than eager, its own profiler (same run, same thread "
            "count, 10 calls) shows where the kernel time goes, by op type:",
            "",
        ]
        table = [
            [
                f"T = {r['threads']}",
                f"{r['model']}/{r['graph']}",
                r["batch"],
                r["onnx_profile"]["nodes"],
                ", ".join(f"{o['op']} {o['share']:.0%}" for o in r["onnx_profile"]["top_ops"]),
            ]
            for r in losers
        ]
        lines.append(
            markdown_table(["threads", "graph", "batch", "nodes", "kernel time by op"], table)
        )
    if meta.get("probe"):
        lines += [
            "",
            "One elementwise node on its own (median µs, same run): a per-feature constant "
            "broadcast over 4096 rows against the same op on equal shapes, and a scalar "
            "subtracted from a `(4096, 1)` column against the same on `(4096,)`. ONNX "
            "Runtime's CPU broadcast walks the rows one short span at a time and treats a "
            "size-1 axis as such a span, so the spline (`training/flows/spline.py`) works on "
            "values flattened to `(N,)` and bins-first `(K, N)` tensors, never `(N, 1, K)`: "
            "that layout took moons-nsf's log_prob at 4096 rows and T = 1 from 0.77x eager "
            "(the previous run of this command) to the figure above.",
            "",
        ]
        table = [
            [
                f"T = {p['threads']}",
                f"{_shape(p['x'])} - {_shape(p['const']) if p['const'] else 'scalar'}",
                f"{p['eager']['median_s'] * 1e6:.1f}",
                f"{p['onnx']['median_s'] * 1e6:.1f}",
                f"{p['eager']['median_s'] / p['onnx']['median_s']:.2f}x",
            ]
            for p in meta["probe"]
        ]
        lines.append(
            markdown_table(["threads", "op", "torch µs", "ONNX Runtime µs", "ONNX/eager"], table)
        )
    return "\n".join(lines)


def _shape(shape: list[int]) -> str:
    return f"({', '.join(map(str, shape))}{',' if len(shape) == 1 else ''})"


def _thread_scaling(rows: list[dict[str, Any]], base: int, threads: int) -> str:
    """Median over batch >= 64 cells of latency(T) / latency(base), per runtime."""
    by_key = {(r["model"], r["graph"], r["batch"], r["threads"]): r for r in rows}
    ratios: dict[str, list[float]] = {name: [] for name in RUNTIMES}
    for (model, graph, batch, t), r in by_key.items():
        if t != threads or batch < 64 or (model, graph, batch, base) not in by_key:
            continue
        b = by_key[(model, graph, batch, base)]
        for name in RUNTIMES:
            ratios[name].append(r[name]["median_s"] / b[name]["median_s"])
    parts = ", ".join(
        f"{name} {np.median(v):.2f}x (max {max(v):.0f}x)" for name, v in ratios.items() if v
    )
    text = (
        f"Latency at T = {threads} relative to T = {base}, median over the batch ≥ 64 cells "
        f"(< 1: the extra thread helps): {parts}."
    )
    if ratios["eager"] and ratios["onnx"]:
        eager, onnx = float(np.median(ratios["eager"])), float(np.median(ratios["onnx"]))
        if eager > 1.0 and eager > 1.5 * onnx:
            text += (
                " The extra thread made torch slower, not faster: on this shared 2-core machine "
                "it competes with other work (see the load average above), and torch's intra-op "
                "threads degrade far more than ONNX Runtime's under that contention, so the "
                f"T = {threads} ratios measure contention as much as the runtimes."
            )
    return text


def _verdict(rows: list[dict[str, Any]], threads: int) -> str:
    big = [r for r in rows if r["batch"] >= 64]
    bad = [r for r in big if r["onnx_speedup_vs_eager"] < 1.0]
    if not bad:
        return (
            f'**Target "ONNX ≥ eager at batch ≥ 64" at T = {threads}: holds** for all '
            f"{len(big)} (graph, batch) cells."
        )

    def overlap(r: dict[str, Any]) -> str:
        # p10-p90 ranges of the two runtimes overlap: the loss is within the run's spread
        return ", within spread" if r["onnx"]["p10_s"] <= r["eager"]["p90_s"] else ""

    items = ", ".join(
        f"{r['model']}/{r['graph']} b={r['batch']} ({r['onnx_speedup_vs_eager']:.2f}x{overlap(r)})"
        for r in bad
    )
    return (
        f'**Target "ONNX ≥ eager at batch ≥ 64" at T = {threads}: does not hold** in '
        f"{len(bad)} of {len(big)} cells: {items}."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[1],
        help="thread counts T to run (each for all three runtimes)",
    )
    p.add_argument("--repeats", type=int, default=30, help="timed blocks per runtime per cell")
    p.add_argument("--steps", type=int, default=200, help="training steps per model")
    p.add_argument("--block-ms", type=float, default=10.0, help="target length of one block")
    p.add_argument("--warmup-ms", type=float, default=100.0, help="warm-up per runtime per cell")
    p.add_argument("--models", nargs="*", help="only these model names")
    p.add_argument("--no-write", action="store_true", help="print; do not touch docs/")
    p.add_argument(
        "--from-json",
        action="store_true",
        help="re-render the section from docs/bench/runtimes.json; measure nothing",
    )
    ns = p.parse_args(argv)
    if ns.from_json:
        saved = json.loads(RAW.read_text())
        markdown = render(saved["rows"], saved["meta"])
        if not ns.no_write:
            write_section("runtimes", markdown)
        print(markdown)
        return 0

    import onnxruntime as ort

    start = time.perf_counter()
    load_start = list(os.getloadavg())
    specs = [m for m in MODELS if not ns.models or m.name in ns.models]
    command = (
        "python -m bench.runtimes"
        + (f" --threads {' '.join(map(str, ns.threads))}" if ns.threads != [1] else "")
        + (f" --repeats {ns.repeats}" if ns.repeats != 30 else "")
        + (f" --steps {ns.steps}" if ns.steps != 200 else "")
    )
    rows: list[dict[str, Any]] = []
    probe: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="genserve-bench-runtimes-") as tmp:
        built = []
        for spec in specs:
            t0 = time.perf_counter()
            torch.set_num_threads(1)  # setup only; 2 threads crawl on a loaded 2-core box
            built.append((spec, *build(spec, Path(tmp), ns.steps)))
            log(f"trained+exported {spec.name} in {time.perf_counter() - t0:.0f} s")
        for threads in ns.threads:
            for spec, ckpt, directory in built:
                rows += bench_model(
                    spec,
                    ckpt,
                    directory,
                    threads,
                    ns.repeats,
                    ns.block_ms / 1e3,
                    ns.warmup_ms / 1e3,
                )
            probe += broadcast_probe(threads, ns.repeats, ns.block_ms / 1e3, ns.warmup_ms / 1e3)
    wall = time.perf_counter() - start
    meta = {
        "command": command,
        "machine": machine_line(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "threads": ns.threads,
        "repeats": ns.repeats,
        "steps": ns.steps,
        "block_ms": ns.block_ms,
        "warmup_ms": ns.warmup_ms,
        "batches": list(BATCHES),
        "wall_s": wall,
        "loadavg_start": load_start,
        "loadavg_end": list(os.getloadavg()),
        "probe": probe,
    }
    markdown = render(rows, meta)
    if ns.no_write:
        print(markdown)
    else:
        RAW.parent.mkdir(parents=True, exist_ok=True)
        RAW.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        write_section("runtimes", markdown)
        print(markdown)
    log(f"done in {wall:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
