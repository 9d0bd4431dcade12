"""Discrete flow matching: the closed-form denoiser of a small token space, the ELBO against
the exact log-likelihood by enumeration, the CTMC sampler, export parity, and serving over HTTP
and gRPC with integer rows only.

On a space of ``V^D = 27`` rows with known probabilities ``p``, the optimal denoiser of the
masked source is the conditional ``p(x^i | unmasked tokens)`` (by enumeration). The masked
model's continuous-time generative process unmasks one token at a time in a uniformly random
order, so its exact likelihood is ``mean_orders prod_j p(x_{o_j} | x_{o_<j})`` (3! orders),
and the ELBO is ``mean_orders sum_j log p(...)``: Jensen's inequality puts it below.

The uniform source's model is a CTMC over the 27 rows from the uniform law at ``t = 1`` to
``t_eps``, then one redraw of every token: its exact law comes from the Kolmogorov forward
equation over the 27 states (:func:`ctmc_law`), and its optimal denoiser is the posterior
``p(x^i | x_t)`` under ``q_t(x_t | x) = prod_i ((1 - t) delta + t / V)`` (by enumeration).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from numerics.discrete import ELBO_T_MIN, masked_elbo, uniform_elbo
from service.runtime import SeededRows, open_runtime
from training.checkpoint import DataSummary
from training.config import ModelConfig, TrainConfig
from training.data import load_data
from training.dfm import DiscreteFlowMatching
from training.fit import fit_arrays
from training.registry import build_model

V, D = 3, 3
STATES = np.array(list(itertools.product(range(V), repeat=D)), dtype=np.float64)  # (27, 3)
P = np.random.default_rng(0).dirichlet(np.full(len(STATES), 0.5)) + 1e-3
P /= P.sum()  # a structured law, every row possible

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def oracle_log_probs(x: np.ndarray) -> np.ndarray:
    """``log p(x^i | unmasked tokens of x)``, ``(batch, D, V)``, by enumerating ``STATES``."""
    out = np.empty((len(x), D, V))
    for b, row in enumerate(x):
        seen = row < V
        agree = (STATES[:, seen] == row[seen]).all(1)
        for i in range(D):
            w = np.array([P[agree & (STATES[:, i] == v)].sum() for v in range(V)])
            with np.errstate(divide="ignore"):  # a seen token's other values: log 0
                out[b, i] = np.log(w / w.sum())
    return out


def exact_and_elbo(log_probs, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The masked model's exact log-likelihood and its ELBO, both by enumerating orders."""
    exact, elbo = [], []
    for row in x:
        terms = []
        for order in itertools.permutations(range(D)):
            cur, total = np.full(D, float(V)), 0.0
            for i in order:
                total += float(log_probs(cur[None], np.array([0.5]))[0, i, int(row[i])])
                cur[i] = row[i]
            terms.append(total)
        terms = np.array(terms)
        exact.append(np.log(np.mean(np.exp(terms))))
        elbo.append(terms.mean())
    return np.array(exact), np.array(elbo)


def fit_toy(seed: int, source: str) -> DiscreteFlowMatching:
    """A DFM with ``source`` trained on 6000 draws of ``P`` (seed ``seed``), 1500 steps."""
    rng = np.random.default_rng(seed)
    x = STATES[rng.choice(len(STATES), size=6000, p=P)]
    summary = DataSummary(name="toy", source="generated", rows=6000, dim=D, levels=V,
                          data_seed=seed, split_seed=seed, mean=[0.0] * D, std=[1.0] * D)
    ckpt = fit_arrays("dfm", x[:5000], x[5000:], data=summary,
                      model_cfg=ModelConfig(hidden_features=64, hidden_layers=2, vocab=V,
                                            source=source),
                      train_cfg=TrainConfig(steps=1500, batch_size=256, lr=3e-3,
                                            eval_every=500, warmup_steps=20, progress=False))
    return ckpt.model


@pytest.fixture(scope="module")
def trained() -> DiscreteFlowMatching:
    return fit_toy(1, "mask")


def _torch_log_probs(model: DiscreteFlowMatching):
    def log_probs(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model.denoiser(torch.as_tensor(x, dtype=torch.float32),
                                  torch.as_tensor(t, dtype=torch.float32)).double().numpy()
    return log_probs


def test_the_oracle_elbo_is_the_exact_log_likelihood() -> None:
    """With the true conditionals every order gives log p(x): the bound is tight."""
    exact, elbo = exact_and_elbo(lambda x, t: oracle_log_probs(x), STATES)
    np.testing.assert_allclose(exact, np.log(P), atol=1e-9)
    np.testing.assert_allclose(elbo, np.log(P), atol=1e-9)
    # the estimator with its exact time integral, random orders: unbiased for it
    est = masked_elbo(lambda x, t: oracle_log_probs(x), STATES, V, probes=3, seed=4)
    np.testing.assert_allclose(est.log_prob, np.log(P), atol=1e-9)


def test_the_trained_denoiser_approaches_the_closed_form_one(trained) -> None:
    masks = np.array(list(itertools.product([False, True], repeat=D)))
    rows = np.array([np.where(m, V, s) for s in STATES for m in masks[1:]], dtype=np.float64)
    want = oracle_log_probs(rows)
    got = _torch_log_probs(trained)(rows, np.full(len(rows), 0.5))
    masked = rows == V
    weights = np.repeat(P, len(masks) - 1)[:, None].repeat(D, 1)[masked]
    with np.errstate(invalid="ignore"):  # unmasked tokens: -inf - -inf, dropped by the mask
        kl = (np.exp(want) * (want - got)).sum(-1)[masked]
        uniform = (np.exp(want) * (want - np.log(1 / V))).sum(-1)[masked]
    # probability-weighted KL to the closed form, next to a uniform denoiser's (0.12)
    trained_kl = (kl * weights).sum() / weights.sum()
    uniform_kl = (uniform * weights).sum() / weights.sum()
    assert trained_kl < 0.03 and trained_kl < 0.25 * uniform_kl, (trained_kl, uniform_kl)


def test_the_elbo_bounds_the_exact_log_likelihood_within_a_margin(trained) -> None:
    exact, elbo = exact_and_elbo(_torch_log_probs(trained), STATES)
    assert (elbo <= exact + 1e-9).all()
    gap = float((P * (exact - elbo)).sum())  # expected gap under the data
    assert 0 <= gap < 0.1, gap
    # the model's estimator agrees with the enumerated ELBO within its standard error
    res = trained.log_prob_with_error(torch.as_tensor(STATES, dtype=torch.float32), probes=32)
    z = (res.log_prob.double().numpy() - elbo) / res.std_error.double().numpy()
    assert np.mean(np.abs(z) < 3.5) > 0.9
    # and the data's log-likelihood under the model is near the truth
    assert abs(float((P * (exact - np.log(P))).sum())) < 0.1


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_the_ctmc_sampler_gives_integer_rows_from_the_law(trained, source: str) -> None:
    model = trained if source == "mask" else build_model(
        "dfm", D, ModelConfig(hidden_features=16, vocab=V, source="uniform"))
    x = model.sample(3000, torch.Generator().manual_seed(0), steps=16)
    assert ((x >= 0) & (x < V) & (x == x.round())).all()
    again = model.sample(3000, torch.Generator().manual_seed(0), steps=16)
    torch.testing.assert_close(x, again, rtol=0, atol=0)
    if source == "mask":
        index = (x.numpy() @ (V ** np.arange(D)[::-1])).astype(int)
        freq = np.bincount(index, minlength=len(STATES)) / len(x)
        assert 0.5 * np.abs(freq - P).sum() < 0.08  # total variation to the law


# --- the uniform source's ELBO -----------------------------------------------------------------


def q_path(z: np.ndarray, t: float) -> np.ndarray:
    """``q_t(z | x)`` for rows ``z: (n, D)`` and every state ``x``: ``(n, 27)``."""
    same = z[:, None, :] == STATES[None]
    return np.where(same, 1 - t + t / V, t / V).prod(-1)


STATE_ONE_HOT = (STATES[..., None] == np.arange(V)).astype(np.float64)  # (27, D, V)


def uniform_oracle(z: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The uniform source's optimal denoiser ``log p(x^i | z, t)``, ``(batch, D, V)``."""
    w = np.stack([P * q_path(row[None], float(tt))[0] for row, tt in zip(z, t, strict=True)])
    post = np.einsum("bs,sdv->bdv", w, STATE_ONE_HOT)
    return np.log(post / post.sum(-1, keepdims=True))


def ctmc_law(log_probs, t_eps: float = ELBO_T_MIN, steps: int = 400) -> np.ndarray:
    """``log p(x)`` of every state under the uniform source's model: the Kolmogorov forward
    equation ``dp/du = -p A~`` in ``u = ln t`` (``A~ = t A``: off-diagonal ``p(y^i | z, t)`` for
    ``y`` one token away from ``z``) by RK4 from the uniform law at ``t = 1`` to ``t_eps``,
    then the final redraw ``p(x) = sum_z p_eps(z) prod_i p(x^i | z, t_eps)``."""
    n = len(STATES)
    one_away = (STATES[:, None, :] != STATES[None]).sum(-1) == 1  # (z, y)
    where = (STATES[:, None, :] != STATES[None]).argmax(-1)  # the token that differs

    zi, yi = np.arange(n)[:, None], np.arange(n)[None, :]
    target = STATES[yi, where].astype(int)  # y's value at that token

    def generator(t: float) -> np.ndarray:
        rate = np.exp(log_probs(STATES, np.full(n, t)))[zi, where, target]  # (z, y)
        a = np.where(one_away, rate, 0.0)
        return a - np.diag(a.sum(1))

    p, h = np.full(n, 1.0 / n), math.log(t_eps) / steps
    for k in range(steps):
        u = k * h
        k1 = -p @ generator(math.exp(u))
        k2 = -(p + h / 2 * k1) @ generator(math.exp(u + h / 2))
        k3 = -(p + h / 2 * k2) @ generator(math.exp(u + h / 2))
        k4 = -(p + h * k3) @ generator(math.exp(u + h))
        p = p + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    redraw = np.exp(np.einsum("zdv,xdv->zx", log_probs(STATES, np.full(n, t_eps)),
                              STATE_ONE_HOT))  # prod_i p(x^i | z, t_eps)
    return np.log(p @ redraw)


def test_the_uniform_elbo_bounds_the_oracle_ctmc() -> None:
    """The exact denoiser: the Kolmogorov law at ``t_eps`` is the path's marginal, the model
    is the data law to 2e-3 nats, the estimator agrees with the bound by enumeration and
    quadrature, and the bound sits below by 0.86 nats on average (the conditional path jumps
    only to the data token; the model's chain also leaves it and comes back)."""
    law = ctmc_law(uniform_oracle)
    lp = uniform_oracle(STATES, np.full(len(STATES), ELBO_T_MIN))
    marginal = q_path(STATES, ELBO_T_MIN) @ P  # p_eps(z), the path's marginal
    redraw = np.exp(np.einsum("zdv,xdv->zx", lp, STATE_ONE_HOT))
    np.testing.assert_allclose(law, np.log(marginal @ redraw), atol=1e-7)
    np.testing.assert_allclose(law, np.log(P), atol=2e-3)  # the redraw at t_eps: a blur
    # the bound by enumeration over z and Gauss-Legendre in ln t
    nodes, weights = np.polynomial.legendre.leggauss(64)
    span = -math.log(ELBO_T_MIN)
    bound = np.zeros(len(STATES))
    for node, weight in zip(nodes, weights, strict=True):
        t = math.exp(-span * (1 - node) / 2)
        lp_t = uniform_oracle(STATES, np.full(len(STATES), t))  # (z, D, V)
        log_px = np.einsum("zdv,xdv->zxd", lp_t, STATE_ONE_HOT)  # log p(x^i | z)
        p_z = np.exp(np.einsum("zdv,zdv->zd", lp_t, STATE_ONE_HOT))
        wrong = STATES[:, None, :] != STATES[None]
        g = (np.where(wrong, 1 + log_px, 0.0) - (1 - p_z)[:, None, :]).sum(-1)  # (z, x)
        bound += weight * span / 2 * (q_path(STATES, t) * g).sum(0)
    bound += (q_path(STATES, ELBO_T_MIN) * np.einsum("zdv,xdv->zx", lp, STATE_ONE_HOT)).sum(0)
    assert (bound < law).all()
    gap = float((P * (law - bound)).sum())
    assert 0.8 < gap < 0.9, gap
    est = uniform_elbo(uniform_oracle, STATES, V, probes=48, seed=3)
    z = (est.log_prob - bound) / est.std_error
    assert np.abs(z).max() < 4 and abs(z.mean()) < 0.8, z
    assert est.nfe == 48 * 17


@pytest.fixture(scope="module")
def trained_uniform() -> DiscreteFlowMatching:
    return fit_toy(2, "uniform")


def test_the_uniform_elbo_bounds_the_trained_models_own_ctmc(trained_uniform) -> None:
    """A trained model: the estimated ELBO lies below its own chain's exact log-likelihood
    on every row (within 3.5 standard errors), by a probability-weighted 1.2 nats or less, and
    that chain's law is near the data's."""
    log_probs = _torch_log_probs(trained_uniform)
    law = ctmc_law(log_probs)
    np.testing.assert_allclose(np.exp(law).sum(), 1.0, atol=1e-6)
    res = trained_uniform.log_prob_with_error(torch.as_tensor(STATES, dtype=torch.float32),
                                              probes=32, seed=1)
    elbo, se = res.log_prob.double().numpy(), res.std_error.double().numpy()
    assert (elbo <= law + 3.5 * se).all(), (elbo - law) / se
    gap = float((P * (law - elbo)).sum())
    assert 0.5 < gap < 1.2, gap  # 1.03 measured; the exact denoiser's: 0.86
    cross = float((P * (np.log(P) - law)).sum())  # KL(data || model's chain) >= 0
    assert 0 <= cross < 0.1, cross


def test_uniform_source_trains() -> None:
    model = build_model("dfm", D, ModelConfig(hidden_features=16, vocab=V, source="uniform"))
    x = torch.as_tensor(STATES[:8], dtype=torch.float32)
    loss = model.training_loss(x, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    res = model.log_prob_with_error(x, probes=2, steps=4)
    assert res.nfe == 2 * 5 and torch.isfinite(res.log_prob).all()


def test_config_and_data_checks() -> None:
    with pytest.raises(ValueError, match="--vocab"):
        build_model("dfm", 4, ModelConfig())
    digits = load_data("digits_binary", n=50, seed=0)
    assert digits.x.shape == (50, 64) and set(np.unique(digits.x)) <= {0.0, 1.0}
    assert digits.levels == 2


# --- export and serving ------------------------------------------------------------------------


def test_export_parity_and_batch_independence(artifact_factory, checkpoint_factory) -> None:
    from training.checkpoint import load_checkpoint

    folder = artifact_factory("dfm")
    onnx, ts = open_runtime(folder, runtime="onnx"), open_runtime(folder, runtime="torchscript")
    assert onnx.family == "dfm" and onnx.manifest.tokens.vocab == 4
    model = load_checkpoint(checkpoint_factory("dfm")).model
    x = load_data("markov_seq", n=6, seed=3).x
    want = model.log_prob_with_error(torch.as_tensor(x, dtype=torch.float32), probes=4, seed=2)
    for rt in (onnx, ts):
        got = rt.log_likelihood(x, seed=2)
        assert got.method == "elbo"
        np.testing.assert_allclose(got.log_prob, want.log_prob.numpy(), atol=1e-4)
        np.testing.assert_allclose(got.std_error, want.std_error.numpy(), atol=1e-4)
    alone = [onnx.sample(3, seed=1, steps=8), onnx.sample(2, seed=5, steps=8)]
    together = onnx.sample_many([SeededRows(3, 1), SeededRows(2, 5)], steps=8)
    for a, b in zip(alone, together.blocks, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ts.sample(3, seed=1, steps=8), alone[0])
    assert alone[0].dtype == np.int64 and ((alone[0] >= 0) & (alone[0] < 4)).all()


def test_http_and_grpc_equal_in_process_and_take_integer_tokens_only(
        families_models: Path, families_server) -> None:
    server, rt = families_server, open_runtime(families_models / "moons-dfm")
    status, out = server.post("/models", {})
    assert status == 200, out
    card = next(m for m in out["models"] if m["name"] == "moons-dfm")
    assert card["family"] == "dfm" and card["solvers"] == ["ctmc"]
    assert card["tokens"] == {"vocab": 4, "source": "mask"}
    x = load_data("markov_seq", n=4, seed=7).x
    status, out = server.post("/log_likelihood", {"model": "moons-dfm", "x": x.tolist()})
    assert status == 200, out
    want = rt.log_likelihood(x)
    assert out["method"] == "elbo" and len(out["std_error"]) == 4
    np.testing.assert_array_equal(out["log_likelihood"], want.log_prob)
    np.testing.assert_allclose(out["bits_per_dim"], -want.log_prob / (8 * math.log(2)))
    status, out = server.post("/sample", {"model": "moons-dfm", "n": 5, "seed": 4, "steps": 8})
    assert status == 200, out
    np.testing.assert_array_equal(out["samples"], rt.sample(5, seed=4, steps=8))
    assert all(type(v) is int for row in out["samples"] for v in row), out  # tokens: ints
    status, out = server.post("/anomaly_score", {"model": "moons-dfm", "x": x.tolist()})
    assert status == 200, out
    np.testing.assert_array_equal(out["scores"], -want.log_prob)

    for bad, word in (([[0, 1, 2, 3, 0, 1, 2, 2.5]], "is 2.5"),
                      ([[0, 1, 2, 3, 0, 1, 2, 4]], "is 4")):
        status, out = server.post("/log_likelihood", {"model": "moons-dfm", "x": bad})
        assert status == 400 and out["error"] == (
            f"'x' row 0, column 7 {word}; model 'moons-dfm' takes integer tokens in [0, 4)"), out
    status, out = server.post("/log_likelihood", {"model": "moons-dfm", "x": x.tolist(),
                                                  "method": "exact"})
    assert status == 400 and "its likelihood is elbo" in out["error"], out

    client = triton.InferenceServerClient(server.grpc_address)
    try:
        inp = triton.InferInput("x", list(x.shape), "FP64")
        inp.set_data_from_numpy(x)
        got = client.infer("moons-dfm.log_likelihood", [inp])
        np.testing.assert_array_equal(got.as_numpy("log_likelihood"), want.log_prob)
        np.testing.assert_array_equal(got.as_numpy("std_error"), want.std_error)
        inp = triton.InferInput("x", [1, 8], "FP64")
        inp.set_data_from_numpy(np.array([[0, 1, 2, 3, 0, 1, 2, 4.0]]))
        with pytest.raises(InferenceServerException) as info:
            client.infer("moons-dfm.log_likelihood", [inp])
        assert "integer tokens in [0, 4)" in info.value.message()
        # tokens travel as integers both ways: INT64 rows in, INT64 samples out
        inp = triton.InferInput("x", list(x.shape), "INT64")
        inp.set_data_from_numpy(x.astype(np.int64))
        got = client.infer("moons-dfm.log_likelihood", [inp])
        np.testing.assert_array_equal(got.as_numpy("log_likelihood"), want.log_prob)
        n, seed = (triton.InferInput(k, [1], "INT64") for k in ("n", "seed"))
        n.set_data_from_numpy(np.array([5], np.int64))
        seed.set_data_from_numpy(np.array([4], np.int64))
        got = client.infer("moons-dfm.sample", [n, seed], parameters={"steps": 8})
        assert got.as_numpy("samples").dtype == np.int64
        np.testing.assert_array_equal(got.as_numpy("samples"), rt.sample(5, seed=4, steps=8))
        meta = client.get_model_metadata("moons-dfm.sample")
        assert [(o.name, o.datatype) for o in meta.outputs] == [("samples", "INT64")]
        inp = triton.InferInput("x", [1, 8], "BOOL")
        inp.set_data_from_numpy(np.ones((1, 8), bool))
        with pytest.raises(InferenceServerException) as info:
            client.infer("moons-dfm.log_likelihood", [inp])
        assert "takes integer tokens: send INT64" in info.value.message()
    finally:
        client.close()



def test_uniform_source_elbo_is_served_like_the_masked_one(
        zoo_dir: Path, dfm_uniform_artifact: Path, families_server) -> None:
    """The uniform source's ELBO over the exported denoiser (ONNX, TorchScript) equals the
    in-process one, whatever the batch; ``steps`` sets its time nodes; HTTP and gRPC answer
    the runtime's."""
    from training.checkpoint import load_checkpoint

    name = dfm_uniform_artifact.name
    onnx = open_runtime(dfm_uniform_artifact, runtime="onnx")
    ts = open_runtime(dfm_uniform_artifact, runtime="torchscript")
    assert onnx.manifest.tokens.source == "uniform" and onnx.manifest.defaults.method == "elbo"
    model = load_checkpoint(zoo_dir / "ckpt" / "dfm-uniform").model
    x = load_data("markov_seq", n=6, seed=3).x
    want = model.log_prob_with_error(torch.as_tensor(x, dtype=torch.float32), probes=4, seed=2,
                                     steps=8)
    for rt in (onnx, ts):
        got = rt.log_likelihood(x, seed=2, steps=8)
        assert got.method == "elbo" and got.nfe == 4 * 9
        np.testing.assert_allclose(got.log_prob, want.log_prob.numpy(), atol=1e-4)
        np.testing.assert_allclose(got.std_error, want.std_error.numpy(), atol=1e-4)
    halves = [onnx.log_likelihood(x[:2], seed=2).log_prob,
              onnx.log_likelihood(x[2:], seed=2, rows=np.arange(2, 6)).log_prob]
    np.testing.assert_array_equal(np.concatenate(halves), onnx.log_likelihood(x, seed=2).log_prob)

    status, out = families_server.post("/models", {})
    assert status == 200, out
    card = next(m for m in out["models"] if m["name"] == name)
    assert card["tokens"] == {"vocab": 4, "source": "uniform"}
    rt = open_runtime(dfm_uniform_artifact)
    want = rt.log_likelihood(x)
    status, out = families_server.post("/log_likelihood", {"model": name, "x": x.tolist()})
    assert status == 200, out
    assert out["method"] == "elbo" and len(out["std_error"]) == 6
    np.testing.assert_array_equal(out["log_likelihood"], want.log_prob)
    status, out = families_server.post("/anomaly_score", {"model": name, "x": x.tolist()})
    assert status == 200, out
    np.testing.assert_array_equal(out["scores"], rt.anomaly_score(x).scores)
    client = triton.InferenceServerClient(families_server.grpc_address)
    try:
        inp = triton.InferInput("x", list(x.shape), "FP64")
        inp.set_data_from_numpy(x)
        got = client.infer(f"{name}.log_likelihood", [inp])
        np.testing.assert_array_equal(got.as_numpy("log_likelihood"), want.log_prob)
    finally:
        client.close()


@pytest.mark.parametrize("source", ["mask", "uniform"])
def test_conditional_dfm_bounds_log_p_x_given_y(source: str, tmp_path) -> None:
    """A DFM given the digit (binarised digits, label dropout 0.2): the served bound of
    ``log p(x | y)`` equals the eager one, another label gives another bound, samples given
    a label are tokens, and guidance 0 samples the plain conditional model while guidance 3
    changes the draws (the null-token denoiser differs)."""
    from artifact.conditions import context_rows
    from training.export import export_checkpoint
    from training.fit import fit

    cfg = ModelConfig(hidden_features=32, hidden_layers=2, source=source, cfg_dropout=0.2)
    ckpt = fit("dfm", "digits_binary", condition="label", out=tmp_path / "ckpt", model_cfg=cfg,
               train_cfg=TrainConfig(steps=20, batch_size=128, eval_every=20, progress=False))
    export_checkpoint(ckpt, tmp_path / "m", formats=("onnx",), calibration=False)
    rt = open_runtime(tmp_path / "m", runtime="onnx")
    rows = load_data("digits_binary")
    x, y = rows.x[:8], rows.y[:8]
    c = torch.as_tensor(context_rows(ckpt.config.condition, labels=y), dtype=torch.float32)
    eager = ckpt.model.log_prob_with_error(torch.as_tensor(x, dtype=torch.float32), probes=2,
                                           seed=0, context=c).log_prob.numpy()
    served = rt.log_likelihood(x, labels=y, probes=2).log_prob
    np.testing.assert_allclose(served, eager, rtol=1e-4, atol=1e-3)
    other = rt.log_likelihood(x, labels=(y + 1) % 10, probes=2).log_prob
    assert np.abs(other - served).min() > 0

    def draw(**options: float) -> np.ndarray:
        return rt.sample_many([SeededRows(16, seed=1)], labels=np.full(16, 7), steps=4,
                              **options).blocks[0]

    plain = draw()
    assert plain.shape == (16, 64) and plain.dtype == np.int64
    assert set(np.unique(plain)) <= {0, 1}
    np.testing.assert_array_equal(draw(guidance=0.0), plain)
    assert (draw(guidance=3.0) != plain).any()


def test_guided_log_probs_are_normalised_and_keep_what_is_ruled_out() -> None:
    """``p_u^(-w) p_c^(1 + w)`` renormalised: w = 0 is the conditional denoiser, every
    guided row sums to 1, a token either denoiser rules out stays at probability 0, and
    guidance sharpens toward what the label adds."""
    from numerics.guidance import guided_log_probs

    lp_c = np.log(np.array([[0.7, 0.2, 0.1], [0.5, 0.5, 0.0]]))
    lp_u = np.log(np.array([[0.3, 0.3, 0.4], [0.2, 0.4, 0.4]]))
    np.testing.assert_allclose(np.exp(guided_log_probs(lp_c, lp_u, 0.0)), np.exp(lp_c))
    p = np.exp(guided_log_probs(lp_c, lp_u, 2.0))
    np.testing.assert_allclose(p.sum(-1), 1.0)
    assert p[1, 2] == 0 and p[0, 0] > 0.7
    torch_p = guided_log_probs(torch.tensor(lp_c), torch.tensor(lp_u), 2.0).exp().numpy()
    np.testing.assert_allclose(torch_p, p)
