"""``make gpu-check``: the GPU path's proof, one command on a lent CUDA machine, within 6 minutes.

The lent machine has no network and its own ``python3`` (torch with CUDA, ONNX Runtime's CPU
build, numpy, scipy and a few more: :data:`LENT_MACHINE_HAS`); what else the GPU path imports
travels with the working tree as wheels (:data:`CARRIED`, ``make gpu-wheels``, listed in
docs/DEPLOY.md). On such a machine this:

1. runs the ``gpu``-marked tests (``tests/test_gpu.py``: CUDA parity with the CPU for every
   model type's TorchScript graphs and for a torch-runtime PF-ODE likelihood, training steps
   on CUDA), pytest's plugins off so only pytest itself is needed;
2. times ``log_likelihood`` rows/s for nsf and the diffusion PF-ODE (the default models'
   architectures, trained briefly: speed does not depend on quality) at 64 and 4096 rows,
   the TorchScript runtime on the CPU (all cores) and on CUDA, interleaved block by block in
   one process (``bench.runtimes.time_interleaved``);
3. sweeps the PF-ODE's rows per call on CUDA (1024 to 65536) and names the smallest batch
   within 10 % of the best rows/s: the measured choice for ``CUDA_BATCH_ROWS``
   (``service/settings.py``, provisional until then);
4. times training steps/s of the image diffusion model (``ddpm_image`` on digits, 1x8x8) on
   the CPU and on CUDA (AMP as ``--amp auto`` picks: bfloat16);

then prints one table and writes it all to a JSON file. Where torch sees no CUDA device it
says so and exits 0 having measured nothing (the test suite runs it that way).

    make gpu-check                               # on the lent machine (JSON under $OUT)
    python -m bench.gpu_check --section FILE     # here: FILE into docs/BENCHMARKS.md, "GPU"
    python -m bench.gpu_check --section          # the section with no figure (none yet)
    python -m bench.gpu_check --imports          # distributions the GPU path imports
    python -m bench.gpu_check --requirements     # NAME==VERSION of CARRIED (make gpu-wheels)
    python -m bench.gpu_check --dry-run          # steps 2-4 on the CPU twice, small: a code check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement

from bench.images import CONFIGS, DATA
from bench.report import markdown_table, write_results, write_section
from bench.runtimes import time_interleaved
from service.runtime import open_runtime
from training.config import ModelConfig, TrainConfig
from training.data import load_data
from training.export import export_checkpoint
from training.fit import fit

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "docs" / "bench" / "gpu.json"
SECTION = "gpu"
TESTS = "tests/test_gpu.py"
COMMAND = "make gpu-wheels   # here, once; then on the lent GPU machine: make gpu-check"

LENT_MACHINE_HAS = ("torch", "onnxruntime", "numpy", "scipy", "safetensors", "pyarrow",
                    "aiohttp", "grpcio", "prometheus-client")
"""What the lent GPU machine's ``python3`` holds (with what these need, which came with
them); no bentoml, no pydantic."""
OPTIONAL_IMPORTS = ("charset-normalizer", "nvidia-ml-py", "rich")
"""Imported when present, required by nothing (``numpy.f2py``, ``torch.cuda`` and
scikit-learn's progress bars try them): not carried."""

FLOORS = ("protobuf", "typing-extensions")
"""There, but carried too: pydantic asks for a recent typing-extensions (>= 4.16) and onnx for
a recent protobuf (>= 6.31), newer than torch and ONNX Runtime need (small wheels; a newer one
on the path first serves both)."""

CARRIED = ("annotated-types", "cloudpickle", "iniconfig", "joblib", "ml-dtypes", "narwhals",
           "onnx", "pandas", "pluggy", "protobuf", "psutil", "pydantic", "pydantic-core",
           "pygments", "pytest", "python-dateutil", "scikit-learn", "threadpoolctl", "tqdm",
           "typing-extensions", "typing-inspection", "tzdata")
"""What the GPU path (this module, ``tests/test_gpu.py`` with its conftest, the runtime,
training on the digits images, TorchScript export) imports, with what those require, beyond
:data:`LENT_MACHINE_HAS`, and the :data:`FLOORS`: carried as wheels (``make gpu-wheels``;
docs/DEPLOY.md lists them; tests/test_devices.py checks both against :func:`missing_there`)."""

TARGET_RATIO = 20.0  # issue #34: CUDA >= 20x the same machine's CPU, PF-ODE 4096 rows, training
LL_ROWS = (64, 4096)
SWEEP_ROWS = (1024, 4096, 16384, 65536)
WITHIN = 0.10  # the sweep's pick: the smallest batch within this of the best rows/s
MODELS = {  # bench.runtimes' default architectures
    "moons-nsf": ("nsf", {"hidden_features": 64, "transforms": 4}),
    "moons-ddpm": ("ddpm", {"hidden_features": 128, "hidden_layers": 3}),
}
ODE = {"steps": 32, "solver": "rk4"}
"""The PF-ODE's solve when timed: a fixed step count (128 ``velocity_div`` calls per row
block), so both devices do the same work and a cell's time is bounded; nsf ignores it.
The served default, dopri5, takes as many steps as the briefly trained field asks for."""
IMAGE = "ddpm_image"  # on bench.images' data set and configuration


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the wheels


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requires(dist: str) -> set[str]:
    """``dist``'s own requirements (no extras, markers true here), normalised names."""
    out = set()
    for raw in metadata.requires(dist) or []:
        req = Requirement(raw)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.add(_normal(req.name))
    return out


def closure(names: set[str] | tuple[str, ...]) -> set[str]:
    """``names`` and everything they require, transitively, as installed here."""
    seen: set[str] = set()
    todo = [_normal(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo.extend(_requires(name) - seen)
        except metadata.PackageNotFoundError:
            continue
    return seen


def _import_gpu_path() -> None:
    """Import what a GPU run imports beyond this module's own imports: the tests as pytest
    collects them (plugins off), and the image set's loader (scikit-learn's digits)."""
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", str(ROOT / TESTS)])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        raise SystemExit(f"collecting {TESTS} failed ({code})")
    load_data(DATA, n=10)


def imported_distributions() -> set[str]:
    """The installed distributions loaded once the GPU path is imported (call it in a fresh
    process with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD=1``, as ``--imports`` is called)."""
    _import_gpu_path()
    owners = metadata.packages_distributions()
    tops = {m.split(".")[0] for m in list(sys.modules)} - set(sys.stdlib_module_names)
    return {_normal(d) for t in tops for d in owners.get(t, [])}


def missing_there() -> set[str]:
    """The distributions the GPU path needs that the lent machine lacks: what it imports
    (:func:`imported_distributions`, less :data:`OPTIONAL_IMPORTS`) with their requirements,
    less :data:`LENT_MACHINE_HAS` with theirs, and the :data:`FLOORS`."""
    ours = {_normal(d) for d in metadata.packages_distributions().get("service", [])}
    needed = closure(imported_distributions() - set(OPTIONAL_IMPORTS) - ours)
    return needed - closure(LENT_MACHINE_HAS) | set(FLOORS)


def requirements() -> list[str]:
    """``NAME==VERSION`` of each carried distribution, at the version installed here (the one
    the tests ran with)."""
    return [f"{name}=={metadata.version(name)}" for name in CARRIED]


# --------------------------------------------------------------------------- measuring


def _card() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown (no nvidia-smi)"
    out = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else \
        f"unknown (nvidia-smi: {out.stderr.strip()[:200]})"


def _run_tests(budget_s: float) -> dict[str, Any]:
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", TQDM_DISABLE="1")
    start = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "-m", "gpu", TESTS], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=budget_s)
        text, code = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as err:
        text, code = f"{err.stdout or ''}\ntimed out after {budget_s:.0f} s", -1
    print(text[-4000:], file=sys.stderr)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error)", text)}
    return {"exit": code, "seconds": round(time.perf_counter() - start, 1), **counts}


def _build(root: Path, name: str, steps: int) -> Path:
    kind, cfg = MODELS[name]
    ckpt = fit(kind, "moons", rows=10_000, model_cfg=ModelConfig(**cfg),
               train_cfg=TrainConfig(steps=steps, progress=False, eval_every=steps))
    export_checkpoint(ckpt, root / name, formats=("torchscript",), calibration=False)
    return root / name


def _log_likelihood(root: Path, gpu: str, steps: int, repeats: int, ll_rows: tuple[int, ...],
                    sweep: tuple[int, ...]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rows_out, sweep_out = [], []
    rng = np.random.default_rng(0)
    for name in MODELS:
        folder = _build(root, name, steps)
        rts = {label: open_runtime(folder, runtime="torchscript", device=dev)
               for label, dev in (("cpu", "cpu"), ("cuda", "cpu" if gpu == "cpu" else "cuda"))}
        for rows in ll_rows:
            x = rng.normal(size=(rows, 2)) * 0.8
            ref = rts["cpu"].log_likelihood(x, **ODE)
            got = rts["cuda"].log_likelihood(x, **ODE)
            fns = {label: (lambda rt=rt, x=x: rt.log_likelihood(x, **ODE))
                   for label, rt in rts.items()}
            t = time_interleaved(fns, repeats, block_s=0.2, warmup_s=0.3, budget_s=30)
            cpu, dev = rows / t["cpu"]["median_s"], rows / t["cuda"]["median_s"]
            rows_out.append({"model": name, "rows": rows, "cpu_rows_s": cpu, "cuda_rows_s": dev,
                             "ratio": dev / cpu, "nfe": int(got.nfe),
                             "max_abs_diff": float(np.abs(got.log_prob - ref.log_prob).max()),
                             "timings": t})
            log(f"{name} {rows} rows: CPU {cpu:.4g} rows/s, CUDA {dev:.4g} rows/s "
                f"({dev / cpu:.3g}x)")
        if MODELS[name][0] != "ddpm":
            continue
        for rows in sweep:  # CUDA alone: the batch size the service should take there
            x = rng.normal(size=(rows, 2)) * 0.8
            def call(rt: Any = rts["cuda"], x: np.ndarray = x) -> None:
                rt.log_likelihood(x, **ODE)

            call()  # warm-up at this shape
            best = min(_once(call) for _ in range(2))
            sweep_out.append({"model": name, "rows": rows, "cuda_rows_s": rows / best})
            log(f"sweep {name} {rows} rows: {rows / best:.4g} rows/s")
    return rows_out, sweep_out


def _once(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def pick_batch(sweep: list[dict[str, Any]]) -> int | None:
    """The smallest swept batch within :data:`WITHIN` of the best rows/s."""
    if not sweep:
        return None
    best = max(s["cuda_rows_s"] for s in sweep)
    return min(s["rows"] for s in sweep if s["cuda_rows_s"] >= (1 - WITHIN) * best)


def _training(gpu: str, steps: dict[str, int]) -> list[dict[str, Any]]:
    """``ddpm_image`` as bench.images trains it (its architecture, batch, EMA), a few steps on
    each device after a 2-step warm-up; steps/s over the timed run, its final validation
    included."""
    kind = IMAGE
    spec = CONFIGS[kind]
    train = {k: v for k, v in spec["train"].items() if k != "steps"}
    out = []
    for label, device in (("cpu", "cpu"), ("cuda", "cpu" if gpu == "cpu" else "cuda")):
        cfg = {**train, "progress": False, "warmup_steps": 1, "device": device}
        for n in (2, steps[label]):  # the first: warm-up (allocators, cuDNN's choice)
            res = fit(kind, DATA, model_cfg=ModelConfig(**spec["model"]),
                      train_cfg=TrainConfig(steps=n, eval_every=n, **cfg))
        seconds = res.config.summary["train_seconds"]
        out.append({"model": kind, "device": label, "steps": n, "batch": train["batch_size"],
                    "seconds": seconds, "steps_s": n / seconds})
        log(f"train {kind} on {label} ({device}): {n / seconds:.3g} steps/s")
    return out


def measure(gpu: str, *, dry_run: bool) -> dict[str, Any]:
    """Steps 2-4 (see the module's docstring), ``gpu`` standing for the CUDA device."""
    small = dry_run
    if small:  # this code on a small shared CPU: one thread, no stalls from oversubscription
        torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ll, sweep = _log_likelihood(Path(tmp), gpu, steps=20 if small else 200,
                                    repeats=3 if small else 7,
                                    ll_rows=(8, 64) if small else LL_ROWS,
                                    sweep=(64, 128) if small else SWEEP_ROWS)
    train = _training(gpu, {"cpu": 3 if small else 20, "cuda": 3 if small else 200})
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "python":
            platform.python_version(), "cpu_threads": torch.get_num_threads(),
            "log_likelihood": ll, "batch_sweep": sweep, "batch_rows": pick_batch(sweep),
            "training": train, "dry_run": dry_run,
            "seconds": round(time.perf_counter() - start, 1)}


# --------------------------------------------------------------------------- reporting


def table(result: dict[str, Any]) -> str:
    rows: list[list[object]] = [
        [f"`log_likelihood` {r['model']}, {r['rows']} rows", "rows/s", r["cpu_rows_s"],
         r["cuda_rows_s"], r["ratio"]] for r in result["log_likelihood"]]
    by_dev = {t["device"]: t for t in result["training"]}
    if {"cpu", "cuda"} <= set(by_dev):
        cpu, dev = by_dev["cpu"], by_dev["cuda"]
        rows.append([f"training {cpu['model']}, batch {cpu['batch']}", "steps/s",
                     cpu["steps_s"], dev["steps_s"], dev["steps_s"] / cpu["steps_s"]])
    return markdown_table(["cell", "unit", "CPU", "CUDA", "CUDA/CPU"], rows)


def targets(result: dict[str, Any]) -> list[str]:
    """The issue's two targets against ``result``, one line each."""
    lines = []
    ode = [r for r in result["log_likelihood"]
           if MODELS[r["model"]][0] == "ddpm" and r["rows"] == max(LL_ROWS)]
    train = {t["device"]: t["steps_s"] for t in result["training"]}
    pairs = [("PF-ODE `log_likelihood` at 4096 rows", ode[0]["ratio"] if ode else None),
             ("image-diffusion training", train["cuda"] / train["cpu"]
              if {"cpu", "cuda"} <= set(train) else None)]
    for what, ratio in pairs:
        if ratio is None:
            lines.append(f"- {what}: not measured")
        else:
            verdict = "met" if ratio >= TARGET_RATIO else "missed"
            lines.append(f"- {what}: CUDA {ratio:.3g}x the CPU (target {TARGET_RATIO:g}x): "
                         f"{verdict}")
    return lines


def section(result: dict[str, Any] | None) -> str:
    """The GPU section of docs/BENCHMARKS.md: the figures of ``result``, or none."""
    head = ["## GPU: CUDA next to the CPU of the same machine (`make gpu-check`)", ""]
    how = ["Reproduce (the wheels the lent machine lacks travel with the tree; docs/DEPLOY.md):",
           "", "```", COMMAND, "python -m bench.gpu_check --section $OUT/gpu-check.json   "
           "# here, with the JSON it wrote", "```", ""]
    if result is None:
        return "\n".join(head + [
            "**No GPU figure exists yet.** No CUDA device has been lent to a session that "
            "could run the check, so nothing on this page was measured on a GPU: the CUDA "
            "rows/s, the CUDA/CPU ratios, the image-diffusion training steps/s and the CUDA "
            f"batch size are all unmeasured. The targets (CUDA >= {TARGET_RATIO:g}x the "
            "CPU rows/s of the same machine for the torch-runtime PF-ODE `log_likelihood` "
            f"at 4096 rows, and >= {TARGET_RATIO:g}x its steps/s for image-diffusion "
            "training) are open.", "",
            "`GENSERVE_MAX_BATCH_ROWS` unset takes 16384 rows on CUDA: a provisional figure. "
            "The check sweeps the PF-ODE's rows per call on CUDA (1024 to 65536) and names "
            f"the smallest batch within {WITHIN:.0%} of the best rows/s; that replaces it.",
            "", "What the check runs, within 6 minutes: the `gpu`-marked tests "
            "(`tests/test_gpu.py`), `log_likelihood` rows/s for nsf and the PF-ODE at 64 "
            "and 4096 rows (TorchScript runtime, CPU with all cores vs CUDA, interleaved in "
            "one process), the CUDA batch sweep, and `ddpm_image` training steps/s on the "
            "CPU and on CUDA. Without a CUDA device it says so and exits 0.", ""] + how)
    tests = result.get("tests", {})
    body = [f"Card: {result.get('card', 'unknown')}; torch {result['torch']} (CUDA "
            f"{result['cuda']}), Python {result['python']}, {result['cpu_threads']} CPU "
            f"threads; measured {result.get('date', '?')}. gpu-marked tests: "
            f"{tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
            f"{tests.get('skipped', 0)} skipped in {tests.get('seconds', '?')} s.", "",
            table(result), "", "Targets:", *targets(result), "",
            "CUDA batch sweep (PF-ODE): " + ", ".join(
                f"{s['rows']} rows {s['cuda_rows_s']:.4g} rows/s" for s in result["batch_sweep"])
            + f"; the smallest within {WITHIN:.0%} of the best: {result['batch_rows']} rows.",
            ""]
    return "\n".join(head + body + how)


def write(path: Path | None) -> None:
    """``path``'s result (or none) into docs/BENCHMARKS.md; the JSON to docs/bench/gpu.json."""
    if path is None:
        write_section(SECTION, section(None))
        return
    result = json.loads(Path(path).read_text())
    write_results(SECTION, section(result), RAW, result)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"),
                   help="where the JSON goes (make gpu-check: $OUT/gpu-check.json)")
    p.add_argument("--section", nargs="?", const="", metavar="JSON",
                   help="write docs/BENCHMARKS.md's GPU section from JSON (none: no figure)")
    p.add_argument("--imports", action="store_true", help="print the distributions the GPU "
                   "path imports beyond the lent machine's, one a line")
    p.add_argument("--requirements", action="store_true",
                   help="print NAME==VERSION of the carried wheels")
    p.add_argument("--dry-run", action="store_true",
                   help="steps 2-4 with the CPU standing in for CUDA, small (checks the code)")
    ns = p.parse_args(argv)
    if ns.section is not None:
        write(Path(ns.section) if ns.section else None)
        return 0
    if ns.imports:
        with contextlib.redirect_stdout(sys.stderr):  # pytest's collection report
            missing = missing_there()
        print("\n".join(sorted(missing)))
        return 0
    if ns.requirements:
        print("\n".join(requirements()))
        return 0

    start = time.perf_counter()
    if ns.dry_run:
        result = measure("cpu", dry_run=True)
        print(table(result))
        return 0
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        print(f"gpu-check: no CUDA device visible (torch {torch.__version__}, {build}): the "
              "gpu-marked tests and the GPU benchmark did not run; nothing was measured.")
        return 0
    gpu = f"cuda:{torch.cuda.current_device()}"
    card = _card()
    log(f"gpu-check on {card}")
    tests = _run_tests(budget_s=200)
    result = {"card": card, "date": time.strftime("%Y-%m-%d"), "tests": tests,
              **measure(gpu, dry_run=False)}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print("\n".join(targets(result)))
    print(f"batch sweep pick: {result['batch_rows']} rows; tests: {tests}; "
          f"{result['wall_s']} s in all; JSON: {ns.out}")
    return 0 if tests.get("exit") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
