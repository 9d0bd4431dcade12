"""The zoo benchmark's choice among tuning candidates (bench/flows.py): by validation only,
and a partial --tune never replaces a better earlier row."""

from __future__ import annotations

from bench.flows import (
    BARE_TUNE,
    PLANS,
    TUNE,
    configs,
    kept_if_better,
    pick_tuned,
    plan_for,
    subset_targets,
    tuning_jobs,
)


def _row(kind: str, name: str, val: float, test: float, **extra: object) -> dict:
    return {"kind": kind, "set": name, "val": {"log_likelihood": val},
            "test": {"log_likelihood": test}, "steps_run": 1, "best_step": 1, "train": {},
            "model": {}} | extra


def test_tune_positions_pick_those_candidates_only() -> None:
    every = tuning_jobs(["resflow"], ["checkerboard"], PLANS, served=False,
                        picks=list(range(len(TUNE["resflow"]))))
    some = tuning_jobs(["resflow"], ["checkerboard"], PLANS, served=False, picks=[3, 4])
    assert len(every) == len(TUNE["resflow"]) and len(some) == 2
    assert [j[5] for j in some] == [j[5] for j in every[3:5]]
    assert {j[2].arch.transforms for j in some} == {32}


def test_a_bare_tune_leaves_the_deep_candidates_to_positions() -> None:
    """The commands recorded before the deep candidates existed still mean the same runs."""
    bare = tuning_jobs(["resflow"], ["gmm2", "wine"], PLANS, served=False)
    assert len(bare) == 2 * BARE_TUNE["resflow"] < 2 * len(TUNE["resflow"])
    assert {j[2].arch.transforms for j in bare} == {PLANS["gmm2"].arch.transforms}


def test_the_best_by_validation_is_kept_whatever_the_test_says() -> None:
    runs = [_row("resflow", "gmm2", -3.0, -2.0, overrides={"lr": 1}),
            _row("resflow", "gmm2", -2.5, -2.9, overrides={"lr": 2})]
    best, records = pick_tuned(runs)
    assert [r["val"]["log_likelihood"] for r in best] == [-2.5] and len(records) == 2


def test_a_partial_tune_keeps_an_earlier_row_with_a_better_validation() -> None:
    old = {"results": [_row("resflow", "gmm2", -2.0, -2.1), _row("resflow", "gmm6", -9.0, -9.0)]}
    new = [_row("resflow", "gmm2", -2.2, -1.0), _row("resflow", "gmm6", -8.0, -8.0)]
    tuning = [{"kind": "resflow", "set": s} for s in ("gmm2", "gmm6")]
    kept = kept_if_better(new, tuning, old)
    assert [r["val"]["log_likelihood"] for r in kept] == [-2.0, -8.0]


def test_family_lines_need_no_dim_and_name_where_each_target_is() -> None:
    """Slim rows of earlier subset runs carry no "dim"; TarFlow and FFJORD without OT-CFM
    beside them get their distance to NSF and a pointer to their own targets."""
    def slim(kind: str, ll: float) -> dict:
        return {"set": "gmm2", "kind": kind, "seconds_per_1000_steps": 1.0,
                "test": {"log_likelihood": ll}}

    lines = subset_targets([slim("nsf", -3.0), slim("tarflow", -3.2), slim("ffjord", -2.9),
                            slim("resflow", -3.01)])
    assert lines[0].endswith("**met**") and "residual flow 0.010 nats below" in lines[0]
    assert "TarFlow 0.200 nats below NSF" in lines[1] and "digits_image" in lines[1]
    assert "FFJORD 0.100 nats above NSF" in lines[2] and "OT-CFM" in lines[2]
    with_otcfm = subset_targets([slim("nsf", -3.0), slim("ffjord", -2.9), slim("otcfm", -3.1)])
    assert len(with_otcfm) == 1 and "vs OT-CFM's PF-ODE" in with_otcfm[0]


def test_the_zoo_trains_ffjord_at_its_defaults() -> None:
    """FFJORD's zoo rows are what `genserve train --model ffjord` gives (network and rate),
    at the zoo's steps and batch."""
    from training.config import ModelConfig, default_model_config, default_train_config

    for name in ("gmm2", "8gaussians", "checkerboard", "2spirals"):
        model_cfg, train_cfg, _ = configs(plan_for(PLANS[name], "ffjord"), "ffjord")
        default = default_model_config("ffjord", 2)
        assert (model_cfg.hidden_features, model_cfg.hidden_layers) == \
            (default.hidden_features, default.hidden_layers) == \
            (ModelConfig().hidden_features, ModelConfig().hidden_layers)
        assert train_cfg.lr == default_train_config("ffjord").lr != PLANS[name].lr
        assert (train_cfg.steps, train_cfg.batch_size) == (3000, 256)
