"""The GPU path on a CUDA device: every model type's TorchScript graphs give the CPU's answers,
a torch-runtime PF-ODE likelihood keeps its state on the device and matches the CPU, and
training runs on CUDA (AMP where ``--amp auto`` picks it). nccl data parallel needs two GPUs
(nccl refuses two ranks on one device), which no lent machine has: not tested here.

Every test here is marked ``gpu``: without a CUDA device they skip (tests/conftest.py says
why), and ``make gpu-check`` runs them on a lent GPU machine, with pytest's plugins off and
only the wheels docs/DEPLOY.md lists. Models are trained for a handful of steps: parity and
placement do not depend on quality.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.runtimes import example_inputs
from service.runtime import open_runtime
from training.config import ModelConfig, TrainConfig
from training.export import export_checkpoint
from training.fit import fit
from training.registry import MODEL_TYPES

pytestmark = pytest.mark.gpu

TINY = {"hidden_features": 8, "hidden_layers": 1, "transforms": 2, "bins": 4,
        "time_embedding": 4}
STEPS = 3
# float32 on both sides (TF32 off for the CUDA graphs): kernels differ only in summation order
RTOL = 1e-4


def _close(cuda: np.ndarray, cpu: np.ndarray) -> float:
    """The largest difference, relative to the CPU's scale (1 at least)."""
    return float(np.abs(cuda - cpu).max() / max(1.0, float(np.abs(cpu).max())))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """``factory(kind) -> (artifact dir, data rows)``: trained briefly, TorchScript only."""
    root = tmp_path_factory.mktemp("gpu")
    cache: dict[str, tuple[Path, np.ndarray]] = {}

    def factory(kind: str) -> tuple[Path, np.ndarray]:
        if kind not in cache:
            data = "digits_image" if MODEL_TYPES[kind].image else "moons"
            ckpt = fit(kind, data, rows=None if data != "moons" else 1000,
                       model_cfg=ModelConfig(**TINY),
                       train_cfg=TrainConfig(steps=STEPS, batch_size=64, eval_every=STEPS,
                                             warmup_steps=1, progress=False))
            out = root / kind
            export_checkpoint(ckpt, out, formats=("torchscript",), calibration=False)
            cache[kind] = (out, ckpt.calibration_rows[:24])
        return cache[kind]

    return factory


@pytest.mark.parametrize("kind", sorted(MODEL_TYPES))
def test_every_torchscript_graph_on_cuda_gives_the_cpu_answer(kind: str, exported) -> None:
    folder, rows = exported(kind)
    cpu = open_runtime(folder, runtime="torchscript", device="cpu")
    cuda = open_runtime(folder, runtime="torchscript", device="cuda")
    assert set(cuda.devices().values()) == {"cuda:0"}
    assert set(cpu.devices().values()) == {"cpu"}
    for graph, files in cpu.manifest.graphs.items():
        specs = files["torchscript"].inputs
        inputs = [rows.astype(np.float32)] if graph == "preprocess" else \
            example_inputs(specs, len(rows), seed=1)
        for a, b in zip(cuda.call(graph, *inputs), cpu.call(graph, *inputs), strict=True):
            assert isinstance(a, np.ndarray)  # numpy in, numpy out, on either device
            assert _close(a, b) < RTOL, (kind, graph, _close(a, b))
    options = {} if MODEL_TYPES[kind].family == "flow" else {"steps": 6, "solver": "rk4"}
    on_cuda, on_cpu = (rt.log_likelihood(rows, **options) for rt in (cuda, cpu))
    assert np.isfinite(on_cpu.log_prob).all()
    assert _close(on_cuda.log_prob, on_cpu.log_prob) < 10 * RTOL, kind


def test_pf_ode_likelihood_keeps_its_state_on_the_device(exported) -> None:
    """dopri5 over the exact divergence: every graph call gets and returns CUDA tensors (no
    host round trip per step), and the answer is the CPU's."""
    folder, _ = exported("ddpm")
    cpu = open_runtime(folder, runtime="torchscript", device="cpu")
    cuda = open_runtime(folder, runtime="torchscript", device="cuda")
    seen: list[str] = []
    graph = cuda.graphs["velocity_div"]

    class Recorded:  # the real graph, its arguments' devices noted
        spec, where, stage = graph.spec, graph.where, graph.stage

        def __call__(self, *inputs: torch.Tensor):
            seen.extend(str(getattr(a, "device", "host")) for a in inputs)
            out = graph(*inputs)
            seen.extend(str(getattr(o, "device", "host")) for o in out)
            return out

    cuda.graphs["velocity_div"] = Recorded()
    x = np.random.default_rng(0).normal(size=(256, 2)) * 0.8
    on_cuda, on_cpu = cuda.log_likelihood(x), cpu.log_likelihood(x)
    assert seen and set(seen) == {"cuda:0"}
    assert isinstance(on_cuda.log_prob, np.ndarray)
    assert on_cuda.nfe == on_cpu.nfe  # the same adaptive step sequence
    assert _close(on_cuda.log_prob, on_cpu.log_prob) < 1e-3


def test_a_cuda_placement_with_a_memory_cap_serves(exported) -> None:
    from service.runtime.graphs import Placement

    folder, rows = exported("nsf")
    rt = open_runtime(folder, runtime="torchscript",
                      device=Placement(device="cuda", device_id=0, memory_mb=512))
    assert set(rt.devices().values()) == {"cuda:0"}
    assert np.isfinite(rt.log_likelihood(rows).log_prob).all()


@pytest.mark.parametrize(("kind", "amp"), [("cfm_image", torch.bfloat16), ("ddpm", torch.bfloat16),
                                           ("nsf", None)])
def test_training_steps_run_on_cuda_with_amp_where_it_helps(kind: str, amp, tmp_path) -> None:
    from training.train import autocast

    spec = MODEL_TYPES[kind]
    data = "digits_image" if spec.image else "moons"
    ckpt = fit(kind, data, rows=None if spec.image else 1000, out=tmp_path / kind,
               model_cfg=ModelConfig(**TINY),
               train_cfg=TrainConfig(steps=20, batch_size=64, eval_every=10, warmup_steps=2,
                                     progress=False, device="cuda"))
    assert np.isfinite(ckpt.config.summary["best_val_loss"])
    params = list(ckpt.model.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    ctx = autocast("auto", ckpt.model, torch.device("cuda"))
    assert getattr(ctx, "fast_dtype", None) == amp, kind

