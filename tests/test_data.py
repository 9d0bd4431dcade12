"""Executable spec of training/data.py: named sets, exact densities, files, errors, splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from artifact.tables import iter_table
from training.data import (
    DATASETS,
    DataError,
    Dataset,
    check_dim,
    check_levels,
    load_data,
    save_data,
    split,
    split_indices,
    true_log_density,
)
from training.toys import gaussian_mixture

GENERATED = [name for name, spec in DATASETS.items() if spec.generated]
TWO_D_EXACT = ["gmm2", "8gaussians", "3clusters", "checkerboard"]
MIXTURES = ["gmm2", "gmm6", "gmm16", "8gaussians", "3clusters"]


# ----------------------------------------------------------------------------- named sets


@pytest.mark.parametrize("name", list(DATASETS))
def test_named_set_shape_finite_deterministic(name: str) -> None:
    spec = DATASETS[name]
    n = 500 if spec.generated else None
    a, b = load_data(name, n=n, seed=3), load_data(name, n=n, seed=3)
    assert isinstance(a, Dataset) and a.source == "named" and a.name == name
    assert a.x.shape == (n or spec.default_size, spec.dim) and a.dim == spec.dim
    assert a.x.dtype == np.float64 and np.isfinite(a.x).all()
    np.testing.assert_array_equal(a.x, b.x)
    assert a.levels == spec.levels
    if a.y is not None:
        assert a.y.shape == (len(a.x),)


@pytest.mark.parametrize("name", GENERATED)
def test_generated_sets_differ_across_seeds(name: str) -> None:
    assert not np.array_equal(load_data(name, 200, seed=0).x, load_data(name, 200, seed=1).x)


def test_default_size_used_when_n_is_none() -> None:
    assert load_data("moons").x.shape == (DATASETS["moons"].default_size, 2)


def test_digits_are_integers_with_17_levels() -> None:
    data = load_data("digits")
    assert data.x.shape == (1797, 64) and data.levels == 17
    assert np.array_equal(data.x, np.round(data.x))
    assert data.x.min() == 0 and data.x.max() == 16


def test_bundled_subsample_is_seeded_and_bounded() -> None:
    a, b = load_data("wine", n=50, seed=1), load_data("wine", n=50, seed=2)
    assert a.x.shape == (50, 13) and not np.array_equal(a.x, b.x)
    assert load_data("wine", n=np.int64(5)).x.shape == (5, 13)
    with pytest.raises(DataError, match="'wine' has 178 rows"):
        load_data("wine", n=1000)


@pytest.mark.parametrize("bad_n", [0, -3, 2.5])
def test_bad_n_is_rejected(bad_n: object) -> None:
    with pytest.raises(DataError, match="positive integer"):
        load_data("moons", n=bad_n)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- exact densities


@pytest.mark.parametrize("name", TWO_D_EXACT)
def test_2d_true_density_integrates_to_one(name: str) -> None:
    h, lim = 0.05, 9.0  # squares' edges fall on grid-cell edges; Gaussians are 5+ std inside
    axis = np.arange(-lim + h / 2, lim, h)
    grid = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    log_p = true_log_density(name)
    assert log_p is not None
    assert np.exp(log_p(grid)).sum() * h * h == pytest.approx(1.0, rel=0.01)


def test_checkerboard_density_value_and_support() -> None:
    log_p = true_log_density("checkerboard")
    assert log_p is not None
    x = load_data("checkerboard", 2000).x
    np.testing.assert_allclose(log_p(x), -np.log(32.0))
    assert np.isneginf(log_p(np.array([[-3.0, -1.0], [5.0, 5.0]]))).all()


@pytest.mark.parametrize("name", ["moons", "circles", "pinwheel", "2spirals", "swissroll"])
def test_no_closed_form_gives_none(name: str) -> None:
    assert true_log_density(name) is None


def test_true_density_unknown_name() -> None:
    with pytest.raises(DataError, match="moons"):
        true_log_density("nope")


@pytest.mark.parametrize("name", MIXTURES)
def test_mixture_density_matches_scipy(name: str) -> None:
    mix = gaussian_mixture(name)
    x = load_data(name, 300, seed=5).x
    x = np.concatenate([x, x + 2.0])  # also off the bulk
    expected = np.log(
        sum(
            w * multivariate_normal(m, c).pdf(x)
            for w, m, c in zip(mix.weights, mix.means, mix.covariances, strict=True)
        )
    )
    log_p = true_log_density(name)
    assert log_p is not None
    np.testing.assert_allclose(log_p(x), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["gmm6", "gmm16"])
def test_high_dim_mixture_normalizes_by_importance_sampling(name: str) -> None:
    """Monte Carlo: E_q[p/q] = 1, q = the mixture with covariances inflated 1.3x (via scipy)."""
    mix = gaussian_mixture(name)
    rng = np.random.default_rng(0)
    comps = [
        multivariate_normal(m, 1.3 * c) for m, c in zip(mix.means, mix.covariances, strict=True)
    ]
    counts = rng.multinomial(50_000, mix.weights)
    z = np.concatenate([c.rvs(k, random_state=rng) for c, k in zip(comps, counts, strict=True)])
    log_q = np.log(sum(w * c.pdf(z) for w, c in zip(mix.weights, comps, strict=True)))
    log_p = true_log_density(name)
    assert log_p is not None
    assert np.exp(log_p(z) - log_q).mean() == pytest.approx(
        1.0, rel=0.01
    )  # about 3 standard errors


@pytest.mark.parametrize("name", MIXTURES)
def test_mixture_sampler_matches_its_moments(name: str) -> None:
    mix = gaussian_mixture(name)
    x = load_data(name, 40_000, seed=0).x
    mean = mix.weights @ mix.means
    scale = np.sqrt(np.einsum("kii->ki", mix.covariances).max())
    np.testing.assert_allclose(x.mean(0), mean, atol=0.05 * (1 + scale + np.abs(mean).max()))


def test_gaussian_mixture_rejects_other_sets() -> None:
    with pytest.raises(DataError, match="gmm2"):
        gaussian_mixture("moons")


# ----------------------------------------------------------------------------- file round trips


@pytest.fixture
def table() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(7, 3))


def test_npy_round_trip(tmp_path: Path, table: np.ndarray) -> None:
    np.save(tmp_path / "a.npy", table)
    data = load_data(str(tmp_path / "a.npy"))
    np.testing.assert_array_equal(data.x, table)
    assert data.levels is None and data.source == str(tmp_path / "a.npy") and data.name == "a"


def test_npy_1d_is_one_column(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.arange(5))
    assert load_data(tmp_path / "v.npy").x.shape == (5, 1)


def test_npz_round_trip_with_labels(tmp_path: Path, table: np.ndarray) -> None:
    np.savez(tmp_path / "a.npz", X=table, y=np.arange(7))
    data = load_data(str(tmp_path / "a.npz"))
    np.testing.assert_array_equal(data.x, table)
    np.testing.assert_array_equal(data.y, np.arange(7))


@pytest.mark.parametrize("delimiter", [",", ";", "\t"])
@pytest.mark.parametrize("header", [True, False])
def test_csv_round_trip(tmp_path: Path, table: np.ndarray, header: bool, delimiter: str) -> None:
    path = tmp_path / "a.csv"
    np.savetxt(path, table, fmt="%.17g", delimiter=delimiter,
               header=delimiter.join("abc") if header else "", comments="")
    if not header:
        path.write_text(path.read_text().lstrip("\n"))
    np.testing.assert_array_equal(load_data(str(path)).x, table)
    # streamed in blocks of 2 rows (as `genserve score` reads), the same table
    blocks = list(iter_table(path, 2, dim=3))
    assert [len(b) for b in blocks] == [2, 2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(blocks), table)


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_save_data_round_trip_is_atomic(tmp_path: Path, table: np.ndarray, suffix: str) -> None:
    path = save_data(table, tmp_path / "sub" / f"out{suffix}")
    np.testing.assert_array_equal(load_data(str(path)).x, table)
    assert [p.name for p in path.parent.iterdir()] == [f"out{suffix}"]  # no temp files left
    if suffix == ".csv":
        assert path.read_text().splitlines()[0] == "x0,x1,x2"


def test_save_data_rejects_other_suffix(tmp_path: Path, table: np.ndarray) -> None:
    with pytest.raises(DataError, match=r"\.npy or \.csv"):
        save_data(table, tmp_path / "out.txt")


def test_file_subsample_and_levels(tmp_path: Path) -> None:
    np.save(tmp_path / "ints.npy", np.arange(20).reshape(10, 2) % 5)
    data = load_data(str(tmp_path / "ints.npy"), n=4, seed=0, levels=5)
    assert data.x.shape == (4, 2) and data.levels == 5
    assert load_data(str(tmp_path / "ints.npy")).levels is None  # never automatic for files


# ----------------------------------------------------------------------------- bad input


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(DataError) as err:
        load_data("moonz")
    assert "moonz" in str(err.value) and "checkerboard" in str(err.value)
    assert ".npy" in str(err.value) and ".csv" in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as err:
        load_data(str(tmp_path / "gone.csv"))
    assert "gone.csv" in str(err.value)


def test_nan_in_npy_names_row_and_column(tmp_path: Path, table: np.ndarray) -> None:
    table[4, 1] = np.nan
    np.save(tmp_path / "bad.npy", table)
    with pytest.raises(DataError) as err:
        load_data(str(tmp_path / "bad.npy"))
    assert all(s in str(err.value) for s in ("bad.npy", "row 5", "column 2", "nan"))


def test_inf_in_csv_counts_the_header_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.csv", "a,b\n1,2\n\n3,inf\n")
    with pytest.raises(DataError) as err:
        load_data(path)
    assert all(s in str(err.value) for s in ("bad.csv", "row 4", "column 2", "inf"))


def test_non_numeric_cell(tmp_path: Path) -> None:
    path = _write(tmp_path / "text.csv", "a,b\n1,2\n3,oops\n")
    with pytest.raises(DataError) as err:
        load_data(path)
    assert all(s in str(err.value) for s in ("text.csv", "row 3", "column 2", "'b'", "'oops'"))


@pytest.mark.parametrize("text", ["1,2\n,4\n", "1,2\n ,\n"])
def test_empty_cell(tmp_path: Path, text: str) -> None:
    with pytest.raises(DataError, match=r"gap\.csv: row 2, column 1 holds '\s*'"):
        load_data(_write(tmp_path / "gap.csv", text))


def test_ragged_csv(tmp_path: Path) -> None:
    path = _write(tmp_path / "ragged.csv", "1,2,3\n4,5,6\n7,8\n")
    with pytest.raises(DataError) as err:
        load_data(path)
    assert all(s in str(err.value) for s in ("ragged.csv", "row 3", "2 columns", "expected 3"))


@pytest.mark.parametrize("text", ["", "a,b\n", "\n\n"])
def test_csv_without_rows(tmp_path: Path, text: str) -> None:
    with pytest.raises(DataError, match="no data rows") as err:
        load_data(_write(tmp_path / "empty.csv", text))
    assert "empty.csv" in str(err.value)


def test_npy_without_rows(tmp_path: Path) -> None:
    np.save(tmp_path / "none.npy", np.zeros((0, 2)))
    with pytest.raises(DataError, match=r"none\.npy.*at least one row"):
        load_data(str(tmp_path / "none.npy"))


def test_wrong_ndim(tmp_path: Path) -> None:
    np.save(tmp_path / "cube.npy", np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match=r"cube\.npy.*shape \(2, 3, 4\).*2D"):
        load_data(str(tmp_path / "cube.npy"))


def test_non_numeric_npy(tmp_path: Path) -> None:
    np.save(tmp_path / "words.npy", np.array([["a", "b"]]))
    with pytest.raises(DataError, match=r"words\.npy.*dtype"):
        load_data(str(tmp_path / "words.npy"))


def test_npz_without_x_lists_keys(tmp_path: Path, table: np.ndarray) -> None:
    np.savez(tmp_path / "keys.npz", data=table, labels=np.arange(7))
    with pytest.raises(DataError) as err:
        load_data(str(tmp_path / "keys.npz"))
    assert all(s in str(err.value) for s in ("keys.npz", "'X'", "data", "labels"))


def test_npz_with_mismatched_y(tmp_path: Path, table: np.ndarray) -> None:
    np.savez(tmp_path / "y.npz", X=table, y=np.arange(3))
    with pytest.raises(DataError, match=r"y\.npz.*'y'"):
        load_data(str(tmp_path / "y.npz"))


def test_levels_mismatch(tmp_path: Path, table: np.ndarray) -> None:
    np.save(tmp_path / "real.npy", table)
    with pytest.raises(DataError, match=r"real\.npy: row 1, column 1.*0\.\.4"):
        load_data(str(tmp_path / "real.npy"), levels=5)
    with pytest.raises(DataError, match="0..15"):
        check_levels(load_data("digits").x, 16, "digits")


def test_check_dim_message() -> None:
    with pytest.raises(DataError, match="data.csv has 3 columns but the model expects 2"):
        check_dim(np.zeros((4, 3)), 2, "data.csv")
    with pytest.raises(DataError, match="model 'moons-nsf' expects 2"):
        check_dim(load_data("gmm6", 10), 2, "gmm6", model="moons-nsf")
    check_dim(load_data("moons", 10), 2, "moons")


# ----------------------------------------------------------------------------- splits


@pytest.mark.parametrize("rows", [3, 4, 10, 1001])
def test_split_deterministic_disjoint_covering(rows: int) -> None:
    x = np.arange(rows, dtype=float)[:, None]
    a, b = split(x, seed=7), split(x, seed=7)
    for part_a, part_b in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True):
        np.testing.assert_array_equal(part_a, part_b)
        assert len(part_a) >= 1
    together = np.concatenate([a.train, a.val, a.test]).ravel()
    assert sorted(together) == list(range(rows))


def test_split_sizes_and_seed_dependence() -> None:
    x = np.arange(1000, dtype=float)[:, None]
    parts = split(x, seed=0)
    assert (len(parts.train), len(parts.val), len(parts.test)) == (800, 100, 100)
    assert not np.array_equal(parts.train, split(x, seed=1).train)


def test_split_tiny_sets_with_large_holdouts() -> None:
    train, val, test = split_indices(4, 0, (0.1, 0.45, 0.45))
    sizes = [len(train), len(val), len(test)]
    assert min(sizes) >= 1 and sum(sizes) == 4


def test_split_errors() -> None:
    with pytest.raises(DataError, match="at least 3 rows.*got 2"):
        split(np.zeros((2, 1)), seed=0)
    with pytest.raises(DataError, match="fractions"):
        split(np.zeros((10, 1)), seed=0, fractions=(0.5, 0.5, 0.0))
