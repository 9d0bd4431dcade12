"""Shared fixtures: tiny trained checkpoints and exported artifacts, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

# One tiny configuration per model type: small enough that the whole zoo trains and exports
# in a few minutes on 2 cores, big enough that parity and calibration are meaningful.
TINY_MODEL = {"hidden_features": 16, "hidden_layers": 1, "transforms": 2, "bins": 4,
              "time_embedding": 4}
TINY_STEPS = 60


def tiny_checkpoint(model_type: str, out: Path, data: str = "moons", steps: int = TINY_STEPS):
    from training.config import ModelConfig, TrainConfig
    from training.fit import fit

    return fit(
        model_type,
        data,
        out=out,
        rows=1000,
        model_cfg=ModelConfig(**TINY_MODEL),
        train_cfg=TrainConfig(steps=steps, batch_size=128, eval_every=steps, progress=False,
                              warmup_steps=5),
    )


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="session")
def checkpoint_factory(zoo_dir: Path):
    """``factory(model_type) -> checkpoint path``, trained once per type per session."""
    cache: dict[str, Path] = {}

    def factory(model_type: str) -> Path:
        if model_type not in cache:
            path = zoo_dir / "ckpt" / model_type
            tiny_checkpoint(model_type, path)
            cache[model_type] = path
        return cache[model_type]

    return factory


@pytest.fixture(scope="session")
def artifact_factory(zoo_dir: Path, checkpoint_factory):
    """``factory(model_type) -> artifact dir`` exported to ONNX and TorchScript, once."""
    cache: dict[str, Path] = {}

    def factory(model_type: str) -> Path:
        if model_type not in cache:
            from training.checkpoint import load_checkpoint
            from training.export import export_checkpoint

            out = zoo_dir / "models" / f"moons-{model_type}"
            export_checkpoint(load_checkpoint(checkpoint_factory(model_type)), out,
                              formats=("onnx", "torchscript"))
            cache[model_type] = out
        return cache[model_type]

    return factory


# --- a real `bentoml serve` subprocess on a free loopback port ---------------------------------

import json  # noqa: E402

from service.devserver import Server, free_port, running_server  # noqa: E402,F401


@pytest.fixture(scope="session")
def served_models(zoo_dir: Path, artifact_factory) -> Path:
    """A models directory: a flow, a diffusion and a flow-matching model, and a tampered one."""
    import shutil

    root = zoo_dir / "served"
    if not root.exists():
        root.mkdir()
        for kind in ("nsf", "ddpm", "cfm"):
            shutil.copytree(artifact_factory(kind), root / f"moons-{kind}")
        broken = root / "broken"
        shutil.copytree(artifact_factory("nice"), broken)
        manifest = json.loads((broken / "manifest.json").read_text())
        manifest["name"] = "broken"
        (broken / "manifest.json").write_text(json.dumps(manifest))
        (broken / "log_prob.onnx").write_bytes(b"not a graph")
    return root


@pytest.fixture(scope="session")
def server(served_models: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(served_models, log, env={"GENSERVE_MAX_ROWS": "500",
                                                 "GENSERVE_MAX_SAMPLES": "2000",
                                                 "GENSERVE_MAX_STEPS": "200",
                                                 "GENSERVE_MAX_LATENCY_MS": "30000"}) as s:
        yield s
