"""The defaults of `genserve train` (training/config.py) and `--model auto` (training/auto.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cli import main
from training.auto import AUTO_CANDIDATES, best_by_validation, fit_auto
from training.checkpoint import load_checkpoint
from training.config import (
    OWN_RATE_TYPES,
    ModelConfig,
    TrainConfig,
    candidate_lr,
    default_model_config,
    default_train_config,
)
from training.evaluate import checkpoint_splits, data_log_prob
from training.fit import fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = ["--data", "gmm2", "--rows", "600", "--no-progress"]
# --model auto's budget: the candidates together stop within this many seconds past it (each
# candidate's last validation, the checkpoint's validation log-likelihood, model building).
BUDGET_SLACK_S = 3.0


@pytest.mark.parametrize("kind", ["maf", "otcfm", "edm", "resflow", "ffjord", "realnvp"])
def test_train_without_options_uses_the_model_types_defaults(tmp_path: Path, kind: str) -> None:
    assert main(["train", "--model", kind, *DATA, "--steps", "3", "--out",
                 str(tmp_path / kind)]) == 0
    cfg = load_checkpoint(tmp_path / kind).config
    assert cfg.model == default_model_config(kind, 2)
    assert cfg.train == default_train_config(kind, steps=3, progress=False)
    if kind == "realnvp":  # no tuned defaults: the class defaults
        assert cfg.model == ModelConfig()
        assert cfg.train == TrainConfig(steps=3, progress=False)
    elif kind == "ffjord":  # a tuned rate on the class network
        assert cfg.model == ModelConfig() and cfg.train.lr != TrainConfig().lr
    else:
        assert cfg.model != ModelConfig()


def test_given_fields_go_on_top_of_the_defaults(tmp_path: Path) -> None:
    assert main(["train", "--model", "otcfm", *DATA, "--steps", "3", "--hidden", "32",
                 "--lr", "0.01", "--out", str(tmp_path / "c")]) == 0
    cfg = load_checkpoint(tmp_path / "c").config
    assert cfg.model == default_model_config("otcfm", 2, hidden_features=32)
    assert cfg.train.lr == 0.01 and cfg.train.ema_decay == default_train_config("otcfm").ema_decay


def test_width_is_a_rule_of_the_dimension() -> None:
    assert default_model_config("maf", 64).hidden_features == 256
    assert default_model_config("maf", 2).hidden_features < 256
    assert default_model_config("maf", 64, hidden_features=8).hidden_features == 8


def test_auto_keeps_the_best_candidate_and_records_the_others(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "auto"
    assert main(["train", "--model", "auto", *DATA, "--steps", "40", "--out", str(out)]) == 0
    ckpt = load_checkpoint(out)
    auto = ckpt.config.summary["auto"]
    scores = {k: v["val_log_likelihood"] for k, v in auto["candidates"].items()}
    assert set(scores) == set(AUTO_CANDIDATES)
    assert len(set(scores.values())) == len(AUTO_CANDIDATES)
    assert auto["chosen"] == ckpt.config.model_type == max(scores, key=scores.__getitem__)
    # the recorded scores are the candidates' own: the saved winner scores the same again,
    # and a loser trained on its own (same data, seed and defaults) scores what was recorded
    val = checkpoint_splits(ckpt).val
    assert math.isclose(data_log_prob(ckpt, val)["log_prob"].mean(), scores[auto["chosen"]],
                        rel_tol=1e-6)
    loser = min(scores, key=scores.__getitem__)
    alone = fit(loser, "gmm2", rows=600, train_cfg=default_train_config(
        loser, steps=40, progress=False))
    assert math.isclose(data_log_prob(alone, val)["log_prob"].mean(), scores[loser],
                        rel_tol=1e-6)
    err = capsys.readouterr().err
    assert f"auto: chose {auto['chosen']}" in err
    assert all(f"auto: {k} validation log-likelihood" in err for k in AUTO_CANDIDATES)


def test_auto_honours_its_budget() -> None:
    budget = 4.0
    ckpt = fit_auto("gmm2", rows=600, budget_s=budget,
                    train_fields={"steps": 1_000_000, "progress": False})
    auto = ckpt.config.summary["auto"]
    assert auto["seconds"] <= budget + BUDGET_SLACK_S
    for entry in auto["candidates"].values():
        assert 1 <= entry["steps"] < 1_000_000  # stopped by the clock, not by the steps


def test_best_by_validation_skips_non_finite_and_refuses_all_non_finite() -> None:
    assert best_by_validation({"a": -3.0, "b": math.nan, "c": -2.0}) == "c"
    with pytest.raises(FloatingPointError, match="non-finite"):
        best_by_validation({"a": math.nan, "b": -math.inf})


def test_budget_without_auto_is_one_line_exit_2(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--model", "maf", *DATA, "--budget-s", "5", "--out",
                 str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budget-s" in err[0] and "auto" in err[0]



def test_fit_anomaly_auto_trains_the_auto_candidates_and_chooses_alike(tmp_path: Path) -> None:
    import numpy as np

    from training.anomaly import fit_anomaly

    x = np.random.default_rng(0).normal(size=(400, 3)) * [1.0, 2.0, 0.5]
    s = fit_anomaly(x, tmp_path / "a", model="auto", steps=5, progress=False,
                    smoothing_search=())
    tried = {c["model_type"]: -c["val_nll"] for c in s["candidates"]}
    assert tuple(tried) == AUTO_CANDIDATES
    assert s["model_type"] == best_by_validation(tried)
    # one rate for every candidate, except the types that stall at it
    rates = {c["model_type"]: c["lr"] for c in s["candidates"]}
    assert rates["resflow"] == default_train_config("resflow").lr > rates["maf"]
    assert {rates[k] for k in AUTO_CANDIDATES if k not in OWN_RATE_TYPES} == {rates["maf"]}


def test_a_type_that_stalls_at_the_shared_rate_trains_at_its_own() -> None:
    for kind in OWN_RATE_TYPES:
        assert candidate_lr(kind, 1e-3) == default_train_config(kind).lr != 1e-3
    assert candidate_lr("maf", 2e-3) == 2e-3


def test_ema_warms_up_so_the_first_weights_fade() -> None:
    """At decay 0.999, 200 updates would leave the initial weights 82 % of a plain EMA; the
    warmed-up decay ``min(d, (1 + n) / (10 + n))`` leaves them next to nothing."""
    import torch

    from training.train import _EMA

    model = torch.nn.Linear(3, 3)
    torch.nn.init.zeros_(model.weight)
    ema = _EMA(model, 0.999)
    torch.nn.init.ones_(model.weight)
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.shadow.weight, torch.ones(3, 3), atol=1e-3)
