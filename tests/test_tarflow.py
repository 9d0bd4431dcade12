"""TarFlow (training/flows/tarflow.py): token layouts, passes per sample, the denoising
score, ONNX parity of the image model's graphs, and bad token or patch sizes at `train`.
Invertibility and the log-det against the brute-force Jacobian are in the zoo's contract
tests (tests/test_flows.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cli import main
from training.config import ModelConfig
from training.flows.tarflow import TarBlock, patch_order
from training.registry import build_model

CFG = ModelConfig(hidden_features=16, hidden_layers=1, transforms=2, heads=2, token_size=2,
                  patch_size=2)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturbed(kind: str, dim: int, cfg: ModelConfig):
    torch.manual_seed(0)
    flow = build_model(kind, dim, cfg).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.2 * torch.randn(p.shape, dtype=p.dtype))
    return flow.eval()


def test_patch_order_lists_each_patch_channel_row_column() -> None:
    order = patch_order((2, 4, 4), 2)
    assert sorted(order.tolist()) == list(range(32))
    image = torch.arange(32).reshape(2, 4, 4)
    first = image[:, 0:2, 0:2].reshape(-1)  # top-left patch, both channels
    second = image[:, 0:2, 2:4].reshape(-1)
    assert order[:8].tolist() == first.tolist() and order[8:16].tolist() == second.tolist()


def test_sampling_takes_one_pass_per_token_per_block() -> None:
    flow = _perturbed("tarflow", 8, CFG)  # 4 tokens of 2
    calls = []
    for block in flow.transforms:
        assert isinstance(block, TarBlock)
        block.net.register_forward_hook(lambda net, args, out: calls.append(args[0].shape[1]))
    with torch.no_grad():
        z = torch.randn(5, 8, dtype=torch.float64)
        x = flow.inverse(z)
    assert calls == [1] * (4 * 2)  # the KV cache: each pass reads only the newest token
    torch.testing.assert_close(flow(x)[0], z, atol=1e-10, rtol=0)


def test_kv_cached_sample_graph_equals_the_uncached_one_in_onnx(tmp_path) -> None:
    import onnxruntime as ort

    from training.export import _export_onnx

    flow = _perturbed("tarflow", 8, CFG).float()  # 4 tokens of 2, two blocks
    z = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    answers = {}
    for cached in (True, False):
        frozen = flow.frozen()
        for block in frozen.transforms:
            block.kv_cache = cached
        graph = frozen.export_graphs()["sample"]
        path = tmp_path / f"sample-{cached}.onnx"
        _export_onnx(graph.module, graph.inputs, graph.outputs, path)
        (answers[cached],) = ort.InferenceSession(str(path)).run(None, {"z": z})
    with torch.no_grad():
        eager = flow.double().inverse(torch.as_tensor(z, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(answers[True], answers[False], rtol=0, atol=1e-4)
    np.testing.assert_allclose(answers[True], eager, rtol=0, atol=1e-4)
    assert np.abs(answers[True] - z).max() > 0.1  # the flow moves the noise: not void


def test_image_tarflow_is_invertible_with_exact_log_det() -> None:
    cfg = CFG.model_copy(update={"image_shape": (2, 4, 4)})
    flow = _perturbed("tarflow_image", 32, cfg)
    x = torch.randn(3, 32, dtype=torch.float64)
    z, ladj = flow(x)
    torch.testing.assert_close(flow.inverse(z), x, atol=1e-10, rtol=0)
    jac = torch.autograd.functional.jacobian(lambda r: flow(r[None])[0][0], x[0])
    torch.testing.assert_close(ladj[0], torch.linalg.slogdet(jac).logabsdet, atol=1e-8, rtol=0)


def test_denoising_score_is_the_gradient_of_log_p() -> None:
    flow = _perturbed("tarflow", 4, CFG.model_copy(update={"noise_std": 0.1}))
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    (exact,) = torch.autograd.grad(flow.log_prob(x).sum(), x)
    with torch.no_grad():
        score = flow.score(x)
        denoised = flow.denoise(x)
    torch.testing.assert_close(score, exact, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(denoised, x + 0.01 * score)
    with torch.no_grad():  # sampling returns the denoised inverse
        z = torch.randn(6, 4, dtype=torch.float64)
        raw = super(type(flow), flow).inverse(z)[:, flow.unorder]
        torch.testing.assert_close(flow.inverse(z), flow.denoise(raw))


def test_image_tarflow_onnx_graphs_equal_eager(tmp_path) -> None:
    from service.runtime import open_runtime
    from training.config import TrainConfig
    from training.export import export_checkpoint
    from training.fit import fit

    ckpt = fit("tarflow_image", "digits_image", rows=300,
               model_cfg=ModelConfig(hidden_features=16, hidden_layers=1, transforms=2,
                                     patch_size=4, noise_std=0.05),
               train_cfg=TrainConfig(steps=5, batch_size=64, eval_every=5, progress=False))
    export_checkpoint(ckpt, tmp_path / "m", calibration=False)
    rt = open_runtime(tmp_path / "m")
    rng = np.random.default_rng(0)
    u = rng.normal(size=(5, 64))
    z = rng.normal(size=(5, 64))
    with torch.no_grad():
        eager_lp = ckpt.model.log_prob(torch.as_tensor(u, dtype=torch.float32)).numpy()
        eager_u = ckpt.model.inverse(torch.as_tensor(z, dtype=torch.float32)).numpy()
    (lp,) = rt.call("log_prob", u)
    (sample,) = rt.call("sample", z)
    np.testing.assert_allclose(lp, eager_lp, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(sample, eager_u, rtol=1e-4, atol=1e-4)
    # the training noise is in the manifest and on the /models card (log-likelihoods are of
    # the noised data; samples are denoised by one Tweedie step)
    from service.models import model_info

    assert rt.manifest.noise is not None and rt.manifest.noise.std == 0.05
    assert model_info(rt).noise == {"std": 0.05, "denoise": "tweedie"}


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "tarflow", "--data", "moons", "--token-size", "3"],
     "token size 3 does not divide the dimension 2"),
    (["--model", "tarflow_image", "--data", "digits_image", "--patch-size", "3"],
     "patch size 3 does not divide the 8x8 image"),
    (["--model", "tarflow", "--data", "moons", "--hidden", "15", "--heads", "2"],
     "not divisible by 2 attention heads"),
])
def test_bad_token_or_patch_size_stops_train_with_one_line(args, message, tmp_path,
                                                           capsys) -> None:
    out = tmp_path / "o"
    assert main(["train", *args, "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
    assert not out.exists()
