"""Executable spec of the image models: every image layer (invertibility, log-det against the
autograd Jacobian), the U-Net's hand-written forward mode, image data, bits/dim on digits after
brief training, ONNX parity, and image rows served end to end by a real server."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from training.config import ModelConfig
from training.flows.base import Compose, Transform
from training.flows.image import (
    ActNorm2d,
    AffineCoupling2d,
    InvertibleConv1x1,
    Squeeze,
)
from training.registry import MODEL_TYPES, build_model
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
    "chain": (lambda: Compose([ActNorm2d(1), Squeeze(), InvertibleConv1x1(4),
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
    flow = build_model(kind, math.prod(shape), cfg).to(dtype)
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
def test_conditional_image_flow_is_invertible_given_its_context(kind: str) -> None:
    """A label's one-hot row reaches every coupling as constant planes: the inverse given the
    same context undoes the forward map, the log-det is the Jacobian's given it, and another
    context moves the density."""
    shape = FLOW_SHAPES[kind]
    cfg = TINY.model_copy(update={"image_shape": shape, "scales": 2, "context_features": 3})
    flow = build_model(kind, math.prod(shape), cfg).double()
    perturb(flow, 0.1)
    x = images(4, shape, torch.float64).flatten(1)
    c = torch.eye(3, dtype=torch.float64)[[0, 1, 2, 0]]
    flow.train().log_prob(x * 2 + 1, c)  # ActNorm's data-dependent initialisation
    flow.eval()
    z, ladj = flow(x, c)
    torch.testing.assert_close(flow.inverse(z, c), x, atol=1e-8, rtol=0)
    torch.testing.assert_close(ladj[:1], jacobian_log_det(lambda r: flow(r, c[:1]), x[:1]),
                               atol=1e-8, rtol=0)
    assert (flow.log_prob(x, c) - flow.log_prob(x, c.roll(1, dims=1))).abs().min() > 0
    assert flow.sample(2, torch.Generator().manual_seed(0), context=c[:2]).shape == (2, x.shape[1])


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


def test_conditional_unet_sees_the_context_without_a_tangent() -> None:
    """A label's embedding joins the time embedding: the output moves with the context, and
    the forward-mode JVP and divergence given it still equal autograd's."""
    net = UNet((1, 4, 4), channels=4, time_embedding=4, levels=1, context_features=3).double()
    perturb(net, 0.1)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    t, e = torch.rand(3, generator=gen, dtype=torch.float64), torch.randn(3, 16, generator=gen,
                                                                          dtype=torch.float64)
    c = torch.eye(3, dtype=torch.float64)
    assert (net(x, t, c) - net(x, t, c.roll(1, 0))).abs().max() > 1e-6
    jac = torch.stack([torch.autograd.functional.jacobian(
        lambda r, i=i: net(r[None], t[i:i + 1], c[i:i + 1])[0], x[i]) for i in range(3)])
    out, jvp = net.jvp(x, t, e, c)
    _, div = net.divergence(x, t, c)
    torch.testing.assert_close(out, net(x, t, c))
    torch.testing.assert_close(jvp, torch.einsum("bij,bj->bi", jac, e), atol=1e-10, rtol=0)
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(-1), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="needs a context of 3 columns"):
        net(x, t)


@pytest.mark.parametrize("kind", ["ddpm_image", "cfm_image", "otcfm_image"])
def test_conditional_image_models_train_on_labels(kind: str) -> None:
    """Every image ODE type takes a label (with dropout for guidance) and trains on it."""
    cfg = TINY.model_copy(update={"image_shape": (1, 4, 4), "scales": 1,
                                  "context_features": 3, "cfg_dropout": 0.2})
    model = build_model(kind, 16, cfg)
    x, c = images(8, (16,), torch.float32), torch.eye(3)[[0, 1, 2, 0, 1, 2, 0, 1]]
    model.training_loss(x, torch.Generator().manual_seed(0), context=c).backward()
    assert all(p.grad is not None for p in model.parameters())
    v, div = model.velocity_div(x, torch.full((8,), 0.5), context=c)
    assert v.shape == (8, 16) and div.shape == (8,)


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


def test_image_types_need_a_shape() -> None:
    image_types = [kind for kind, spec in MODEL_TYPES.items() if spec.image]
    assert len(image_types) == 6
    for kind in image_types:
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


# -- brief training on digits, ONNX parity, served end to end --------------------------------

BITS_PER_DIM_BOUND = 3.0
"""After brief training a tiny Glow must beat 3.0 bits/dim on the digits test split: uniform
noise over 17 levels scores log2 17 = 4.09, an independent Gaussian per pixel 2.89
(docs/BENCHMARKS.md, "images"). From below, bits/dim of integer pixels is positive: the
dequantized density integrates to at most 1 over each pixel's unit cell, so its log is a
lower bound on a log-probability, which is <= 0. Dropping the dequantization's log-det
(-D log 17) would report 4.09 bits/dim fewer, below 0 for this model."""
TOL = 1e-4


@pytest.fixture(scope="module")
def glow_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Glow trained briefly on digits_image, and its ONNX export."""
    from training.config import TrainConfig
    from training.export import export_checkpoint
    from training.fit import fit

    root = tmp_path_factory.mktemp("images")
    cfg = TINY.model_copy(update={"transforms": 2, "scales": 2})
    ckpt = fit("glow_image", "digits_image", out=root / "ckpt", model_cfg=cfg,
               train_cfg=TrainConfig(steps=120, batch_size=64, eval_every=120, lr=3e-3,
                                     warmup_steps=10, progress=False))
    export_checkpoint(ckpt, root / "models" / "digits-glow", formats=("onnx",))
    return root / "ckpt", root / "models" / "digits-glow"


def test_glow_bits_per_dim_on_digits_after_brief_training(glow_digits) -> None:
    from training.checkpoint import load_checkpoint
    from training.evaluate import evaluate

    ckpt = load_checkpoint(glow_digits[0])
    assert ckpt.config.model.image_shape == (1, 8, 8)
    assert ckpt.config.preprocess.logit_alpha is not None and ckpt.config.preprocess.dequantize
    report = evaluate(ckpt, samples=0)
    assert 0 < report["bits_per_dim"] < BITS_PER_DIM_BOUND, report


def test_glow_onnx_parity_and_image_manifest(glow_digits) -> None:
    from artifact.manifest import read_manifest
    from service.runtime import open_runtime
    from training.checkpoint import load_checkpoint
    from training.evaluate import checkpoint_splits

    ckpt = load_checkpoint(glow_digits[0])
    manifest = read_manifest(glow_digits[1])
    assert manifest.event_shape == [1, 8, 8] and manifest.dim == 64
    rt = open_runtime(glow_digits[1], runtime="onnx")
    x = checkpoint_splits(ckpt).test[:9]
    with torch.no_grad():  # eval mode: midpoint dequantization, as in the exported graph
        u, ladj = ckpt.preprocessor(torch.as_tensor(x, dtype=torch.float32))
        eager = (ckpt.model.log_prob(u) + ladj).double().numpy()
        z = torch.randn(5, 64, generator=torch.Generator().manual_seed(4))
        eager_x = ckpt.preprocessor.inverse(ckpt.model.inverse(z)).numpy()
    assert np.abs(rt.log_likelihood(x).log_prob - eager).max() < TOL
    (u_served,) = rt.call("sample", z.numpy())
    (x_served,) = rt.call("postprocess", u_served)
    assert np.abs(x_served - eager_x).max() < TOL


def test_unet_forward_mode_jvp_exports_to_onnx(tmp_path: Path) -> None:
    """The Hutchinson graph (the image default); the exact-divergence graph runs the same
    tangent arithmetic with D tangents and is checked against autograd above."""
    import onnxruntime as ort

    from artifact.manifest import TensorSpec
    from training.export import _export_onnx
    from training.graphs import VelocityJvpGraph

    cfg = TINY.model_copy(update={"image_shape": (1, 4, 4), "scales": 1})
    model = build_model("cfm_image", 16, cfg).eval()
    perturb(model, 0.1)
    x, e = images(4, (16,), torch.float32), images(4, (16,), torch.float32).sign()
    t = torch.linspace(0.1, 0.9, 4)
    inputs = [TensorSpec(name="x", shape=["batch", 16]), TensorSpec(name="time", shape=["batch"]),
              TensorSpec(name="probe", shape=["batch", 16])]
    outputs = [TensorSpec(name="velocity", shape=["batch", 16]),
               TensorSpec(name="jvp", shape=["batch", 16])]
    module, path = VelocityJvpGraph(model), tmp_path / "velocity_jvp.onnx"
    _export_onnx(module, inputs, outputs, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    served = session.run(None, {"x": x.numpy(), "time": t.numpy(), "probe": e.numpy()})
    with torch.no_grad():
        eager = module(x, t, e)
    for got, want in zip(served, eager, strict=True):
        assert np.abs(got - want.numpy()).max() < TOL


def test_image_rows_served_end_to_end(glow_digits, tmp_path: Path) -> None:
    import shutil

    from service.devserver import running_server
    from service.runtime import open_runtime
    from training.data import load_data

    models = tmp_path / "served"
    shutil.copytree(glow_digits[1], models / "digits-glow")
    images_ = load_data("digits_image").x[:3]
    nested = images_.reshape(3, 1, 8, 8).tolist()
    expected = open_runtime(glow_digits[1], runtime="onnx").log_likelihood(images_).log_prob
    with running_server(models, tmp_path / "server.log") as server:
        status, raw = server.get("/models")
        assert status == 200 and json.loads(raw)["models"][0]["shape"] == [1, 8, 8]
        status, flat = server.post("/log_likelihood", {"model": "digits-glow",
                                                       "x": images_.tolist()})
        assert status == 200, flat
        status, out = server.post("/log_likelihood", {"model": "digits-glow", "x": nested})
        assert status == 200, out
        np.testing.assert_allclose(out["log_likelihood"], flat["log_likelihood"])
        np.testing.assert_allclose(out["log_likelihood"], expected, atol=1e-3)
        mixed = [nested[0], images_[1].tolist()]  # both forms in one request
        status, out = server.post("/anomaly_score", {"model": "digits-glow", "x": mixed})
        assert status == 200 and len(out["scores"]) == 2, out
        status, out = server.post("/log_likelihood", {"model": "digits-glow",
                                                      "x": [nested[0][0]]})
        assert status == 400 and "[1, 8, 8]" in out["error"], out
        status, out = server.post("/sample", {"model": "digits-glow", "n": 4, "seed": 1})
        assert status == 200 and np.asarray(out["samples"]).shape == (4, 64)
