"""Executable spec of the flow zoo: every layer and every flow type, checked the same way.

Invertibility (float32 and float64, spline tails included), log-det against the autograd
Jacobian, log_prob shape, gradients, seeded sampling, state_dict round trips, and a
normalised density after brief training on a 2D mixture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from numerics.likelihood import standard_normal_log_prob
from training.config import ModelConfig
from training.flows import (
    ActNorm,
    AdditiveCoupling,
    Affine,
    AffineCoupling,
    Coupling,
    DiagonalScale,
    Flow,
    InverseTransform,
    LULinear,
    MaskedAutoregressive,
    Permutation,
    RationalQuadraticSpline,
    Transform,
)
from training.flows.coupling import alternating_mask
from training.flows.mixture import FlowMixture
from training.flows.residual import ResidualBlock
from training.registry import MODEL_TYPES, build_model

KINDS = ["nice", "realnvp", "glow", "maf", "iaf", "nsf", "nsf_ar", "resflow", "tarflow"]
COUPLING_KINDS = ["nice", "realnvp", "glow", "nsf"]
DIM = 3
TAIL_BOUND = 2.0
CFG = ModelConfig(hidden_features=16, hidden_layers=2, transforms=3, bins=4, tail_bound=TAIL_BOUND)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}

LAYERS: dict[str, Callable[[int], Transform]] = {
    "additive_coupling": lambda d: AdditiveCoupling(alternating_mask(d, 0), 16, 2),
    "affine_coupling": lambda d: AffineCoupling(alternating_mask(d, 1), 16, 2),
    "spline_coupling": lambda d: Coupling(
        alternating_mask(d, 0), RationalQuadraticSpline(4, TAIL_BOUND), 16, 2
    ),
    "maf": lambda d: MaskedAutoregressive(d, Affine(), 16, 2),
    "iaf": lambda d: InverseTransform(MaskedAutoregressive(d, Affine(), 16, 2)),
    "spline_autoregressive": lambda d: MaskedAutoregressive(
        d, RationalQuadraticSpline(4, TAIL_BOUND), 16, 2
    ),
    "actnorm": ActNorm,
    "diagonal_scale": DiagonalScale,
    "lu_linear": LULinear,
    "frozen_lu_linear": LULinear,  # frozen after perturbation, see make_layer
    "reverse": Permutation.reverse,
    "frozen_reverse": Permutation.reverse,  # the export form: a product with a 0/1 matrix
    "residual_block": lambda d: ResidualBlock(d, 16, 2, 0.9, 50),
    "frozen_residual_block": lambda d: ResidualBlock(d, 16, 2, 0.9, 80),  # unrolled inverse
}


@pytest.fixture(autouse=True)
def _seeded_single_thread() -> Iterator[None]:
    """Fixed initialisation; one thread, as these tiny models lose to threading overhead."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb(module: nn.Module, scale: float = 0.2) -> None:
    """Move every parameter off its (identity) initialisation so the checks can fail."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def inputs(n: int, dim: int, dtype: torch.dtype) -> Tensor:
    """Gaussian points plus points in both spline tails (beyond +-TAIL_BOUND)."""
    generator = torch.Generator().manual_seed(2)
    x = 1.5 * torch.randn(n, dim, generator=generator, dtype=dtype)
    x[: n // 4] = 1.7 * TAIL_BOUND * torch.sign(x[: n // 4])
    return x


def make_layer(name: str, dim: int, dtype: torch.dtype) -> Transform:
    layer = LAYERS[name](dim).to(dtype)
    perturb(layer)
    layer.train()(inputs(64, dim, dtype) * 2 + 1)  # runs ActNorm's data-dependent init
    if name.startswith("frozen"):
        layer = layer.frozen()
    return layer.eval()


def make_flow(kind: str, dim: int, dtype: torch.dtype) -> Flow:
    flow = build_model(kind, dim, CFG).to(dtype)
    perturb(flow)
    flow.train().log_prob(inputs(64, dim, dtype) * 2 + 1)
    return flow.eval()


def jacobian_log_det(transform: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
    """``log |det J|`` per row of ``x`` from the autograd Jacobian."""
    rows = []
    for row in x:
        jacobian = torch.autograd.functional.jacobian(lambda r: transform(r[None])[0][0], row)
        rows.append(torch.linalg.slogdet(jacobian).logabsdet)
    return torch.stack(rows)


# -- every layer ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", LAYERS)
def test_layer_is_invertible(name: str, dtype: torch.dtype) -> None:
    layer = make_layer(name, DIM, dtype)
    x = inputs(256, DIM, dtype)
    y, ladj = layer(x)
    assert y.shape == x.shape and ladj.shape == (256,)
    assert not torch.allclose(y, x), "the layer is still the identity; the check is void"
    assert (layer.inverse(y) - x).abs().max() < TOLERANCE[dtype]
    x_back, inverse_ladj = layer.inverse_and_ladj(y)
    assert (x_back - x).abs().max() < TOLERANCE[dtype]
    assert (inverse_ladj + ladj).abs().max() < 1e3 * TOLERANCE[dtype]


@pytest.mark.parametrize("name", LAYERS)
def test_layer_log_det_matches_jacobian(name: str) -> None:
    layer = make_layer(name, DIM, torch.float64)
    x = inputs(8, DIM, torch.float64)
    _, ladj = layer(x)
    torch.testing.assert_close(ladj, jacobian_log_det(layer, x), atol=1e-8, rtol=0)


# -- every flow type -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_flow_is_invertible(kind: str, dtype: torch.dtype) -> None:
    flow = make_flow(kind, DIM, dtype)
    x = inputs(256, DIM, dtype)
    z, _ = flow(x)
    assert not torch.allclose(z, x)
    assert (flow.inverse(z) - x).abs().max() < TOLERANCE[dtype]


@pytest.mark.parametrize("kind", KINDS)
def test_flow_log_det_matches_jacobian(kind: str) -> None:
    flow = make_flow(kind, DIM, torch.float64)
    x = inputs(6, DIM, torch.float64)
    _, ladj = flow(x)
    torch.testing.assert_close(ladj, jacobian_log_det(flow, x), atol=1e-8, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_flow_is_standard_normal(kind: str) -> None:
    """Zero-initialised conditioners: every flow starts at (a rotation of) the identity."""
    flow = build_model(kind, DIM, CFG).eval()
    x = inputs(32, DIM, torch.float32)
    torch.testing.assert_close(flow.log_prob(x), standard_normal_log_prob(x))


@pytest.mark.parametrize("kind", KINDS)
def test_log_prob_shape_and_gradients_reach_every_parameter(kind: str) -> None:
    flow = make_flow(kind, DIM, torch.float32).train()
    x = inputs(32, DIM, torch.float32)
    log_prob = flow.log_prob(x)
    assert log_prob.shape == (32,) and torch.isfinite(log_prob).all()
    torch.testing.assert_close(log_prob, flow.eval().log_prob(x))  # train == eval
    flow.train().training_loss(x).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"
    # after the step: a residual flow's training step refines its spectral-norm estimates
    assert flow.validation_loss(x).item() == pytest.approx(-flow.log_prob(x).mean().item(),
                                                           rel=1e-6)
    assert flow.family == "flow" and flow.dim == DIM
    assert isinstance(flow.transforms, nn.ModuleList)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_sample_shape_and_seeded_reproducibility(kind: str, dtype: torch.dtype) -> None:
    flow = make_flow(kind, DIM, dtype)
    with torch.no_grad():
        first = flow.sample(50, generator=torch.Generator().manual_seed(7))
        second = flow.sample(50, generator=torch.Generator().manual_seed(7))
        other = flow.sample(50, generator=torch.Generator().manual_seed(8))
    assert first.shape == (50, DIM) and first.dtype == dtype
    assert torch.isfinite(first).all()
    assert torch.equal(first, second) and not torch.equal(first, other)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_is_bit_identical(kind: str) -> None:
    flow = make_flow(kind, DIM, torch.float32)
    reloaded = build_model(kind, DIM, CFG)
    reloaded.load_state_dict(flow.state_dict())
    x = inputs(64, DIM, torch.float32)
    # Training mode on purpose: a lost ActNorm `initialized` flag would re-initialise here.
    assert torch.equal(reloaded.train().log_prob(x), flow.log_prob(x))
    assert torch.equal(reloaded.eval().log_prob(x), flow.log_prob(x))


@pytest.mark.parametrize("kind", KINDS)
def test_trained_density_integrates_to_one(kind: str) -> None:
    data = two_gaussians(4096)
    flow = build_model(
        kind, 2, ModelConfig(hidden_features=32, hidden_layers=2, transforms=3, bins=8)
    )
    initial_nll = flow.eval().validation_loss(data).item()
    optimizer = torch.optim.Adam(flow.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(3)
    flow.train()
    for _ in range(300):
        batch = data[torch.randint(len(data), (256,), generator=generator)]
        optimizer.zero_grad()
        flow.training_loss(batch).backward()
        optimizer.step()
    flow.eval()
    with torch.no_grad():
        assert flow.validation_loss(data).item() < initial_nll - 0.3, "training did not help"
        axis = torch.linspace(-6, 6, 300)
        grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
        density = flow.log_prob(grid).exp().reshape(300, 300)
        mass = torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis)
    assert mass.item() == pytest.approx(1.0, abs=0.01)


def two_gaussians(n: int) -> Tensor:
    """An equal mixture of N((-1.5, -1), 0.5^2 I) and N((1.5, 1), 0.5^2 I)."""
    generator = torch.Generator().manual_seed(4)
    sign = torch.randint(0, 2, (n, 1), generator=generator) * 2 - 1
    return sign * torch.tensor([1.5, 1.0]) + 0.5 * torch.randn(n, 2, generator=generator)


# -- boundaries and layer-specific contracts ----------------------------------------------


def test_unknown_kind_names_the_choices() -> None:
    with pytest.raises(ValueError) as error:
        build_model("glowworm", 2, CFG)
    assert all(kind in str(error.value) for kind in KINDS)
    assert {k for k, v in MODEL_TYPES.items() if v.family == "flow" and not v.image} == set(KINDS)


@pytest.mark.parametrize("kind", COUPLING_KINDS)
def test_coupling_flows_reject_one_dimension(kind: str) -> None:
    with pytest.raises(ValueError, match="dim >= 2"):
        build_model(kind, 1, CFG)


@pytest.mark.parametrize("kind", ["maf", "iaf", "nsf_ar"])
def test_autoregressive_flows_accept_one_dimension(kind: str) -> None:
    flow = make_flow(kind, 1, torch.float64)
    x = inputs(64, 1, torch.float64)
    assert (flow.inverse(flow(x)[0]) - x).abs().max() < 1e-10


def test_actnorm_initialises_once_from_the_first_training_batch() -> None:
    norm = ActNorm(3)
    norm.eval()(torch.randn(16, 3) + 4)
    assert not norm.initialized, "eval mode must never initialise"
    y, _ = norm.train()(3 * torch.randn(512, 3) + 4)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    bias = norm.bias.detach().clone()
    norm(torch.randn(512, 3))
    assert torch.equal(norm.bias, bias), "a second batch must not re-initialise"
    state = norm.state_dict()
    assert bool(state["initialized"])
    reloaded = ActNorm(3)
    reloaded.load_state_dict(state)
    assert bool(reloaded.initialized)


def test_lu_inverse_weight_and_frozen_flow_need_no_solver() -> None:
    layer = make_layer("lu_linear", 4, torch.float64)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(layer.inverse_weight() @ layer.weight(), eye)
    _, ladj = layer(torch.zeros(1, 4, dtype=torch.float64))
    torch.testing.assert_close(ladj[0], torch.linalg.slogdet(layer.weight()).logabsdet)

    flow = make_flow("glow", DIM, torch.float64)
    frozen = flow.frozen()
    assert not any(isinstance(m, LULinear) for m in frozen.modules())
    x = inputs(64, DIM, torch.float64)
    z = torch.randn(64, DIM, dtype=torch.float64)
    with RecordedOps() as ops:
        log_prob, sample = frozen.log_prob(x), frozen.inverse(z)
    torch.testing.assert_close(log_prob, flow.log_prob(x))
    torch.testing.assert_close(sample, flow.inverse(z))
    assert not ops.names & NOT_EXPORTABLE


NOT_EXPORTABLE = {
    "searchsorted",
    "bucketize",
    "linalg_inv",
    "inverse",
    "linalg_slogdet",
    "slogdet",
    "linalg_solve_triangular",
    "triangular_solve",
}


class RecordedOps(TorchFunctionMode):
    """Names of the torch functions called inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", KINDS)
def test_exported_graphs_avoid_ops_without_onnx_form(kind: str) -> None:
    flow = make_flow(kind, DIM, torch.float32).frozen()
    with RecordedOps() as ops, torch.no_grad():
        flow.log_prob(inputs(8, DIM, torch.float32))
        flow.inverse(torch.randn(8, DIM))
    assert not ops.names & NOT_EXPORTABLE, ops.names & NOT_EXPORTABLE


def test_spline_tails_are_the_identity() -> None:
    spline = RationalQuadraticSpline(bins=5, bound=TAIL_BOUND)
    params = torch.randn(4, 2, spline.params_per_dim)
    x = torch.tensor([[-3.0, 2.5], [-2.0 - 1e-3, 7.0], [2.0 + 1e-3, -9.0], [0.5, -0.5]])
    y, ladj = spline(x, params)
    assert torch.equal(y[:3], x[:3]) and torch.equal(ladj[:3], torch.zeros(3, 2))
    assert not torch.allclose(y[3], x[3])
    edges = torch.tensor([[-TAIL_BOUND, TAIL_BOUND]]).expand(4, 2)
    torch.testing.assert_close(spline(edges, params)[0], edges)  # continuous at the bounds


# -- mixtures of flows (fit-anomaly's ensembles) ---------------------------------------------


class _Gaussian(Transform):
    """``z = (x - mean) / scale``: a flow of one step is then N(mean, diag(scale^2))."""

    def __init__(self, mean: list[float], scale: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return (x - self.mean) / self.scale, -self.scale.log().sum().expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * self.scale + self.mean


def _two_gaussian_mixture() -> FlowMixture:
    return FlowMixture([Flow(2, [_Gaussian([-4.0, 0.0], [0.5, 1.0])]),
                        Flow(2, [_Gaussian([4.0, 1.0], [1.0, 0.5])])]).eval()


def test_mixture_density_is_the_mean_of_its_members_and_integrates_to_one() -> None:
    mix = _two_gaussian_mixture()
    x = torch.randn(64, 2) * 2
    dists = [torch.distributions.Normal(torch.tensor([-4.0, 0.0]), torch.tensor([0.5, 1.0])),
             torch.distributions.Normal(torch.tensor([4.0, 1.0]), torch.tensor([1.0, 0.5]))]
    by_hand = torch.stack([d.log_prob(x).sum(-1).exp() for d in dists]).mean(0).log()
    torch.testing.assert_close(mix.log_prob(x), by_hand, atol=1e-5, rtol=1e-5)
    axis = torch.linspace(-10, 10, 500)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    density = mix.log_prob(grid).exp().reshape(500, 500)
    mass = torch.trapezoid(torch.trapezoid(density, axis, dim=1), axis)
    assert mass.item() == pytest.approx(1.0, abs=0.005)


def test_mixture_samples_each_member_with_its_weight_from_fresh_noise() -> None:
    mix = _two_gaussian_mixture()
    x = mix.sample(40_000, generator=torch.Generator().manual_seed(0))
    left = x[:, 0] < 0
    assert left.float().mean().item() == pytest.approx(0.5, abs=0.01)  # members 8 sd apart
    for part, mean, scale in ((x[left], [-4.0, 0.0], [0.5, 1.0]),
                              (x[~left], [4.0, 1.0], [1.0, 0.5])):
        torch.testing.assert_close(part.mean(0), torch.tensor(mean), atol=0.03, rtol=0)
        torch.testing.assert_close(part.std(0), torch.tensor(scale), atol=0.03, rtol=0)
    # the member choice and the noise handed to it are independent
    index, noise = mix.choose(torch.randn(40_000, 3, generator=torch.Generator().manual_seed(1)))
    for column in (noise[:, 0], noise[:, 1], noise[:, :2].square().sum(1)):
        assert abs(torch.corrcoef(torch.stack([index, column]))[0, 1].item()) < 0.02
    torch.testing.assert_close(noise.std(0), torch.ones(3), atol=0.02, rtol=0)


def test_mixture_needs_two_members_of_one_dimension_and_two_columns() -> None:
    with pytest.raises(ValueError, match="at least 2 members"):
        FlowMixture([build_model("maf", 2, CFG)])
    with pytest.raises(ValueError, match="differ in dimension"):
        FlowMixture([build_model("maf", 2, CFG), build_model("maf", 3, CFG)])
    with pytest.raises(ValueError, match="at least 2 columns"):
        FlowMixture([build_model("maf", 1, CFG), build_model("maf", 1, CFG)])
