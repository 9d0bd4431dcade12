"""A residual flow above 64 dims (training/flows/residual.py): its served log-det is the
power series cut after ``series_terms`` terms with Hutchinson's traces. The served mean over
many probes equals the exact log-density (``torch.func.jacfwd`` + ``slogdet``) within 3
standard errors; the cut's bias stays below the manifest's bound; eager, ONNX and TorchScript
agree on each probe's estimate; a row's answer does not depend on its batch; HTTP and gRPC
answer what the runtime does, and `/models` says the model serves ``hutchinson``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from artifact.manifest import read_manifest
from service.devserver import running_server
from service.runtime import open_runtime
from training.checkpoint import Checkpoint
from training.config import ModelConfig, TrainConfig
from training.flows.residual import EXACT_MAX_DIM, ResidualBlock, series_truncation_bound
from training.graphs import ProbeLogProbGraph

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIM, ROWS, PROBES = EXACT_MAX_DIM + 16, 5, 64
TERMS = 8


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """A tiny two-block resflow on 80-dim correlated rows. A few training steps leave g
    near its zero start, so its weights are then set to ``W_out = W_in^T`` (normalised
    after): ``J = W_in^T diag(slope) W_in`` is positive semi-definite, and each block's
    log-det is several nats, not the near-zero trace of a random product."""
    from training.fit import fit

    root = tmp_path_factory.mktemp("resflow80")
    rng = np.random.default_rng(0)
    rows = np.tanh(rng.normal(size=(600, DIM)) @ rng.normal(size=(DIM, DIM)) / DIM**0.5)
    np.save(root / "rows.npy", rows)
    ckpt = fit("resflow", str(root / "rows.npy"), out=root / "ckpt",
               model_cfg=ModelConfig(hidden_features=32, hidden_layers=1, transforms=2,
                                     series_terms=TERMS, fixed_point_iterations=20),
               train_cfg=TrainConfig(steps=5, batch_size=64, eval_every=5, progress=False,
                                     warmup_steps=1))
    torch.manual_seed(1)
    with torch.no_grad():
        for block in _blocks(ckpt.model):
            first, last = block.linears
            first.weight.copy_(torch.randn_like(first.weight))
            last.weight.copy_(first.weight.T)
            for linear in block.linears:
                linear.power_iteration(500)
    return ckpt


@pytest.fixture(scope="module")
def artifact(trained: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.export import export_checkpoint

    out = tmp_path_factory.mktemp("served80") / "wide-resflow"
    export_checkpoint(trained, out, formats=("onnx", "torchscript"))
    return out


def _blocks(model: torch.nn.Module) -> list[ResidualBlock]:
    return [t for t in model.transforms if isinstance(t, ResidualBlock)]


def _x() -> np.ndarray:
    rng = np.random.default_rng(5)
    return np.tanh(rng.normal(size=(ROWS, DIM)))


def _exact_model_log_prob(model: torch.nn.Module, u: np.ndarray) -> np.ndarray:
    """``log N(f(u)) + log |det df/du|`` by ``jacfwd`` of the whole map and ``slogdet``."""
    flow = model.double().eval()

    def forward(v: torch.Tensor) -> torch.Tensor:
        x = v[None]
        for t in flow.transforms:
            x = x + t.g(x) if isinstance(t, ResidualBlock) else t(x)[0]
        return x[0]

    out = []
    with torch.no_grad():
        for row in torch.as_tensor(u, dtype=torch.float64):
            z = forward(row)
            _, logdet = torch.linalg.slogdet(torch.func.jacfwd(forward)(row))
            out.append(float(-0.5 * (z @ z) - 0.5 * DIM * np.log(2 * np.pi) + logdet))
    model.float()
    return np.array(out)


def test_manifest_and_card_say_the_series_and_its_bound(artifact: Path,
                                                        trained: Checkpoint) -> None:
    m = read_manifest(artifact)
    assert m.defaults.method == "hutchinson" and m.log_det is not None
    assert m.log_det.terms == TERMS and len(m.log_det.lipschitz) == 2
    assert all(0.5 < lip < 1 for lip in m.log_det.lipschitz), m.log_det  # the weights spread
    expected = sum(series_truncation_bound(DIM, lip, TERMS) for lip in m.log_det.lipschitz)
    assert m.log_det.truncation_bound == pytest.approx(expected)
    assert [t.name for t in m.graphs["log_prob"]["onnx"].inputs] == ["u", "probe"]
    # each block's bound holds at random points: the Jacobian's largest singular value
    u = torch.randn(32, DIM, generator=torch.Generator().manual_seed(2))
    for block, lip in zip(_blocks(trained.model), m.log_det.lipschitz, strict=True):
        with torch.no_grad():
            _, jac = block.jacobian(u)
        assert float(torch.linalg.matrix_norm(jac.double(), 2).max()) <= lip * (1 + 1e-5)


def test_served_mean_over_probes_equals_the_exact_log_density(artifact: Path,
                                                              trained: Checkpoint) -> None:
    rt = open_runtime(artifact, runtime="onnx")
    x = _x()
    u, ladj = rt.call("preprocess", x)
    exact = _exact_model_log_prob(trained.model, u) + ladj
    answers = [rt.log_likelihood(x, probes=PROBES, seed=s) for s in range(8)]
    assert all(a.method == "hutchinson" for a in answers)
    mean = np.mean([a.log_prob for a in answers], 0)
    se = np.sqrt(np.mean([a.std_error**2 for a in answers], 0) / len(answers))
    assert (se > 1e-3).all(), se  # the probes matter: the check is not void
    assert (np.abs(mean - exact) < 3 * se).all(), ((mean - exact) / se, se)


def test_truncation_bias_is_below_the_reported_bound(artifact: Path,
                                                     trained: Checkpoint) -> None:
    bound = read_manifest(artifact).log_det.truncation_bound
    flow = trained.model.double()
    x = torch.as_tensor(_x(), dtype=torch.float64)
    bias, bias_one_term, log_det = np.zeros(ROWS), np.zeros(ROWS), np.zeros(ROWS)
    with torch.no_grad():
        for t in flow.transforms:
            if not isinstance(t, ResidualBlock):
                x = t(x)[0]
                continue
            for r, row in enumerate(x):
                jac = torch.func.jacfwd(t.g)(row)
                exact = torch.linalg.slogdet(torch.eye(DIM, dtype=jac.dtype) + jac)[1]
                powers = [torch.linalg.matrix_power(jac, k) for k in range(1, TERMS + 1)]
                series = [(-1) ** (k + 1) * torch.trace(p) / k
                          for k, p in enumerate(powers, start=1)]
                log_det[r] += float(exact)
                bias[r] += abs(float(exact - sum(series)))
                bias_one_term[r] += abs(float(exact - series[0]))
            x = x + t.g(x)
    trained.model.float()
    assert (log_det > 2).all(), log_det  # nats: the series has work to do
    assert (bias <= bound).all(), (bias, bound)
    # the bound's formula holds where the cut is coarse and its bias large
    lips = read_manifest(artifact).log_det.lipschitz
    coarse = sum(series_truncation_bound(DIM, lip, 1) for lip in lips)
    assert bias_one_term.min() > 100 * bias.max() and (bias_one_term <= coarse).all()


def test_each_probe_estimate_agrees_eager_onnx_torchscript(artifact: Path,
                                                           trained: Checkpoint) -> None:
    rng = np.random.default_rng(7)
    u = rng.normal(size=(6, DIM))
    e = np.sign(rng.normal(size=(6, DIM)))
    with torch.no_grad():
        eager = ProbeLogProbGraph(trained.model.frozen())(
            torch.as_tensor(u, dtype=torch.float32), torch.as_tensor(e, dtype=torch.float32))
        z = torch.as_tensor(rng.normal(size=(6, DIM)), dtype=torch.float32)
        drawn = trained.model.frozen().inverse(z)
    for fmt in ("onnx", "torchscript"):
        rt = open_runtime(artifact, runtime=fmt)
        (lp,) = rt.call("log_prob", u, e)
        np.testing.assert_allclose(lp, eager.numpy(), rtol=1e-5, atol=1e-4, err_msg=fmt)
        (sample,) = rt.call("sample", z.numpy())
        np.testing.assert_allclose(sample, drawn.numpy(), atol=1e-4, err_msg=fmt)


def test_a_rows_answer_does_not_depend_on_its_batch(artifact: Path) -> None:
    rt = open_runtime(artifact)
    x = _x()
    whole = rt.log_likelihood(x, probes=16, seed=3)
    for r in range(ROWS):
        alone = rt.log_likelihood(x[r:r + 1], probes=16, seed=3, rows=np.array([r]))
        np.testing.assert_allclose(alone.log_prob, whole.log_prob[r:r + 1], rtol=1e-6)
        np.testing.assert_allclose(alone.std_error, whole.std_error[r:r + 1], rtol=1e-5)
    other = rt.log_likelihood(x, probes=16, seed=4)
    assert not np.allclose(other.log_prob, whole.log_prob)  # the seed keys the probes


def test_http_and_grpc_answer_what_the_runtime_does(artifact: Path, tmp_path: Path) -> None:
    rt = open_runtime(artifact)
    x = _x()
    direct = rt.log_likelihood(x, probes=16, seed=9)
    with running_server(artifact.parent, tmp_path / "server.log",
                        env={"GENSERVE_MAX_LATENCY_MS": "30000"}) as server:
        status, out = server.post("/models", {})
        assert status == 200, out
        card = next(c for c in out["models"] if c["name"] == "wide-resflow")
        assert card["defaults"]["method"] == "hutchinson"
        assert card["log_det"] == rt.manifest.log_det.model_dump()

        body = {"model": "wide-resflow", "x": x.tolist(), "probes": 16, "seed": 9}
        status, out = server.post("/log_likelihood", body)
        assert status == 200, out
        assert out["method"] == "hutchinson"
        np.testing.assert_allclose(out["log_likelihood"], direct.log_prob, rtol=1e-6)
        np.testing.assert_allclose(out["std_error"], direct.std_error, rtol=1e-5)

        client = triton.InferenceServerClient(server.grpc_address)
        try:
            tensor = triton.InferInput("x", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x.astype(np.float32))
            got = client.infer("wide-resflow.log_likelihood", [tensor],
                               parameters={"probes": 16, "seed": 9})
        finally:
            client.close()
        np.testing.assert_array_equal(got.as_numpy("log_likelihood"), out["log_likelihood"])
        np.testing.assert_array_equal(got.as_numpy("std_error"), out["std_error"])

        status, out = server.post("/log_likelihood", {**body, "probes": 65})
        assert status == 400 and "probes" in out["error"], out
        status, out = server.post("/log_likelihood", {**body, "method": "exact"})
        assert status == 400 and "its likelihood is hutchinson" in out["error"], out
