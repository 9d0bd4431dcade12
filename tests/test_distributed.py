"""Data-parallel training: 2 gloo processes reach what 1 process reaches on the same batch.

The two ranks are started exactly as torchrun starts them (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment) but without the
launcher process, which on a loaded machine costs an extra torch import. As under torchrun,
the rendezvous store is the launcher's (here the test process's) and the ranks connect to it
(``TORCHELASTIC_USE_AGENT_STORE``): it binds port 0 itself, so no port is picked free and
then lost to another process before rank 0 binds it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.distributed import TCPStore

from training.config import ModelConfig, TrainConfig
from training.distributed import DistContext, setup, torchrun_command
from training.train import train_model

ROOT = Path(__file__).resolve().parents[1]

# A small RealNVP on two moons: its loss has no noise of its own (the flow's NLL of the batch),
# so 2 ranks x 128 rows and 1 process x 256 rows see the very same rows every step and the
# same mean gradient. What differs is only the floating-point order of the sums (the mean of
# two half-batch means, all-reduced, against one mean of 256): ~1e-7 relative per step, which
# 100 Adam steps leave far below TOLERANCE (measured: 0 to 5e-4 nats for realnvp/nsf/glow).
# Families whose loss draws noise (diffusion times, flow-matching pairs) draw it per rank and
# agree only in expectation (measured on the same run: cfm 4e-3, ddpm 7e-4 nats); not tested
# here to keep the suite fast.
MODEL_TYPE = "realnvp"
MODEL = {"hidden_features": 16, "hidden_layers": 1, "transforms": 4}
TRAIN = {"steps": 100, "batch_size": 256, "eval_every": 25, "warmup_steps": 10, "lr": 5e-3,
         "progress": False}
ROWS = 2000
TOLERANCE = 5e-3  # nats per sample, absolute, on every validation loss of the run

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from training.checkpoint import DataSummary
    from training.config import ModelConfig, TrainConfig
    from training.data import load_data, split
    from training.distributed import is_main_process, setup
    from training.fit import fit_arrays

    out, model_type, model, train, rows = sys.argv[1:6]
    ctx = setup()
    data = load_data("moons", n=int(rows), seed=0)
    parts = split(data.x, seed=0)
    summary = DataSummary(name="moons", source="moons", rows=len(data.x), dim=2, levels=None,
                          data_seed=0, split_seed=0, mean=[0.0, 0.0], std=[1.0, 1.0])
    ckpt = fit_arrays(model_type, parts.train, parts.val, data=summary,
                      model_cfg=ModelConfig(**json.loads(model)),
                      train_cfg=TrainConfig(**json.loads(train)))
    flat = torch.cat([p.detach().flatten() for p in ckpt.model.parameters()])
    report = {"rank": ctx.rank, "world_size": ctx.world_size, "backend": ctx.backend,
              "main": is_main_process(), "summary": ckpt.config.summary,
              "params": flat.tolist()}
    with open(f"{out}.{ctx.rank}.json", "w") as fh:
        json.dump(report, fh)
    """
)


def _one_process_reference() -> dict:
    from training.data import load_data, split
    from training.fit import default_preprocess
    from training.preprocess import Preprocessor
    from training.registry import build_model

    data = load_data("moons", n=ROWS, seed=0)
    parts = split(data.x, seed=0)
    cfg = TrainConfig(**TRAIN)
    torch.manual_seed(cfg.seed)
    model = build_model(MODEL_TYPE, 2, ModelConfig(**MODEL))
    pre = Preprocessor.fit(default_preprocess(None), parts.train, None)
    result = train_model(model, pre, parts.train, parts.val, cfg, dist_ctx=DistContext())
    return {"best_val_loss": result.best_val_loss, "history": result.history}


def test_ddp_two_gloo_processes_match_one_process_on_the_same_global_batch(
    tmp_path: Path,
) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "rank"
    store = TCPStore("127.0.0.1", 0, world_size=2, is_master=True, wait_for_workers=False)
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port),
                   TORCHELASTIC_USE_AGENT_STORE="True",
                   CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(out), MODEL_TYPE, json.dumps(MODEL),
             json.dumps(TRAIN), str(ROWS)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        reference = _one_process_reference()  # meanwhile, in this process
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]

    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert [r["main"] for r in ranks] == [True, False]
    # DDP keeps the replicas identical: both ranks end with the same (best) weights
    assert ranks[0]["params"] == ranks[1]["params"]
    assert ranks[0]["summary"]["history"] == ranks[1]["summary"]["history"]

    ddp = ranks[0]["summary"]
    # it trained: the loss fell well below its first evaluation
    assert ddp["best_val_loss"] < ddp["history"][0]["val_loss"] - 0.05
    steps = [h["step"] for h in reference["history"]]
    assert [h["step"] for h in ddp["history"]] == steps
    for one, two in zip(reference["history"], ddp["history"], strict=True):
        assert abs(one["val_loss"] - two["val_loss"]) <= TOLERANCE, (one, two)
        # the logged training loss is the global batch's (all-reduced mean of both halves)
        assert abs(one["loss"] - two["loss"]) <= TOLERANCE, (one, two)
    assert abs(reference["best_val_loss"] - ddp["best_val_loss"]) <= TOLERANCE


def test_one_process_without_torchrun_environment_is_not_distributed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    ctx = setup()
    assert ctx == DistContext() and not ctx.enabled and ctx.is_main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        setup()


def test_global_batch_must_split_evenly_across_ranks() -> None:
    import numpy as np

    from training.registry import build_model

    ctx = DistContext(rank=0, world_size=3)
    model = build_model("realnvp", 2, ModelConfig(**MODEL))
    x = np.zeros((10, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="not divisible by the 3 training processes"):
        train_model(model, torch.nn.Identity(), x, x, TrainConfig(batch_size=256, steps=1),
                    dist_ctx=ctx)


def test_torchrun_commands_parse_with_torchruns_own_parser() -> None:
    from torch.distributed.run import get_args_parser

    args = ["train", "--model", "nsf", "--data", "moons", "--out", "/ckpt/nsf"]
    one = torchrun_command(args, 4)
    assert one[1:3] == ["-m", "torch.distributed.run"]
    parsed = get_args_parser().parse_args(one[3:])
    assert parsed.standalone and parsed.nproc_per_node == "4" and parsed.module
    assert parsed.training_script == "cli" and parsed.training_script_args == args
    many = torchrun_command(args, 2, nnodes=3, node_rank=1, master_addr="trainer-0.trainer",
                            master_port=29500)
    parsed = get_args_parser().parse_args(many[3:])
    assert (parsed.nnodes, parsed.node_rank, parsed.master_addr) == ("3", 1, "trainer-0.trainer")
    with pytest.raises(ValueError, match="master_addr"):
        torchrun_command(args, 2, nnodes=2)


def test_distributed_option_is_stripped_before_relaunching() -> None:
    from training.distributed import strip_option

    argv = ["train", "--model", "nsf", "--distributed", "4", "--out", "x", "--distributed=2"]
    assert strip_option(argv, "--distributed") == ["train", "--model", "nsf", "--out", "x"]
