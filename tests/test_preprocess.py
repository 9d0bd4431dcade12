"""Executable spec of training/preprocess.py: invertibility, log-dets, densities by hand."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from scipy.special import expit, logit
from scipy.stats import norm

from training.config import PreprocessConfig
from training.data import DataError, load_data
from training.preprocess import (
    STD_FLOOR,
    Dequantize,
    Logit,
    Preprocessor,
    Standardize,
    Transform,
)

DIM, LEVELS = 3, 17
DOUBLE = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _real(rows: int = 6) -> torch.Tensor:
    return torch.randn(rows, DIM, generator=_gen(1), dtype=DOUBLE)


def _unit(rows: int = 6) -> torch.Tensor:
    return torch.rand(rows, DIM, generator=_gen(2), dtype=DOUBLE) * 0.98 + 0.01


def _ints(rows: int = 6) -> torch.Tensor:
    return torch.randint(0, LEVELS, (rows, DIM), generator=_gen(3)).to(DOUBLE)


def _noise(rows: int = 6) -> torch.Tensor:
    return torch.rand(rows, DIM, generator=_gen(4), dtype=DOUBLE)


def _ladj_by_autograd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> list[float]:
    """log|det J| per row from the autograd Jacobian of one row."""
    out = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda r: fn(r[None])[0], row)
        out.append(torch.linalg.slogdet(jac).logabsdet.item())
    return out


# ----------------------------------------------------------------------------- each transform

TRANSFORMS: dict[str, tuple[Callable[[], Transform], Callable[[], torch.Tensor]]] = {
    "standardize": (
        lambda: Standardize([1.0, -2.0, 0.5], [2.0, 0.3, 1.5], dtype=DOUBLE),
        _real,
    ),
    "dequantize": (lambda: Dequantize(LEVELS, dtype=DOUBLE), _ints),
    "logit": (lambda: Logit(0.05, dtype=DOUBLE), _unit),
}


def _call(t: Transform, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(t, Dequantize):
        return t(x, noise=_noise(len(x)))
    return t(x)


@pytest.fixture(params=list(TRANSFORMS))
def case(request: pytest.FixtureRequest) -> tuple[Transform, torch.Tensor]:
    make, data = TRANSFORMS[request.param]
    return make().eval(), data()


def test_transform_is_invertible(case: tuple[Transform, torch.Tensor]) -> None:
    t, x = case
    u, _ = _call(t, x)
    expected = x + _noise(len(x)) - 0.5 if isinstance(t, Dequantize) else x
    torch.testing.assert_close(t.inverse(u), expected, atol=1e-10, rtol=0)


def test_transform_ladj_matches_jacobian(case: tuple[Transform, torch.Tensor]) -> None:
    t, x = case
    _, ladj = _call(t, x)
    assert ladj.shape == (len(x),)
    if isinstance(t, Dequantize):
        noise = _noise(len(x))
        rows = [
            _ladj_by_autograd(lambda r, n=n: t(r, noise=n[None])[0], x[i : i + 1])[0]
            for i, n in enumerate(noise)
        ]
    else:
        rows = _ladj_by_autograd(lambda r: t(r)[0], x)
    np.testing.assert_allclose(ladj.numpy(), rows, atol=1e-10)


def test_transform_state_dict_round_trip(case: tuple[Transform, torch.Tensor]) -> None:
    t, x = case
    fresh = type(t)(*_placeholder_args(t), dtype=DOUBLE).eval()
    fresh.load_state_dict(t.state_dict())
    torch.testing.assert_close(_call(fresh, x), _call(t, x))
    assert fresh.describe() == t.describe()
    json.dumps(t.describe())


def _placeholder_args(t: Transform) -> tuple[object, ...]:
    if isinstance(t, Standardize):
        return torch.zeros(DIM), torch.ones(DIM)
    return (2,) if isinstance(t, Dequantize) else (0.25,)


# ----------------------------------------------------------------------------- densities by hand


def test_standardize_density_equals_scipy_normal() -> None:
    x_train = load_data("wine").x
    pre = Preprocessor.fit(PreprocessConfig(), x_train, dtype=DOUBLE).eval()
    x = x_train[:50]
    u, ladj = pre(torch.as_tensor(x))
    log_px = (torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(-1) + ladj).numpy()
    m, s = x_train.mean(0), x_train.std(0)
    np.testing.assert_allclose(log_px, norm.logpdf(x, loc=m, scale=s).sum(-1), rtol=1e-12)


def test_logit_density_by_hand() -> None:
    """p_y(y) = prod N(logit(s); 0, 1) (1 - 2a) / (s (1 - s)),  s = a + (1 - 2a) y."""
    alpha, y = 0.05, _unit().numpy()
    t = Logit(alpha, dtype=DOUBLE)
    u, ladj = t(torch.as_tensor(y))
    s = alpha + (1 - 2 * alpha) * y
    by_hand = (norm.logpdf(logit(s)) + np.log(1 - 2 * alpha) - np.log(s * (1 - s))).sum(-1)
    model = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(-1) + ladj
    np.testing.assert_allclose(model.numpy(), by_hand, rtol=1e-12)
    np.testing.assert_allclose(t.inverse(u).numpy(), (expit(logit(s)) - alpha) / (1 - 2 * alpha))


def test_dequantize_ladj_is_minus_d_log_levels() -> None:
    x = _ints()
    _, ladj = Dequantize(LEVELS, dtype=DOUBLE).eval()(x)
    torch.testing.assert_close(ladj, torch.full((len(x),), -DIM * math.log(LEVELS), dtype=DOUBLE))


def test_dequantize_eval_uses_cell_midpoints() -> None:
    x = _ints()
    u, _ = Dequantize(LEVELS, dtype=DOUBLE).eval()(x)
    torch.testing.assert_close(u, (x + 0.5) / LEVELS)


def test_dequantize_training_noise_is_seeded_and_stays_in_cell() -> None:
    t, x = Dequantize(LEVELS, dtype=DOUBLE).train(), _ints(500)
    a, _ = t(x, generator=_gen(9))
    b, _ = t(x, generator=_gen(9))
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, t(x, generator=_gen(10))[0])
    assert torch.equal(torch.floor(a * LEVELS), x)  # each value stays in its integer's cell
    assert torch.equal(torch.round(t.inverse(a)), x)


# ----------------------------------------------------------------------------- Preprocessor

CONFIGS = {
    "none": PreprocessConfig(standardize=False),
    "standardize": PreprocessConfig(),
    "dequantize": PreprocessConfig(standardize=False, dequantize=True, levels=LEVELS),
    "dequantize+standardize": PreprocessConfig(dequantize=True, levels=LEVELS),
    "dequantize+logit+standardize": PreprocessConfig(
        dequantize=True, levels=LEVELS, logit_alpha=0.05
    ),
    "logit+standardize": PreprocessConfig(logit_alpha=0.05),
}


def _train_data(cfg: PreprocessConfig) -> np.ndarray:
    if cfg.dequantize:
        return _ints(200).numpy()
    return (_unit(200) if cfg.logit_alpha else _real(200) * 3 + 1).numpy()


@pytest.fixture(params=list(CONFIGS))
def fitted(request: pytest.FixtureRequest) -> tuple[PreprocessConfig, Preprocessor, torch.Tensor]:
    cfg = CONFIGS[request.param]
    x = _train_data(cfg)
    return cfg, Preprocessor.fit(cfg, x, dtype=DOUBLE).eval(), torch.as_tensor(x[:5])


def test_preprocessor_invertible(
    fitted: tuple[PreprocessConfig, Preprocessor, torch.Tensor],
) -> None:
    _, pre, x = fitted
    u, ladj = pre(x)
    assert u.shape == x.shape and ladj.shape == (len(x),)
    torch.testing.assert_close(pre.inverse(u), x, atol=1e-10, rtol=0)


def test_preprocessor_ladj_matches_jacobian(
    fitted: tuple[PreprocessConfig, Preprocessor, torch.Tensor],
) -> None:
    _, pre, x = fitted
    noise = _noise(len(x))
    _, ladj = pre(x, noise=noise)
    rows = [
        _ladj_by_autograd(lambda r, n=n: pre(r, noise=n[None])[0], x[i : i + 1])[0]
        for i, n in enumerate(noise)
    ]
    np.testing.assert_allclose(ladj.numpy(), rows, atol=1e-9)


def test_frozen_preprocessor_is_the_same_map(
    fitted: tuple[PreprocessConfig, Preprocessor, torch.Tensor],
) -> None:
    """The export form (standardize as an inference batch norm) changes no value."""
    _, pre, x = fitted
    frozen = pre.frozen()
    (u, ladj), (uf, ladjf) = pre(x), frozen(x)
    torch.testing.assert_close(uf, u, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ladjf, ladj, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(frozen.inverse(u), pre.inverse(u), atol=1e-12, rtol=1e-12)
    assert frozen.describe() == pre.describe() and not frozen.training


def test_preprocessor_state_dict_round_trip(
    fitted: tuple[PreprocessConfig, Preprocessor, torch.Tensor],
) -> None:
    cfg, pre, x = fitted
    fresh = Preprocessor.from_config(cfg, DIM, dtype=DOUBLE).eval()
    fresh.load_state_dict(pre.state_dict())
    torch.testing.assert_close(fresh(x), pre(x))
    assert fresh.describe() == pre.describe()
    assert json.loads(json.dumps(pre.describe())) == pre.describe()


def test_describe_lists_steps_in_order() -> None:
    cfg = CONFIGS["dequantize+logit+standardize"]
    steps = Preprocessor.fit(cfg, _ints(50).numpy()).describe()
    assert [s["type"] for s in steps] == ["dequantize", "logit", "standardize"]
    assert steps[0]["levels"] == LEVELS and steps[1]["alpha"] == pytest.approx(0.05)
    assert len(steps[2]["mean"]) == DIM and len(steps[2]["std"]) == DIM
    assert Preprocessor.fit(CONFIGS["none"], _real().numpy()).describe() == []


def test_standardize_fitted_on_dequantized_midpoints() -> None:
    x = _ints(200).numpy()
    pre = Preprocessor.fit(CONFIGS["dequantize+standardize"], x)
    mid = (x + 0.5) / LEVELS
    np.testing.assert_allclose(pre.transforms[-1].mean.numpy(), mid.mean(0), rtol=1e-6)
    np.testing.assert_allclose(pre.transforms[-1].std.numpy(), mid.std(0), rtol=1e-6)
    assert pre.transforms[-1].mean.dtype == torch.get_default_dtype()


def test_constant_column_std_is_floored() -> None:
    x = np.c_[np.arange(10.0), np.full(10, 3.0)]
    pre = Preprocessor.fit(PreprocessConfig(), x, dtype=DOUBLE).eval()
    assert pre.transforms[-1].std[1].item() == pytest.approx(STD_FLOOR)
    u, ladj = pre(torch.as_tensor(x))
    assert torch.isfinite(u).all() and torch.isfinite(ladj).all()
    torch.testing.assert_close(pre.inverse(u), torch.as_tensor(x))


def test_levels_from_argument_or_config() -> None:
    cfg = PreprocessConfig(dequantize=True)
    assert Preprocessor.fit(cfg, _ints().numpy(), levels=LEVELS).levels == LEVELS
    with pytest.raises(ValueError, match="needs levels"):
        Preprocessor.from_config(cfg, DIM)
    with pytest.raises(ValueError, match="disagrees"):
        Preprocessor.from_config(CONFIGS["dequantize"], DIM, levels=5)


def test_fit_rejects_data_the_steps_cannot_take() -> None:
    with pytest.raises(DataError, match=r"row 1, column 1.*0\.\.16"):
        Preprocessor.fit(CONFIGS["dequantize"], _real().numpy())
    with pytest.raises(DataError, match=r"logit_alpha needs data in \[0, 1\]"):
        Preprocessor.fit(CONFIGS["logit+standardize"], _real().numpy())
    with pytest.raises(DataError, match="NaN"):
        Preprocessor.fit(CONFIGS["standardize"], np.array([[np.nan, 1.0]]))


def test_eval_graph_exports_without_data_dependent_branches() -> None:
    """torch.export (the front end of the ONNX dynamo exporter) traces forward and inverse."""
    cfg = CONFIGS["dequantize+logit+standardize"]
    pre = Preprocessor.fit(cfg, _ints(50).numpy(), dtype=DOUBLE).eval()

    class Inverse(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = pre

        def forward(self, u: torch.Tensor) -> torch.Tensor:
            return self.pre.inverse(u)

    batch = torch.export.Dim("batch", min=2)
    x = _ints(7)
    forward = torch.export.export(pre, (x,), dynamic_shapes=({0: batch},)).module()
    torch.testing.assert_close(forward(x[:3]), pre(x[:3]))
    u = pre(x)[0]
    inverse = torch.export.export(Inverse(), (u,), dynamic_shapes=({0: batch},)).module()
    torch.testing.assert_close(inverse(u[:4]), pre.inverse(u[:4]))
