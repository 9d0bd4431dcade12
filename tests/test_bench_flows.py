"""The zoo benchmark's choice among tuning candidates (bench/flows.py): by validation only,
and a partial --tune never replaces a better earlier row."""

from __future__ import annotations

from bench.flows import BARE_TUNE, PLANS, TUNE, kept_if_better, pick_tuned, tuning_jobs


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
