"""Executable spec of the image models: every image layer (invertibility, log-det against the
autograd Jacobian), the U-Net's hand-written forward mode, image data, bits/dim on digits after
brief training, ONNX parity, and image rows served end to end by a real server."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from training.config import ModelConfig
from training.flows.base import Transform
from training.flows.image import (
    ActNorm2d,
    AffineCoupling2d,
    Chain,
    InvertibleConv1x1,
    Squeeze,
    build_image_flow,
)
from training.registry import IMAGE_MODEL_TYPES, MODEL_TYPES, build_model
from training.unet import UNet

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
TINY = ModelConfig(hidden_features=8, hidden_layers=1, transforms=2, time_embedding=4)

LAYERS: dict[str, tuple[Callable[[], Transform], tuple[int, int, int]]] = {
    "squeeze": (Squeeze, (2, 4, 4)),
    "actnorm2d": (lambda: ActNorm2d(2), (2, 4, 4)),
    "conv1x1": (lambda: InvertibleConv1x1(4), (4, 2, 2)),
    "frozen_conv1x1": (lambda: InvertibleConv1x1(2), (2, 4, 4)),
    "checkerboard_even": (lambda: AffineCoupling2d((1, 4, 4), "checkerboard", 0, 8), (1, 4, 4)),
    "checkerboard_odd": (lambda: AffineCoupling2d((2, 4, 4), "checkerboard", 1, 8), (2, 4, 4)),
    "channel_coupling_even": (lambda: AffineCoupling2d((2, 4, 4), "channel", 0, 8), (2, 4, 4)),
    "channel_coupling_odd": (lambda: AffineCoupling2d((4, 2, 2), "channel", 1, 8), (4, 2, 2)),
    "chain": (lambda: Chain([ActNorm2d(1), Squeeze(), InvertibleConv1x1(4),
                             AffineCoupling2d((4, 2, 2), "channel", 0, 8)]), (1, 4, 4)),
}
FLOW_SHAPES = {"glow_image": (1, 4, 4), "realnvp_image": (2, 4, 4)}


@pytest.fixture(autouse=True)
def _seeded_single_thread() -> Iterator[None]:
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturb(module: torch.nn.Module, scale: float = 0.2) -> None:
    """Move every parameter off its initialisation (zero output convs) so checks can fail."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def images(n: int, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(2), dtype=dtype)


def make_layer(name: str, dtype: torch.dtype) -> tuple[Transform, tuple[int, int, int]]:
    factory, shape = LAYERS[name]
    layer = factory().to(dtype)
    perturb(layer)
    layer.train()(images(32, shape, dtype) * 2 + 1)  # ActNorm's data-dependent init
    if name.startswith("frozen"):
        layer = layer.frozen()
    return layer.eval(), shape


def make_flow(kind: str, dtype: torch.dtype) -> torch.nn.Module:
    shape = FLOW_SHAPES[kind]
    cfg = TINY.model_copy(update={"image_shape": shape, "scales": 2})
    flow = build_image_flow(kind, math.prod(shape), cfg).to(dtype)
    perturb(flow, 0.1)
    flow.train().log_prob(images(32, shape, dtype).flatten(1) * 2 + 1)
    return flow.eval()


def jacobian_log_det(fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
    """``log |det J|`` per sample from the autograd Jacobian of the flattened map."""
    out = []
    for row in x:
        jac = torch.autograd.functional.jacobian(lambda r: fn(r[None])[0][0].flatten(), row)
        out.append(torch.linalg.slogdet(jac.reshape(row.numel(), row.numel())).logabsdet)
    return torch.stack(out)


# -- every image layer and both image flows -------------------------------------------------


@pytest.mark.parametrize("name", LAYERS)
def test_image_layer_is_invertible_float32(name: str) -> None:
    layer, shape = make_layer(name, torch.float32)
    x = images(64, shape, torch.float32)
    y, ladj = layer(x)
    assert ladj.shape == (64,) and y.numel() == x.numel()
    if y.shape == x.shape:
        assert not torch.allclose(y, x), "the layer is still the identity; the check is void"
    assert (layer.inverse(y) - x).abs().max() < TOLERANCE[torch.float32]


@pytest.mark.parametrize("name", LAYERS)
def test_image_layer_log_det_matches_jacobian(name: str) -> None:
    layer, shape = make_layer(name, torch.float64)
    x = images(3, shape, torch.float64)
    torch.testing.assert_close(layer(x)[1], jacobian_log_det(layer, x), atol=1e-8, rtol=0)


def test_frozen_conv1x1_equals_the_lu_form() -> None:
    layer, shape = make_layer("conv1x1", torch.float64)
    frozen = layer.frozen()
    x = images(5, shape, torch.float64)
    for a, b in zip(layer(x), frozen(x), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(layer.inverse(x), frozen.inverse(x))


@pytest.mark.parametrize("kind", sorted(FLOW_SHAPES))
def test_image_flow_is_invertible_with_exact_log_det(kind: str) -> None:
    flow = make_flow(kind, torch.float32)
    x = images(64, FLOW_SHAPES[kind], torch.float32).flatten(1)
    z, _ = flow(x)
    assert z.shape == x.shape and not torch.allclose(z, x)
    assert (flow.inverse(z) - x).abs().max() < TOLERANCE[torch.float32]
    frozen = flow.frozen()
    assert (frozen.inverse(z) - x).abs().max() < TOLERANCE[torch.float32]
    flow64 = make_flow(kind, torch.float64)
    x64 = x[:3].double()
    torch.testing.assert_close(flow64(x64)[1], jacobian_log_det(flow64, x64), atol=1e-8, rtol=0)


@pytest.mark.parametrize("kind", sorted(FLOW_SHAPES))
def test_image_flow_gradients_reach_every_parameter(kind: str) -> None:
    flow = make_flow(kind, torch.float32).train()
    flow.training_loss(images(16, FLOW_SHAPES[kind], torch.float32).flatten(1)).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


# -- the U-Net's forward mode ----------------------------------------------------------------


def test_unet_jvp_and_divergence_match_autograd() -> None:
    net = UNet((2, 4, 4), channels=4, time_embedding=4, levels=2).double()
    perturb(net, 0.1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 32, generator=gen, dtype=torch.float64)
    t, e = torch.rand(3, generator=gen, dtype=torch.float64), torch.randn(3, 32, generator=gen,
                                                                          dtype=torch.float64)
    jac = torch.stack([
        torch.autograd.functional.jacobian(lambda r, i=i: net(r[None], t[i : i + 1])[0], x[i])
        for i in range(3)
    ])
    out, jvp = net.jvp(x, t, e)
    out2, div = net.divergence(x, t)
    torch.testing.assert_close(out, net(x, t))
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(jvp, torch.einsum("bij,bj->bi", jac, e), atol=1e-10, rtol=0)
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(-1), atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["ddpm_image", "cfm_image", "otcfm_image"])
def test_image_velocity_models_build_and_train(kind: str) -> None:
    cfg = TINY.model_copy(update={"image_shape": (1, 4, 4), "scales": 1})
    model = build_model(kind, 16, cfg)
    x = images(8, (16,), torch.float32)
    model.training_loss(x, torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is not None for p in model.parameters())
    v, div = model.velocity_div(x, torch.full((8,), 0.5))
    assert v.shape == (8, 16) and div.shape == (8,)


# -- registry and data ----------------------------------------------------------------------


def test_image_types_are_registered_apart_and_need_a_shape() -> None:
    assert not set(IMAGE_MODEL_TYPES) & set(MODEL_TYPES)
    for kind in IMAGE_MODEL_TYPES:
        with pytest.raises(ValueError, match="image_shape"):
            build_model(kind, 64, ModelConfig())
    with pytest.raises(ValueError, match="divisible"):
        build_model("glow_image", 36, ModelConfig(image_shape=(1, 6, 6), scales=2))


def test_digits_image_and_user_image_files(tmp_path: Path) -> None:
    from training.data import DataError, load_data

    digits = load_data("digits_image")
    assert digits.x.shape == (1797, 64) and digits.shape == (1, 8, 8) and digits.levels == 17
    np.testing.assert_array_equal(digits.x, load_data("digits").x)
    pics = np.random.default_rng(0).integers(0, 256, (10, 2, 4, 6), dtype=np.uint8)
    np.save(tmp_path / "pics.npy", pics)
    data = load_data(tmp_path / "pics.npy", images=True)
    assert data.shape == (2, 4, 6) and data.levels == 256 and data.x.shape == (10, 48)
    np.testing.assert_array_equal(data.x.reshape(10, 2, 4, 6), pics)
    np.save(tmp_path / "gray.npy", pics[:, 0].astype(np.float32))
    assert load_data(tmp_path / "gray.npy", images=True).shape == (1, 4, 6)
    with pytest.raises(DataError, match="expected a 2D array"):
        load_data(tmp_path / "pics.npy")  # without images=True the table rules stand
