"""Data sets: the named sets (toys from ``training.toys``, bundled tables), user files,
validation, splits, saving.

Everything random takes a ``numpy.random.Generator`` (or a seed that builds one); nothing
touches a global RNG. Arrays are ``(rows, dim)`` float64.

Example:
    >>> data = load_data("moons", n=1000, seed=0)
    >>> data.x.shape
    (1000, 2)
    >>> splits = split(data.x, seed=0)
"""

from __future__ import annotations

import numbers
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifact.tables import SUFFIXES, DataError, read_table
from training.family_data import MARKOV_SEQ, VMF_S2, WRAPPED_T2, binary_digits
from training.toys import (
    MIXTURE_SETS,
    Sampler,
    checkerboard,
    checkerboard_log_density,
    circles,
    gaussian_mixture,
    mixture_sampler,
    moons,
    pinwheel,
    swissroll,
    two_spirals,
)

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "DatasetSpec",
    "Splits",
    "check_dim",
    "check_levels",
    "load_data",
    "save_data",
    "split",
    "split_indices",
    "true_log_density",
]

LogDensity = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class Dataset:
    """A loaded data set.

    Attributes:
        x: ``(rows, dim)`` float64 values.
        y: ``(rows,)`` labels, or ``None``.
        name: the set's name (a named set, or the file's stem).
        levels: integer data takes values ``0..levels-1``; ``None`` for continuous data.
        source: ``"named"`` or the file path.
        shape: ``(C, H, W)`` of one row for image data (rows are flattened in C-order).
        columns: the file's column names (a CSV header, Parquet's numeric columns), or ``()``.
    """

    x: np.ndarray
    y: np.ndarray | None
    name: str
    levels: int | None
    source: str
    shape: tuple[int, int, int] | None = None
    columns: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        return self.x.shape[1]


@dataclass(frozen=True)
class Splits:
    """Train / validation / test rows, each ``(rows_i, dim)``."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


# --------------------------------------------------------------------------- registry


def _bundled(loader_name: str) -> Sampler:
    """A scikit-learn bundled table (offline); ``n`` rows drawn without replacement."""

    def load(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        import sklearn.datasets  # heavy: import where used

        bunch = getattr(sklearn.datasets, loader_name)()
        x, y = bunch.data.astype(np.float64), np.asarray(bunch.target)
        keep = np.arange(len(x)) if n == len(x) else np.sort(rng.choice(len(x), n, False))
        return x[keep], y[keep]

    return load


@dataclass(frozen=True)
class DatasetSpec:
    """A named set: what it is, its dimension, default size, and (for integer data) levels."""

    summary: str
    dim: int
    default_size: int
    sampler: Sampler
    levels: int | None = None
    generated: bool = True  # False: a fixed table; seed only picks a subsample
    shape: tuple[int, int, int] | None = None  # image sets: (C, H, W) of a flattened row

    @property
    def integer(self) -> bool:
        return self.levels is not None


DATASETS: dict[str, DatasetSpec] = {
    "moons": DatasetSpec("two interleaving half circles, noise 0.1", 2, 10_000, moons),
    "circles": DatasetSpec("two concentric circles, radii 1 and 0.5", 2, 10_000, circles),
    "8gaussians": DatasetSpec(
        "8 isotropic Gaussians on a circle (exact density)",
        2,
        10_000,
        mixture_sampler("8gaussians"),
    ),
    "checkerboard": DatasetSpec(
        "uniform on 8 squares of a 4x4 board (exact density)", 2, 10_000, checkerboard
    ),
    "pinwheel": DatasetSpec("five curved arms", 2, 10_000, pinwheel),
    "2spirals": DatasetSpec("two interleaved spirals", 2, 10_000, two_spirals),
    "swissroll": DatasetSpec("2D swiss roll", 2, 10_000, swissroll),
    "3clusters": DatasetSpec(
        "three Gaussian clusters (exact density)", 2, 10_000, mixture_sampler("3clusters")
    ),
    "vmf_s2": DatasetSpec("3 von Mises-Fisher on the sphere S^2, rows in R^3 (exact density)",
                          3, 10_000, lambda n, rng: VMF_S2.sample(n, rng)),
    "torus_t2": DatasetSpec("3 wrapped Gaussians on the torus T^2, angles (exact density)", 2,
                            10_000, lambda n, rng: WRAPPED_T2.sample(n, rng)),
    "digits_binary": DatasetSpec("scikit-learn digits, 64 pixels binarised at 8 (tokens)", 64,
                                 1797, binary_digits, levels=2, generated=False),
    "markov_seq": DatasetSpec("8 tokens of 4 values from a Markov chain (exact probabilities)",
                              8, 10_000, lambda n, rng: MARKOV_SEQ.sample(n, rng), levels=4),
    "gmm2": DatasetSpec(
        "5-component Gaussian mixture, 2D (exact density)", 2, 10_000, mixture_sampler("gmm2")
    ),
    "gmm6": DatasetSpec(
        "6-component Gaussian mixture, 6D (exact density)", 6, 20_000, mixture_sampler("gmm6")
    ),
    "gmm16": DatasetSpec(
        "8-component Gaussian mixture, 16D (exact density)", 16, 50_000, mixture_sampler("gmm16")
    ),
    "digits": DatasetSpec(
        "8x8 handwritten digits, integers 0..16 (scikit-learn)",
        64,
        1797,
        _bundled("load_digits"),
        levels=17,
        generated=False,
    ),
    "digits_image": DatasetSpec(
        "8x8 handwritten digits as 1x8x8 images, integers 0..16 (scikit-learn)",
        64,
        1797,
        _bundled("load_digits"),
        levels=17,
        generated=False,
        shape=(1, 8, 8),
    ),
    "breast_cancer": DatasetSpec(
        "Wisconsin breast cancer features (scikit-learn)",
        30,
        569,
        _bundled("load_breast_cancer"),
        generated=False,
    ),
    "wine": DatasetSpec(
        "wine chemical analysis (scikit-learn)", 13, 178, _bundled("load_wine"), generated=False
    ),
}


def true_log_density(name: str) -> LogDensity | None:
    """Exact ``log p(x)`` of a named set, ``x: (..., dim)`` -> ``(...,)``, or ``None``.

    ``None`` when the set has no closed-form density; an unknown name raises ``DataError``.

    Available for the Gaussian mixtures (gmm2, gmm6, gmm16, 8gaussians, 3clusters), for
    checkerboard (uniform density 1/32 on its squares, ``-inf`` off them) and for the manifold
    sets vmf_s2 and torus_t2 (densities on the manifold) and the token set markov_seq
    (probabilities; ``training.family_data``).
    """
    if name not in DATASETS:
        raise DataError(f"unknown data set '{name}'; choose one of {', '.join(DATASETS)}")
    if name in MIXTURE_SETS:
        return gaussian_mixture(name).log_density
    manifold = {"vmf_s2": VMF_S2, "torus_t2": WRAPPED_T2, "markov_seq": MARKOV_SEQ}.get(name)
    if manifold is not None:
        return manifold.log_density
    return checkerboard_log_density if name == "checkerboard" else None


# --------------------------------------------------------------------------- loading


def load_data(
    name_or_path: str | os.PathLike[str],
    n: int | None = None,
    seed: int = 0,
    *,
    levels: int | None = None,
    images: bool = False,
) -> Dataset:
    """Load a named set or a ``.npy`` / ``.npz`` / ``.csv`` file.

    Args:
        name_or_path: a key of ``DATASETS`` or a file path.
        n: rows to generate (named) or to draw without replacement (tables, files);
            ``None``: the spec's default size, or every row.
        seed: seeds the ``numpy.random.Generator`` used for generation or subsampling.
        levels: declare the data integer-valued in ``0..levels-1`` (checked). Files are
            never assumed integer otherwise; named sets carry their own levels.
        images: accept a ``.npy`` of images ``(rows, H, W)`` or ``(rows, C, H, W)``: rows are
            flattened (C-order) and ``Dataset.shape`` records ``(C, H, W)``; ``uint8`` images
            are integer data with 256 levels.
    Returns:
        a ``Dataset`` with ``x: (rows, dim)`` float64.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1):
        raise DataError(f"n must be a positive integer, got {n!r}")
    key = os.fspath(name_or_path)
    rng = np.random.default_rng(seed)
    if key in DATASETS:
        spec = DATASETS[key]
        if not spec.generated and n is not None and n > spec.default_size:
            raise DataError(
                f"'{key}' has {spec.default_size} rows; ask for n <= {spec.default_size}"
            )
        x, y = spec.sampler(n or spec.default_size, rng)
        data = Dataset(np.asarray(x, np.float64), y, key, spec.levels, "named", spec.shape)
    elif images and key.lower().endswith(".npy"):
        data = _load_images(_resolve_path(key), n, rng)
    else:
        data = _load_file(_resolve_path(key), n, rng)
    if levels is not None:
        check_levels(data.x, levels, data.source if data.source != "named" else key)
        data = Dataset(data.x, data.y, data.name, levels, data.source, data.shape,
                       data.columns)
    return data


def _load_images(path: Path, n: int | None, rng: np.random.Generator) -> Dataset:
    """A ``.npy`` of images ``(rows, H, W)`` or ``(rows, C, H, W)``, flattened per row."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"could not read {path} as .npy: {err}") from None
    if array.ndim not in (3, 4) or 0 in array.shape:
        raise DataError(f"{path}: images have shape {array.shape}; expected (rows, H, W) or "
                        f"(rows, C, H, W) with every axis non-empty")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise DataError(f"{path}: the images have dtype {array.dtype}; store real numbers only")
    images = array[:, None] if array.ndim == 3 else array
    levels = 256 if array.dtype == np.uint8 else None
    x = images.reshape(len(images), -1).astype(np.float64)
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0][0])
        raise DataError(f"{path}: image {row + 1} has NaN/Inf values; they are not allowed")
    if n is not None:
        if n > len(x):
            raise DataError(f"{path} has {len(x)} images; ask for n <= {len(x)}")
        x = x[np.sort(rng.choice(len(x), n, replace=False))]
    shape = tuple(int(v) for v in images.shape[1:])
    return Dataset(x, None, path.stem, levels, str(path), shape)  # type: ignore[arg-type]


def _resolve_path(key: str) -> Path:
    path = Path(key)
    if path.suffix.lower() not in SUFFIXES:
        extra = f" ('{key}' exists, but its suffix is not supported)" if path.exists() else ""
        raise DataError(
            f"unknown data set '{key}'{extra}; choose one of {', '.join(DATASETS)}, "
            f"or give a file path ending in .npy, .npz, .csv or .parquet"
        )
    if not path.is_file():
        raise DataError(f"data file '{key}' not found; check the path (cwd: {os.getcwd()})")
    return path


def _load_file(path: Path, n: int | None, rng: np.random.Generator) -> Dataset:
    table = read_table(path)
    x, y = table.x, table.y
    if n is not None:
        if n > len(x):
            raise DataError(f"{path} has {len(x)} rows; ask for n <= {len(x)}")
        keep = np.sort(rng.choice(len(x), n, replace=False))
        x, y = x[keep], None if y is None else y[keep]
    return Dataset(x, y, path.stem, None, str(path), columns=tuple(table.columns))


def check_levels(x: np.ndarray, levels: int, source: str) -> None:
    """Raise ``DataError`` unless ``x`` holds integers in ``0..levels-1``."""
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 2:
        raise DataError(f"levels must be an integer >= 2, got {levels!r}")
    bad = np.argwhere((x != np.round(x)) | (x < 0) | (x > levels - 1))
    if len(bad):
        row, column = bad[0]
        raise DataError(
            f"{source}: row {row + 1}, column {column + 1} is {x[row, column]}, but levels="
            f"{levels} needs integers in 0..{levels - 1}"
        )


def check_dim(
    data: np.ndarray | Dataset, expected_dim: int, source: str, model: str | None = None
) -> None:
    """Raise ``DataError`` unless ``data`` has ``expected_dim`` columns."""
    x = data.x if isinstance(data, Dataset) else np.asarray(data)
    found = x.shape[1] if x.ndim == 2 else 1
    if x.ndim > 2 or found != expected_dim:
        who = f"model '{model}'" if model else "the model"
        raise DataError(f"{source} has {found} columns but {who} expects {expected_dim}")


# --------------------------------------------------------------------------- splits, saving


def split_indices(
    rows: int, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint train / val / test row indices covering ``range(rows)``, each non-empty."""
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-9:
        raise DataError(f"fractions must be 3 positive numbers summing to 1, got {fractions}")
    if rows < 3:
        raise DataError(f"need at least 3 rows to split into train/val/test, got {rows}")
    n_val = max(1, round(rows * fractions[1]))
    n_test = max(1, round(rows * fractions[2]))
    n_train = rows - n_val - n_test
    while n_train < 1:  # tiny sets with large val/test fractions; rows >= 3 keeps each >= 1
        n_val, n_test = (n_val - 1, n_test) if n_val >= n_test else (n_val, n_test - 1)
        n_train += 1
    order = np.random.default_rng(seed).permutation(rows)
    return order[:n_train], order[n_train : n_train + n_val], order[n_train + n_val :]


def split(
    x: np.ndarray, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
) -> Splits:
    """Deterministic split of ``x: (rows, dim)``: same seed, same splits."""
    train, val, test = split_indices(len(x), seed, fractions)
    return Splits(x[train], x[val], x[test])


def save_data(x: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write ``x: (rows, dim)`` to ``.npy`` or ``.csv`` (header ``x0,x1,...``), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise DataError(f"cannot write '{path}': the output file must end in .npy or .csv")
    x = np.asarray(x, dtype=np.float64)
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim != 2:
        raise DataError(f"can only save a 2D array (rows, columns), got shape {x.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if suffix == ".npy":
                np.save(fh, x)
            else:
                header = ",".join(f"x{i}" for i in range(x.shape[1]))
                np.savetxt(fh, x, fmt="%.17g", delimiter=",", header=header, comments="")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
