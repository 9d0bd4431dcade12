"""Where graphs and training run, as far as a machine without a GPU can check it: ONNX Runtime
provider selection over stand-in provider lists (the real function, the real CPU build of ONNX
Runtime), IO binding, the device settings, training's ``--device``/``--amp``, the GPU image's
packages, ``make gpu-check`` in its no-GPU mode and the wheels it carries.

The CUDA side runs in tests/test_gpu.py (``gpu``-marked) on a lent GPU machine.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from artifact.manifest import read_manifest
from service.models import ModelSet
from service.runtime import open_runtime
from service.runtime.graphs import CPU, OnnxGraph, Placement, choose_providers
from service.settings import SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "exported_models"
CUDA_OFFERED = ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]


def _graph(model: str, graph: str) -> tuple[Path, object]:
    spec = read_manifest(MODELS / model).graphs[graph]["onnx"]
    return MODELS / model / spec.file, spec


# --- provider selection ----------------------------------------------------------------------


def test_cuda_is_picked_first_when_onnx_runtime_offers_it() -> None:
    chain = choose_providers(Placement(device="auto", device_id=1, memory_mb=1024),
                             CUDA_OFFERED)
    (name, options), cpu = chain
    assert name == "CUDAExecutionProvider" and cpu == CPU
    assert options["device_id"] == 1 and options["gpu_mem_limit"] == 1024 << 20
    assert choose_providers(Placement(device="cuda"), CUDA_OFFERED)[0][0] == name
    trt = choose_providers(Placement(provider="TensorrtExecutionProvider"), CUDA_OFFERED)
    assert [p[0] if isinstance(p, tuple) else p for p in trt] == CUDA_OFFERED


def test_the_cpu_when_cuda_is_not_offered_or_not_wanted() -> None:
    assert choose_providers(Placement(device="auto"), [CPU]) == [CPU]
    assert choose_providers(Placement(device="cpu"), CUDA_OFFERED) == [CPU]
    with pytest.raises(RuntimeError, match="onnxruntime-gpu.*GENSERVE_DEVICE=cpu"):
        choose_providers(Placement(device="cuda"), [CPU])
    with pytest.raises(ValueError, match="provider must be one of"):
        Placement(provider="ROCMExecutionProvider")


def test_auto_falls_back_to_the_cpu_with_a_warning_when_cuda_fails_to_start(
        caplog, monkeypatch) -> None:
    """This machine's ONNX Runtime is the CPU build: told that CUDA is offered, the session
    asks for it, comes up without it, and ``auto`` serves on the CPU with a warning."""
    path, spec = _graph("moons-nsf", "log_prob")
    logger = logging.getLogger("genserve")  # BentoML's logging setup, if imported, disables it
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "propagate", True)
    with caplog.at_level(logging.WARNING, logger="genserve"):
        graph = OnnxGraph(path, spec, device="auto", offered=CUDA_OFFERED)
    assert graph.where == "cpu" and graph.providers == [CPU]
    assert any("could not initialise" in r.getMessage() and "runs on the CPU" in r.getMessage()
               for r in caplog.records)
    u = np.random.default_rng(0).normal(size=(5, 2))
    (expected,) = OnnxGraph(path, spec, device="cpu")(u)
    assert np.array_equal(graph(u)[0], expected)
    with pytest.raises(RuntimeError, match="does not fall back to the CPU"):
        OnnxGraph(path, spec, device="cuda", offered=CUDA_OFFERED)


def test_cuda_without_a_gpu_is_refused_with_the_fix(artifact_factory) -> None:
    with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
        open_runtime(MODELS / "moons-nsf", runtime="onnx", device="cuda")
    with pytest.raises(RuntimeError, match="sees no CUDA device.*GENSERVE_DEVICE=cpu"):
        open_runtime(artifact_factory("nsf"), runtime="torchscript", device="cuda")


# --- arrays that stay where the graphs run ---------------------------------------------------


def test_io_binding_gives_the_numpy_answer() -> None:
    """Torch tensors in are bound to the session's inputs and outputs (here on the CPU, the
    same code that binds CUDA memory on a GPU); 7 rows exercise the row-block padding."""
    path, spec = _graph("moons-ddpm", "velocity_div")
    graph = OnnxGraph(path, spec, device="cpu")
    rng = np.random.default_rng(1)
    x, t = rng.normal(size=(7, 2)), rng.uniform(0.1, 0.9, size=7)
    expected = graph(x, t)
    bound = graph(torch.as_tensor(x), torch.as_tensor(t))
    assert all(isinstance(b, torch.Tensor) and b.shape[0] == 7 for b in bound)
    for b, e in zip(bound, expected, strict=True):
        assert np.array_equal(b.numpy(), e)


def test_each_runtime_stages_the_ode_state_as_its_graphs_take_it(artifact_factory) -> None:
    onnx = open_runtime(MODELS / "moons-ddpm", runtime="onnx", device="auto")
    assert onnx.devices() == {g: "cpu" for g in onnx.manifest.graphs}
    assert isinstance(onnx.stage(np.zeros((2, 2))), np.ndarray)
    ts = open_runtime(artifact_factory("ddpm"), runtime="torchscript", device="cpu")
    staged = ts.stage(np.zeros((2, 2)))
    assert isinstance(staged, torch.Tensor) and staged.dtype == torch.float64
    x = np.random.default_rng(2).normal(size=(9, 2))
    a = ts.log_likelihood(x, steps=8, solver="rk4")
    b = open_runtime(artifact_factory("ddpm"), runtime="onnx").log_likelihood(
        x, steps=8, solver="rk4")
    assert isinstance(a.log_prob, np.ndarray) and np.abs(a.log_prob - b.log_prob).max() < 1e-4


# --- settings --------------------------------------------------------------------------------


def test_device_settings_and_the_batch_size_by_device() -> None:
    s = load_settings({"GENSERVE_DEVICE": "cuda", "GENSERVE_DEVICE_ID": "2",
                       "GENSERVE_PROVIDER": "TensorrtExecutionProvider",
                       "GENSERVE_GPU_MEMORY_MB": "2048"})
    assert s.placement() == Placement(device="cuda", device_id=2, memory_mb=2048,
                                      provider="TensorrtExecutionProvider")
    from service.settings import CPU_BATCH_ROWS, CUDA_BATCH_ROWS

    assert (s.batch_rows(False), s.batch_rows(True)) == (CPU_BATCH_ROWS, CUDA_BATCH_ROWS)
    assert load_settings({"GENSERVE_MAX_BATCH_ROWS": "64"}).batch_rows(True) == 64
    for name, value in (("GENSERVE_PROVIDER", "ROCMExecutionProvider"),
                        ("GENSERVE_DEVICE_ID", "-1"), ("GENSERVE_GPU_MEMORY_MB", "1")):
        with pytest.raises(SettingsError, match=name):
            load_settings({name: value})


# --- training --------------------------------------------------------------------------------


def test_training_device_and_amp_choices() -> None:
    from training.registry import build_model
    from training.train import autocast, training_device

    with pytest.raises(ValueError, match="--device cuda but torch .* sees no CUDA device"):
        training_device("cuda")
    assert training_device("auto") == torch.device("cpu") == training_device("cpu")
    cfm, nsf = build_model("cfm", 2), build_model("nsf", 2)
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning):  # torch: CUDA is not available here, autocast disabled
        assert autocast("auto", cfm, cuda).fast_dtype == torch.bfloat16
    assert not isinstance(autocast("auto", nsf, cuda), torch.autocast)  # flows: float32
    assert not isinstance(autocast("auto", cfm, torch.device("cpu")), torch.autocast)
    assert autocast("bf16", nsf, torch.device("cpu")).fast_dtype == torch.bfloat16


def test_bf16_autocast_trains_and_keeps_float32_weights() -> None:
    from training.config import ModelConfig, TrainConfig
    from training.fit import fit

    ckpt = fit("cfm", "moons", rows=600, model_cfg=ModelConfig(hidden_features=16,
                                                                hidden_layers=1),
               train_cfg=TrainConfig(steps=30, batch_size=64, eval_every=15, warmup_steps=2,
                                     progress=False, amp="bf16"))
    history = ckpt.config.summary["history"] if "history" in ckpt.config.summary else None
    assert np.isfinite(ckpt.config.summary["best_val_loss"]), history
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())
    assert ckpt.config.train.amp == "bf16"


def test_train_device_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path, capsys) -> None:
    from cli import main

    code = main(["train", "--model", "nsf", "--data", "moons", "--rows", "200", "--steps",
                 "2", "--device", "cuda", "--out", str(tmp_path / "m"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--device cpu" in err
    assert not (tmp_path / "m").exists()


# --- the GPU image and the lent machine ------------------------------------------------------


def test_the_gpu_extra_takes_onnxruntime_gpu_and_not_onnxruntime() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    names = {re.split(r"[<>=!~\[]", r)[0] for r in extras["gpu"]}
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names


def test_make_gpu_check_without_a_gpu_says_so_and_exits_0(tmp_path) -> None:
    env = dict(os.environ, OUT=str(tmp_path))
    out = subprocess.run(["make", "-s", "gpu-check", f"GPU_PYTHON={sys.executable}",
                          f"GPU_WHEELS={tmp_path / 'none'}", f"GPU_SITE={tmp_path / 'site'}"],
                         cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "no CUDA device visible" in out.stdout and "nothing was measured" in out.stdout
    assert not (tmp_path / "gpu-check.json").exists()


def test_the_carried_wheels_are_what_the_gpu_path_imports_and_deploy_lists_them() -> None:
    from bench.gpu_check import CARRIED

    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--imports"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(out.stdout.split()) == sorted(CARRIED)
    deploy = (ROOT / "docs" / "DEPLOY.md").read_text()
    listed = re.search(r"<!-- carried wheels -->\n(.*?)\n<!-- end -->", deploy, re.S)
    assert listed, "docs/DEPLOY.md lists the carried wheels between its markers"
    assert sorted(re.findall(r"^- `([a-z0-9-]+)`", listed.group(1), re.M)) == sorted(CARRIED)


def test_benchmarks_gpu_section_is_the_checks_own() -> None:
    """The section is what ``bench.gpu_check`` writes from docs/bench/gpu.json, or, with no
    such file, the text saying no GPU figure exists."""
    import json

    from bench.gpu_check import RAW, section

    result = json.loads(RAW.read_text()) if RAW.exists() else None
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    block = re.search(r"<!-- BEGIN gpu -->\n(.*?)\n<!-- END gpu -->", text, re.S)
    assert block and block.group(1).strip() == section(result).strip()
    if result is None:
        assert "No GPU figure exists yet" in block.group(1) and "make gpu-check" in block.group(1)


def test_the_gpu_section_reports_each_cell_its_ratio_and_the_targets() -> None:
    """How a returned ``make gpu-check`` JSON reads (the figures here are made up): ratios
    per cell, each target met or missed, the batch the sweep picks."""
    from bench.gpu_check import pick_batch, section

    sweep = [{"model": "moons-ddpm", "rows": r, "cuda_rows_s": v}
             for r, v in ((1024, 1e5), (4096, 3.8e5), (16384, 4e5), (65536, 4.1e5))]
    ll = [{"model": m, "rows": r, "cpu_rows_s": 100.0, "cuda_rows_s": c, "ratio": c / 100.0}
          for m, r, c in (("moons-nsf", 64, 150.0), ("moons-ddpm", 4096, 2500.0))]
    result = {"card": "NVIDIA X, 80 GiB", "date": "2026-01-01", "torch": "2.11", "cuda": "13.0",
              "python": "3.12", "cpu_threads": 16, "tests": {"passed": 21}, "log_likelihood": ll,
              "batch_sweep": sweep, "batch_rows": pick_batch(sweep),
              "training": [{"model": "ddpm_image", "device": d, "batch": 64, "steps_s": v}
                           for d, v in (("cpu", 10.0), ("cuda", 150.0))]}
    assert result["batch_rows"] == 4096  # within 10 % of the best, and the smallest such
    text = section(result)
    assert "NVIDIA X" in text and "No GPU figure" not in text
    assert "| `log_likelihood` moons-ddpm, 4096 rows | rows/s | 100 | 2500 | 25 |" in text
    assert "PF-ODE `log_likelihood` at 4096 rows: CUDA 25x the CPU (target 20x): met" in text
    assert "image-diffusion training: CUDA 15x the CPU (target 20x): missed" in text


def test_graph_threads_divide_the_cpus_among_the_workers() -> None:
    """Unset, each worker's graph sessions take an equal share of the CPUs this process may
    run on (at least one thread); ``GENSERVE_THREADS`` overrides it; and the model set opens
    its sessions with that number."""
    cpus = len(os.sched_getaffinity(0))
    for workers in (1, 2, 3, 64):
        settings = load_settings({"GENSERVE_WORKERS": str(workers)})
        assert settings.graph_threads() == max(1, cpus // workers)
    assert load_settings({"GENSERVE_WORKERS": "2", "GENSERVE_THREADS": "3"}).graph_threads() == 3
    models = ModelSet.load(load_settings({"GENSERVE_WORKERS": "64",
                                          "GENSERVE_MODELS_DIR": str(ROOT / "exported_models"),
                                          "GENSERVE_RUNTIME": "onnx", "GENSERVE_DEVICE": "cpu"}))
    sessions = [g.session for rt in models.runtimes.values() for g in rt.graphs.values()]
    assert sessions and all(
        s.get_session_options().intra_op_num_threads == 1 for s in sessions)
