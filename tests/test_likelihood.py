"""numerics.likelihood: exact and Hutchinson log-densities against closed-form Gaussians."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch
from test_solvers import GAUSS

from numerics.likelihood import (
    log_likelihood_exact,
    log_likelihood_hutchinson,
    rademacher_probes,
    standard_normal_log_prob,
)
from numerics.schedules import make_schedule

TIGHT = {"method": "dopri5", "rtol": 1e-8, "atol": 1e-8}


def _data(n: int = 6, seed: int = 1) -> np.ndarray:
    return GAUSS.sample(n, np.random.default_rng(seed))


def _vp_base(schedule: object, t1: float = 1.0):  # noqa: ANN202
    """Exact log-density of the VP marginal at ``t1`` (not quite N(0, I) since alpha(1) > 0)."""

    def base(z: np.ndarray) -> np.ndarray:
        t = np.full(z.shape[0], t1)
        return GAUSS.log_prob_at(z, *GAUSS.vp_marginal(t, schedule, z))

    return base


def test_standard_normal_log_prob() -> None:
    z = np.array([[0.0, 0.0], [1.0, -2.0]])
    assert np.allclose(standard_normal_log_prob(z), [-np.log(2 * np.pi), -np.log(2 * np.pi) - 2.5])


def test_constant_velocity_gives_shifted_base_density() -> None:
    # x_t = x + t c has zero divergence: log p(x) = log N(x + c; 0, I).
    c = np.array([0.5, -1.0])
    field = lambda x, t: (np.broadcast_to(c, x.shape), np.zeros(x.shape[0]))  # noqa: E731
    x = np.array([[0.0, 0.0], [1.0, 2.0]])
    res = log_likelihood_exact(field, x, method="euler", steps=3)
    assert np.allclose(res.log_prob, standard_normal_log_prob(x + c))
    assert np.allclose(res.z, x + c) and res.std_error is None and res.nfe == 3


def test_exact_linear_path_matches_gaussian_density() -> None:
    x = _data()
    res = log_likelihood_exact(GAUSS.linear_velocity_div, x, **TIGHT)
    assert np.abs(res.log_prob - GAUSS.log_prob(x)).max() < 1e-3
    assert np.abs(res.log_prob - GAUSS.log_prob(x)).max() < 1e-5  # what tight tolerances buy


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_exact_vp_pf_ode_matches_gaussian_density(name: str) -> None:
    schedule = make_schedule(name)
    x = _data()
    res = log_likelihood_exact(
        partial(GAUSS.vp_velocity_div, schedule=schedule),
        x,
        base_log_prob=_vp_base(schedule),
        **TIGHT,
    )
    assert np.abs(res.log_prob - GAUSS.log_prob(x)).max() < 1e-3


def test_fixed_step_rk4_is_close_too() -> None:
    x = _data()
    res = log_likelihood_exact(GAUSS.linear_velocity_div, x, method="rk4", steps=50)
    assert np.abs(res.log_prob - GAUSS.log_prob(x)).max() < 1e-3
    assert res.nfe == 200


def test_numpy_and_torch_agree() -> None:
    x = _data()
    a = log_likelihood_exact(GAUSS.linear_velocity_div, x, **TIGHT)
    b = log_likelihood_exact(GAUSS.linear_velocity_div, torch.from_numpy(x), **TIGHT)
    assert isinstance(b.log_prob, torch.Tensor) and b.log_prob.shape == (len(x),)
    assert np.abs(a.log_prob - b.log_prob.numpy()).max() < 1e-10
    h_a = log_likelihood_hutchinson(GAUSS.linear_velocity_jvp, x, probes=4, seed=3)
    h_b = log_likelihood_hutchinson(
        GAUSS.linear_velocity_jvp, torch.from_numpy(x), probes=4, seed=3
    )
    assert np.abs(h_a.log_prob - h_b.log_prob.numpy()).max() < 1e-10
    assert np.abs(h_a.std_error - h_b.std_error.numpy()).max() < 1e-10


def test_hutchinson_agrees_with_exact_within_three_standard_errors() -> None:
    x = _data(8)
    exact = log_likelihood_exact(GAUSS.linear_velocity_div, x, **TIGHT).log_prob
    est = log_likelihood_hutchinson(
        GAUSS.linear_velocity_jvp, x, probes=32, seed=0, rtol=1e-7, atol=1e-7
    )
    assert est.log_prob.shape == est.std_error.shape == (8,) and est.z.shape == x.shape
    assert np.all(est.std_error > 0)
    assert np.all(np.abs(est.log_prob - exact) < 3 * est.std_error)


def test_hutchinson_on_the_vp_pf_ode() -> None:
    schedule = make_schedule("linear")
    x = _data(8)
    est = log_likelihood_hutchinson(
        partial(GAUSS.vp_velocity_jvp, schedule=schedule),
        x,
        probes=32,
        seed=0,
        base_log_prob=_vp_base(schedule),
    )
    assert np.all(np.abs(est.log_prob - GAUSS.log_prob(x)) < 3 * est.std_error + 1e-3)


def test_hutchinson_is_seeded_and_more_probes_shrink_the_error() -> None:
    x = _data(8)
    run = partial(log_likelihood_hutchinson, GAUSS.linear_velocity_jvp, x, method="rk4", steps=20)
    a, b = run(probes=8, seed=7), run(probes=8, seed=7)
    assert np.array_equal(a.log_prob, b.log_prob) and np.array_equal(a.std_error, b.std_error)
    assert not np.array_equal(a.log_prob, run(probes=8, seed=8).log_prob)
    assert run(probes=128, seed=7).std_error.mean() < 0.5 * a.std_error.mean()
    assert a.nfe == 80


def test_hutchinson_rejects_bad_probe_counts_and_flags_one_probe() -> None:
    x = _data(2)
    with pytest.raises(ValueError, match="probes"):
        log_likelihood_hutchinson(GAUSS.linear_velocity_jvp, x, probes=0)
    one = log_likelihood_hutchinson(GAUSS.linear_velocity_jvp, x, probes=1, method="rk4", steps=5)
    assert np.all(np.isnan(one.std_error))


def test_probes_depend_only_on_the_row_seed_and_index() -> None:
    seeds = np.array([5, 5, 5, 9, 9], dtype=np.uint64)
    rows = np.array([0, 1, 2, 0, 1])
    full = rademacher_probes(seeds, rows, 6, 3)
    assert full.shape == (6, 5, 3) and set(np.unique(full)) == {-1.0, 1.0}
    # the same (seed, row) gives the same probes wherever it sits and whatever is beside it
    alone = rademacher_probes(np.array([9], dtype=np.uint64), np.array([1]), 6, 3)
    assert np.array_equal(full[:, 4], alone[:, 0])
    assert np.array_equal(rademacher_probes(5, np.array([2, 0]), 6, 3)[:, 0], full[:, 2])
    # different rows and seeds differ; signs are balanced and uncorrelated across entries
    assert not np.array_equal(full[:, 0], full[:, 1])
    assert not np.array_equal(full[:, 0], full[:, 3])
    big = rademacher_probes(1, np.arange(4000), 8, 16).reshape(-1, 16)
    assert abs(big.mean()) < 0.01
    assert np.abs(np.corrcoef(big.T) - np.eye(16)).max() < 0.03


def test_a_rows_hutchinson_estimate_is_the_same_in_any_batch() -> None:
    x = _data(6)
    run = partial(log_likelihood_hutchinson, GAUSS.linear_velocity_jvp, probes=4, seed=3,
                  method="dopri5")
    whole = run(x).log_prob
    tail = run(x[4:], rows=np.array([4, 5])).log_prob
    assert np.array_equal(whole[4:], tail)
