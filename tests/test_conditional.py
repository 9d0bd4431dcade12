"""Conditional models (issue 26): a flow given a label or a context, from training to the
answers of every verb over HTTP and gRPC.

The label model is a MAF on gmm2 given the mixture component, whose ``p(x | y)`` and
``p(x)`` are exact; the context model a RealNVP on a table whose column ``c`` moves the
rows (``tests/conftest.py``: ``conditional_models``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from artifact.conditions import ConditionSpec, class_names, condition_rows, context_rows
from service.runtime import SeededRows, open_runtime
from service.runtime.base import segmented_normal
from training.checkpoint import load_checkpoint
from training.conditioning import condition_data
from training.config import ModelConfig, TrainConfig
from training.data import DataError, Dataset, load_data
from training.registry import build_model
from training.toys import gaussian_mixture

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gmm2_rows() -> Dataset:
    """Fresh gmm2 rows (another seed than training's) with their components."""
    return load_data("gmm2", n=1500, seed=11)


@pytest.fixture(scope="module")
def label_rt(conditional_models: dict[str, Path]):
    return open_runtime(conditional_models["label"], runtime="onnx")


def _eager_log_prob(ckpt, x: np.ndarray, condition: np.ndarray, **options) -> np.ndarray:
    """The checkpoint's own ``log p(x | condition)`` (class indices or raw context rows) in
    data units, without dequantization noise (as the service answers): the reference every
    served answer is held to."""
    c = torch.as_tensor(condition_rows(ckpt.config.condition, condition), dtype=torch.float32)
    with torch.no_grad():
        u, ladj = ckpt.preprocessor(torch.as_tensor(x, dtype=torch.float32))
        return (ckpt.model.log_prob(u, context=c, **options) + ladj).numpy()


def _served_label_model(kind: str, data: str, rows: int | None, model: ModelConfig,
                        train: TrainConfig, folder: Path):
    """``kind`` trained on ``data`` given its labels, exported to ONNX (uncalibrated) and
    opened: the checkpoint and its runtime."""
    from training.export import export_checkpoint
    from training.fit import fit

    ckpt = fit(kind, data, rows=rows, condition="label", out=folder / "ckpt", model_cfg=model,
               train_cfg=train)
    export_checkpoint(ckpt, folder / "m", formats=("onnx",), calibration=False)
    return ckpt, open_runtime(folder / "m", runtime="onnx")


def test_conditional_flows_condition_every_conditioner() -> None:
    """Every conditional model type's log-density and inverse depend on the context, and
    the inverse given the same context undoes the forward map."""
    x, c = torch.randn(6, 3), torch.randn(6, 2)
    for kind in ("nice", "realnvp", "glow", "maf", "iaf", "nsf", "nsf_ar", "tarflow",
                 "resflow"):
        torch.manual_seed(0)
        flow = build_model(kind, 3, ModelConfig(hidden_features=8, transforms=2,
                                                context_features=2))
        for p in flow.parameters():  # the output layers start at zero: move them
            torch.nn.init.normal_(p, std=0.2)
        z, _ = flow(x, c)
        torch.testing.assert_close(flow.inverse(z, c), x, atol=1e-4, rtol=1e-4)
        assert (flow.log_prob(x, c) - flow.log_prob(x, c + 1)).abs().min() > 0, kind
    # every built-in type takes a condition; a plug-in that does not say so is refused
    import toy_family

    with pytest.raises(ValueError, match="cannot be conditioned.*conditional model types: "
                       "nice"):
        build_model(toy_family.MODEL_TYPE, 2, ModelConfig(context_features=2))
    with pytest.raises(ValueError, match="conditional resflow .* up to 64 dims"):
        build_model("resflow", 80, ModelConfig(context_features=2))


def test_log_p_x_given_y_and_marginal_approach_the_exact_densities(label_rt,
                                                                   gmm2_rows) -> None:
    mixture = gaussian_mixture("gmm2")
    x, y = gmm2_rows.x, gmm2_rows.y
    exact = mixture.component_log_densities(x)[np.arange(len(x)), y]
    got = label_rt.log_likelihood(x, labels=y).log_prob
    assert abs(np.mean(exact - got)) < 0.15 and np.mean(np.abs(exact - got)) < 0.4
    marginal = label_rt.log_likelihood(x, marginal=True).log_prob
    assert abs(np.mean(mixture.log_density(x) - marginal)) < 0.15
    # the marginal is the prior-weighted log-sum-exp of the conditionals, by definition
    cond = label_rt.manifest.condition
    each = np.stack([label_rt.log_likelihood(x[:50], labels=np.full(50, k)).log_prob
                     for k in range(cond.width)])
    expected = np.logaddexp.reduce(each + np.log(cond.priors)[:, None], axis=0)
    np.testing.assert_allclose(marginal[:50], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["cfm", "otcfm", "ddpm", "edm"])
def test_ode_models_log_p_x_given_y_approaches_the_exact_density(kind: str, tmp_path: Path,
                                                                 gmm2_rows) -> None:
    """The ODE families' PF-ODE ``log p(x | y)`` (exact divergence) on gmm2 given the
    component, after a brief training, is near the exact conditional density, and so is the
    prior-weighted marginal built from it."""
    from training.fit import fit

    ckpt = fit(kind, "gmm2", rows=4000, condition="label", out=tmp_path / "ckpt",
               model_cfg=ModelConfig(hidden_features=64, hidden_layers=2, time_embedding=8),
               train_cfg=TrainConfig(steps=400, batch_size=256, eval_every=400, lr=3e-3,
                                     ema_decay=0.99, progress=False))
    mixture = gaussian_mixture("gmm2")
    x, y = gmm2_rows.x[:300], gmm2_rows.y[:300]
    cond = ckpt.config.condition

    def log_p(labels: np.ndarray) -> np.ndarray:
        return _eager_log_prob(ckpt, x, labels, method="exact")

    exact = mixture.component_log_densities(x)[np.arange(len(x)), y]
    got = log_p(y)
    assert abs(np.mean(exact - got)) < 0.15 and np.mean(np.abs(exact - got)) < 0.4, kind
    each = np.stack([log_p(np.full(len(x), k)) for k in range(cond.width)])
    marginal = np.logaddexp.reduce(each + np.log(cond.priors)[:, None], axis=0)
    assert abs(np.mean(mixture.log_density(x) - marginal)) < 0.15, kind


def test_evaluate_scores_a_conditional_checkpoint_on_its_test_rows(
        conditional_models: dict[str, Path], tmp_path: Path, capsys) -> None:
    """``evaluate`` gives ``log p(x | y)`` on the test split given each row's label, the
    marginal beside it, both next to the exact densities of gmm2; a context model is scored
    given its context column; ``--data`` is refused for a conditional checkpoint."""
    from cli import main
    from training.evaluate import evaluate

    ckpt_dir = conditional_models["label"].parent.parent / "ckpt"
    label = evaluate(load_checkpoint(ckpt_dir / "cond-label"), samples=200)
    assert label["condition"] == "label" and label["log_likelihood_is"] == "log p(x | y)"
    assert abs(label["gap_to_truth"]) < 0.2 and abs(label["marginal_gap_to_truth"]) < 0.2
    # the conditional density of the right component beats the mixture: log p(y | x) > log p(y)
    assert label["log_likelihood"] > label["marginal_log_likelihood"]
    assert label["rows"] == 300 and np.isfinite(label["w2_to_test"])
    context = evaluate(load_checkpoint(ckpt_dir / "cond-context"), samples=100)
    assert context["condition"] == "context" and "marginal_log_likelihood" not in context
    assert np.isfinite(context["log_likelihood"]) and context["w2_rows"] == 100
    np.save(tmp_path / "rows.npy", np.zeros((5, 2)))
    assert main(["evaluate", str(ckpt_dir / "cond-label"), "--data",
                 str(tmp_path / "rows.npy")]) == 2
    assert "leave out --data" in capsys.readouterr().err


def test_onnx_torchscript_and_eager_agree_on_conditional_graphs(
        conditional_models: dict[str, Path], gmm2_rows) -> None:
    x, y = gmm2_rows.x[:64], gmm2_rows.y[:64]
    contexts = {"label": {"labels": y}, "context": {"context": np.linspace(-2, 2, 64)[:, None]}}
    for name in ("label", "context"):
        folder = conditional_models[name]
        ckpt = load_checkpoint(folder.parent.parent / "ckpt" / f"cond-{name}")
        eager = _eager_log_prob(ckpt, x, next(iter(contexts[name].values())))
        for fmt in ("onnx", "torchscript"):
            served = open_runtime(folder, runtime=fmt).log_likelihood(x, **contexts[name])
            np.testing.assert_allclose(served.log_prob, eager, rtol=1e-4, atol=1e-4)


def test_mixed_labels_in_one_call_equal_one_call_per_label(label_rt, gmm2_rows) -> None:
    x, y = gmm2_rows.x[:200], gmm2_rows.y[:200]
    mixed = label_rt.log_likelihood(x, labels=y).log_prob
    for k in np.unique(y):
        alone = label_rt.log_likelihood(x[y == k], labels=y[y == k]).log_prob
        np.testing.assert_allclose(mixed[y == k], alone, rtol=1e-6, atol=1e-5)
    requests = [SeededRows(5, seed=1), SeededRows(7, seed=2, offset=3)]
    labels = [np.full(5, 0), np.arange(7) % 5]
    together = label_rt.sample_many(requests, labels=np.concatenate(labels)).blocks
    for r, lab, block in zip(requests, labels, together, strict=True):
        alone = label_rt.sample_many([r], labels=lab).blocks[0]
        np.testing.assert_allclose(block, alone, rtol=1e-6, atol=1e-6)


def test_samples_follow_their_label(label_rt) -> None:
    mixture = gaussian_mixture("gmm2")
    for k in range(len(mixture.weights)):
        s = label_rt.sample(400, seed=k, labels=np.full(400, k))
        assert np.linalg.norm(s.mean(0) - mixture.means[k]) < 0.5, k


def test_per_class_thresholds_flag_planted_outliers_at_the_target_rate(label_rt) -> None:
    held = load_data("gmm2", n=4000, seed=12)
    cond = label_rt.manifest.condition
    assert len(cond.calibrations) == cond.width
    out = label_rt.anomaly_score(held.x, labels=held.y)
    np.testing.assert_allclose(out.thresholds,
                               np.array([c.threshold for c in cond.calibrations])[held.y])
    for k in range(cond.width):  # each class flags about its target share of normal rows
        assert out.is_anomaly[held.y == k].mean() < 3 * cond.calibrations[k].target_fpr, k
    # planted outliers: rows of another component given label k are flagged in every class
    for k in range(cond.width):
        other = held.x[held.y == (k + 1) % cond.width][:100]
        planted = label_rt.anomaly_score(other, labels=np.full(len(other), k))
        assert planted.is_anomaly.mean() > 0.9, k


def test_condition_data_from_a_label_column_and_from_context_columns() -> None:
    x = np.array([[0.0, 1.0, 7.0], [1.0, 2.0, 3.0], [2.0, 3.0, 7.0], [3.0, 4.0, 3.0]])
    data = Dataset(x, None, "t", None, "t.csv", columns=("a", "b", "g"))
    labelled = condition_data(data, "label", np.arange(4), label_col="g")
    assert labelled.x.tolist() == x[:, :2].tolist() and labelled.columns == ("a", "b")
    assert labelled.spec.classes == ["3", "7"] and labelled.values.tolist() == [1, 0, 1, 0]
    assert labelled.spec.priors == [0.5, 0.5] and labelled.spec.null_token == 2
    ctx = condition_data(data, "context", np.arange(2), context_cols=["b", "g"])
    assert ctx.x.tolist() == x[:, :1].tolist() and ctx.spec.width == 2
    assert ctx.spec.context_mean == [1.5, 5.0]
    with pytest.raises(DataError, match="no column 'h'.*its columns: a, b, g"):
        condition_data(data, "label", np.arange(4), label_col="h")
    with pytest.raises(DataError, match="has no labels"):
        condition_data(data, "label", np.arange(4))
    with pytest.raises(DataError, match="needs --context-cols"):
        condition_data(data, "context", np.arange(4))
    with pytest.raises(ValueError, match="whole numbers"):
        class_names(np.array([0.5, 1.0]))
    spec = ConditionSpec(kind="label", width=2, classes=["a", "b"], priors=[0.5, 0.5],
                         null_token=2)
    assert context_rows(spec, labels=np.array([2, 0])).tolist() == [[0, 0], [1, 0]]


def _post(server, verb: str, body: dict) -> tuple[int, dict]:
    return server.post(f"/{verb}", body)


def test_http_answers_equal_the_runtime_and_mix_labels(families_models: Path,
                                                       families_server, gmm2_rows) -> None:
    server, rt = families_server, open_runtime(families_models / "cond-label")
    x, y = gmm2_rows.x[:12], gmm2_rows.y[:12]
    status, out = _post(server, "log_likelihood", {"model": "cond-label", "x": x.tolist(),
                                                   "y": y.tolist()})
    assert status == 200
    np.testing.assert_allclose(out["log_likelihood"], rt.log_likelihood(x, labels=y).log_prob,
                               rtol=1e-6)
    status, one = _post(server, "log_likelihood", {"model": "cond-label", "x": x[:3].tolist(),
                                                   "y": str(y[0])})
    assert status == 200
    np.testing.assert_allclose(one["log_likelihood"],
                               rt.log_likelihood(x[:3], labels=np.full(3, y[0])).log_prob,
                               rtol=1e-6)
    status, marg = _post(server, "log_likelihood", {"model": "cond-label", "x": x.tolist(),
                                                    "marginal": True})
    assert status == 200
    np.testing.assert_allclose(marg["log_likelihood"],
                               rt.log_likelihood(x, marginal=True).log_prob, rtol=1e-6)
    status, sample = _post(server, "sample", {"model": "cond-label", "n": 4, "seed": 3,
                                              "y": [0, 1, 2, 3]})
    assert status == 200
    np.testing.assert_allclose(sample["samples"],
                               rt.sample(4, seed=3, labels=np.arange(4)), rtol=1e-6)
    status, scored = _post(server, "anomaly_score", {"model": "cond-label", "x": x.tolist(),
                                                     "y": y.tolist()})
    assert status == 200
    expected = rt.anomaly_score(x, labels=y)
    np.testing.assert_allclose(scored["thresholds"], expected.thresholds)
    assert scored["is_anomaly"] == expected.is_anomaly.tolist()
    status, card = server.get("/models")
    card = next(m for m in json.loads(card)["models"] if m["name"] == "cond-label")
    assert card["condition"]["classes"] == ["0", "1", "2", "3", "4"]
    assert len(card["condition"]["thresholds"]) == 5
    status, ctx = _post(server, "log_likelihood", {"model": "cond-context",
                                                   "x": [[1.0, -1.0]], "context": [1.0]})
    assert status == 200 and ctx["log_likelihood"][0] > _post(
        server, "log_likelihood", {"model": "cond-context", "x": [[1.0, -1.0]],
                                   "context": [[-1.0]]})[1]["log_likelihood"][0]


BAD = [
    ("cond-label", "log_likelihood", {"y": 9}, "'y' '9' is not a class of model 'cond-label'; "
     "its classes: 0, 1, 2, 3, 4"),
    ("cond-label", "log_likelihood", {"y": [0]}, "'y' has 1 labels but the request has 2 "
     "rows; send one label for all rows, or one per row"),
    ("cond-label", "anomaly_score", {}, "model 'cond-label' is conditioned on a label: send "
     "'y', one of 0, 1, 2, 3, 4"),
    ("cond-label", "log_likelihood", {"y": 1, "marginal": True}, "'marginal': true sums"),
    ("cond-label", "sample", {"context": [1.0]}, "send 'y' (one of 0, 1, 2, 3, 4), not "
     "'context'"),
    ("cond-context", "log_likelihood", {"context": [1.0, 2.0]}, "'context' rows have 2 values "
     "but model 'cond-context' takes a context of 1"),
    ("cond-context", "anomaly_score", {"context": [[1.0], [2.0], [3.0]]}, "'context' has 3 "
     "rows but the request has 2"),
    ("cond-context", "log_likelihood", {"context": ["1.0"]}, "'context' must be 1 numbers, "
     "or a list of rows of 1 numbers (one per row); no strings, booleans or nulls"),
    ("cond-context", "log_likelihood", {"y": 1}, "conditioned on a context of 1 numbers: send "
     "'context', not 'y'"),
    ("cond-context", "log_likelihood", {"context": [1.0], "marginal": True},
     "'marginal' applies to label models"),
    ("moons-edm", "log_likelihood", {"y": 1}, "model 'moons-edm' is unconditional: 'y' does "
     "not apply; leave it out"),
    ("moons-edm", "anomaly_score", {"context": [1.0]}, "is unconditional: 'context' does not "
     "apply"),
]


@pytest.mark.parametrize(("model", "verb", "extra", "message"), BAD)
def test_bad_conditions_are_refused_with_what_is_allowed(families_server, model: str,
                                                          verb: str, extra: dict,
                                                          message: str) -> None:
    body = {"model": model, **({"n": 2} if verb == "sample" else {"x": [[0.0, 0.0]] * 2}),
            **extra}
    status, out = _post(families_server, verb, body)
    assert status == 400 and message in out["error"], out
    table = (Path(__file__).parents[1] / "docs" / "API.md").read_text()
    assert out["error"].replace("|", "\\|") in table, "docs/API.md lists every answer"


def _tensor(name: str, array: np.ndarray, datatype: str):
    import tritonclient.grpc as triton

    t = triton.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def test_grpc_takes_the_same_conditions_as_http(families_models: Path, families_server,
                                                gmm2_rows) -> None:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    rt = open_runtime(families_models / "cond-label")
    x, y = gmm2_rows.x[:10], gmm2_rows.y[:10]
    client = triton.InferenceServerClient(families_server.grpc_address)
    try:
        meta = client.get_model_metadata("cond-label.anomaly_score", as_json=True)
        assert [i["name"] for i in meta["inputs"]] == ["x", "y"]
        assert "thresholds" in [o["name"] for o in meta["outputs"]]
        xs, ys = _tensor("x", x, "FP64"), _tensor("y", y.astype(np.int64), "INT64")
        got = client.infer("cond-label.log_likelihood", [xs, ys]).as_numpy("log_likelihood")
        np.testing.assert_allclose(got, rt.log_likelihood(x, labels=y).log_prob, rtol=1e-6)
        got = client.infer("cond-label.log_likelihood", [xs], parameters={"marginal": True})
        np.testing.assert_allclose(got.as_numpy("log_likelihood"),
                                   rt.log_likelihood(x, marginal=True).log_prob, rtol=1e-6)
        answer = client.infer("cond-label.anomaly_score", [xs, ys])
        np.testing.assert_allclose(answer.as_numpy("thresholds"),
                                   rt.anomaly_score(x, labels=y).thresholds)
        n, one = _tensor("n", np.array([3], np.int64), "INT64"), _tensor(
            "y", np.array([2], np.int64), "INT64")
        got = client.infer("cond-label.sample", [n, one], parameters={"seed": 4})
        np.testing.assert_allclose(got.as_numpy("samples"),
                                   rt.sample(3, seed=4, labels=np.full(3, 2)), rtol=1e-6)
        ctx = _tensor("context", np.array([[1.0, 2.0]], np.float32), "FP32")
        with pytest.raises(InferenceServerException, match="'context' rows have 2 values but "
                           "model 'cond-context' takes a context of 1"):
            client.infer("cond-context.log_likelihood",
                         [_tensor("x", x[:1], "FP64"), ctx])
        with pytest.raises(InferenceServerException, match="'y' '9' is not a class"):
            client.infer("cond-label.log_likelihood",
                         [xs, _tensor("y", np.array([9], np.int64), "INT64")])
    finally:
        client.close()


@pytest.fixture(scope="module")
def cfm_rt(conditional_models: dict[str, Path]):
    return open_runtime(conditional_models["cfm"], runtime="onnx")


def test_ode_models_take_the_context_in_every_graph(conditional_models: dict[str, Path],
                                                    cfm_rt, gmm2_rows) -> None:
    """ONNX, TorchScript and the eager model agree on the conditional velocity graphs
    (exact and Hutchinson likelihoods, the marginal); rows of mixed labels in one call
    answer as one call per label."""
    x, y = gmm2_rows.x[:24], gmm2_rows.y[:24]
    ckpt = load_checkpoint(conditional_models["cfm"].parent.parent / "ckpt" / "cond-cfm")
    eager = _eager_log_prob(ckpt, x, y, steps=4, solver="rk4")
    ts = open_runtime(conditional_models["cfm"], runtime="torchscript")
    for rt in (cfm_rt, ts):
        got = rt.log_likelihood(x, labels=y, steps=4, solver="rk4").log_prob
        np.testing.assert_allclose(got, eager, rtol=1e-4, atol=1e-4)
    for method in ("exact", "hutchinson"):
        mixed = cfm_rt.log_likelihood(x, labels=y, method=method, steps=4, solver="rk4")
        for k in np.unique(y):
            alone = cfm_rt.log_likelihood(x[y == k], labels=y[y == k], method=method, steps=4,
                                          solver="rk4", rows=np.flatnonzero(y == k))
            np.testing.assert_allclose(mixed.log_prob[y == k], alone.log_prob, rtol=1e-6)
    marginal = cfm_rt.log_likelihood(x[:4], marginal=True, steps=4, solver="rk4").log_prob
    each = np.stack([cfm_rt.log_likelihood(x[:4], labels=np.full(4, k), steps=4,
                                           solver="rk4").log_prob for k in range(5)])
    priors = np.log(cfm_rt.manifest.condition.priors)[:, None]
    np.testing.assert_allclose(marginal, np.logaddexp.reduce(each + priors, 0), rtol=1e-6)


ODE_LABEL_MODELS = {  # model type: (data set, rows, ModelConfig fields)
    "otcfm": ("gmm2", 600, {"hidden_features": 16, "hidden_layers": 2}),
    "ffjord": ("gmm2", 600, {"hidden_features": 16, "hidden_layers": 2}),
    "rfm": ("vmf_s2", 600, {"hidden_features": 16, "hidden_layers": 2, "manifold": "sphere"}),
    "edm": ("gmm2", 600, {"hidden_features": 16, "hidden_layers": 2}),
    "cfm_image": ("digits_image", None, {"hidden_features": 4, "scales": 1}),
}


@pytest.mark.parametrize("kind", list(ODE_LABEL_MODELS))
def test_ode_label_models_serve_log_p_x_given_y(kind: str, tmp_path: Path) -> None:
    """OT-CFM (OT pairs within each class), FFJORD (maximum likelihood given the label), RFM
    (a tangent field given the label, on vmf_s2's components) and the U-Net models (the
    label's embedding joins the time embedding; digits given the digit) train on labels,
    export a context input in every velocity graph, and serve ``log p(x | y)`` equal to the
    eager model's, different for another label; guided samples keep their shape (RFM's stay
    on the sphere)."""
    data, n, fields = ODE_LABEL_MODELS[kind]
    ckpt, rt = _served_label_model(
        kind, data, n, ModelConfig(time_embedding=4, cfg_dropout=0.2, **fields),
        TrainConfig(steps=8, batch_size=128, eval_every=8, progress=False), tmp_path)
    rows = load_data(data, n=12, seed=11)
    x, y = rows.x[:12], rows.y[:12]
    eager = _eager_log_prob(ckpt, x, y, steps=4, solver="rk4", method="exact")
    got = rt.log_likelihood(x, labels=y, steps=4, solver="rk4", method="exact").log_prob
    np.testing.assert_allclose(got, eager, rtol=1e-4, atol=1e-4)
    classes = len(ckpt.config.condition.priors)
    other = rt.log_likelihood(x, labels=(y + 1) % classes, steps=4, solver="rk4",
                              method="exact").log_prob
    assert np.abs(other - got).min() > 0
    s = rt.sample_many([SeededRows(3, seed=1)], labels=np.full(3, 1), guidance=1.0,
                       solver="heun", steps=3).blocks[0]
    assert s.shape == (3, x.shape[1])
    if kind == "rfm":
        np.testing.assert_allclose(np.linalg.norm(s, axis=1), 1.0, atol=1e-5)
    if kind == "edm":  # its stochastic sampler follows the guided field too
        s = rt.sample_many([SeededRows(3, seed=1)], labels=np.full(3, 1), guidance=1.0,
                           solver="edm_stochastic", steps=3).blocks[0]
        assert s.shape == (3, 2) and np.isfinite(s).all()


FLOW_LABEL_MODELS = {  # model type: (data set, rows, ModelConfig fields)
    "glow_image": ("digits_image", None, {"hidden_features": 8, "hidden_layers": 1,
                                          "transforms": 2, "scales": 2}),
    # with training noise, so its samples take the one-step denoising given the label too
    "tarflow": ("gmm2", 600, {"hidden_features": 16, "hidden_layers": 1, "transforms": 2,
                              "noise_std": 0.05}),
    # the context shifts g's first pre-activation: Lip in x unchanged, exact log-det
    "resflow": ("gmm2", 600, {"hidden_features": 16, "hidden_layers": 1, "transforms": 2}),
}


@pytest.mark.parametrize("kind", list(FLOW_LABEL_MODELS))
def test_image_and_transformer_flows_serve_log_p_x_given_y(kind: str, tmp_path: Path) -> None:
    """A conditional multi-scale Glow (digits given the digit) and a conditional TarFlow
    (the label's embedding added to every token): their exported one-pass graphs take the
    label, and the served ``log p(x | y)`` and samples given a label are the eager model's."""
    data, n, fields = FLOW_LABEL_MODELS[kind]
    ckpt, rt = _served_label_model(
        kind, data, n, ModelConfig(**fields),
        TrainConfig(steps=5, batch_size=64, eval_every=5, progress=False), tmp_path)
    rows = load_data(data, n=10, seed=11)
    x, y = rows.x[:10], rows.y[:10]
    eager = _eager_log_prob(ckpt, x, y)
    got = rt.log_likelihood(x, labels=y).log_prob
    np.testing.assert_allclose(got, eager, rtol=1e-4, atol=1e-3)
    classes = len(ckpt.config.condition.priors)
    assert np.abs(rt.log_likelihood(x, labels=(y + 1) % classes).log_prob - got).min() > 0
    s = rt.sample_many([SeededRows(2, seed=1)], labels=np.full(2, 1)).blocks[0]
    assert s.shape == (2, x.shape[1]) and np.isfinite(s).all()
    # the eager model's samples of the same noise, given the label
    z = torch.as_tensor(segmented_normal([SeededRows(2, seed=1)], (x.shape[1],)),
                        dtype=torch.float32)
    c1 = torch.as_tensor(condition_rows(ckpt.config.condition, np.full(2, 1)),
                         dtype=torch.float32)
    with torch.no_grad():
        eager_s = ckpt.preprocessor.inverse(ckpt.model.inverse(z, c1)).numpy()
    np.testing.assert_allclose(s, eager_s, rtol=1e-3, atol=1e-3)


def test_guidance_zero_is_the_plain_conditional_model_and_batching_keeps_it(cfm_rt) -> None:
    labels = np.array([0, 1, 2, 3, 4, 0])
    plain = cfm_rt.sample(6, seed=5, labels=labels, solver="rk4", steps=6)
    np.testing.assert_allclose(cfm_rt.sample(6, seed=5, labels=labels, solver="rk4", steps=6,
                                             guidance=0.0), plain, rtol=1e-12, atol=1e-12)
    guided = cfm_rt.sample(6, seed=5, labels=labels, solver="rk4", steps=6, guidance=2.0)
    assert np.abs(guided - plain).max() > 1e-3  # the null-token field differs
    requests = [SeededRows(4, seed=1), SeededRows(3, seed=2, offset=2)]
    lab = [np.full(4, 3), np.array([0, 1, 2])]
    together = cfm_rt.sample_many(requests, labels=np.concatenate(lab), guidance=1.5,
                                  solver="heun", steps=5).blocks
    for r, one, block in zip(requests, lab, together, strict=True):
        alone = cfm_rt.sample_many([r], labels=one, guidance=1.5, solver="heun", steps=5)
        np.testing.assert_allclose(block, alone.blocks[0], rtol=1e-6, atol=1e-6)
    # the training-side models follow the same formula; w = 0 is their plain field too
    for kind in ("ddpm", "cfm", "otcfm", "si", "ffjord", "edm"):
        torch.manual_seed(0)
        model = build_model(kind, 2, ModelConfig(hidden_features=8, context_features=3,
                                                 cfg_dropout=0.1))
        c = torch.eye(3)[[0, 1, 2, 1]]
        solver = "ddim" if kind == "ddpm" else "euler"  # a fixed grid (ffjord's is dopri5)
        a, b = (model.sample(4, generator=torch.Generator().manual_seed(1), steps=3,
                             solver=solver, context=c, guidance=w) for w in (None, 0.0))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_guidance_on_http_and_its_refusals(families_models: Path, families_server) -> None:
    rt = open_runtime(families_models / "cond-cfm")
    status, out = _post(families_server, "sample", {"model": "cond-cfm", "n": 3, "seed": 2,
                                                    "y": 4, "guidance": 1.0, "steps": 4,
                                                    "solver": "euler"})
    assert status == 200, out
    np.testing.assert_allclose(out["samples"], rt.sample(3, seed=2, labels=np.full(3, 4),
                                                         guidance=1.0, steps=4,
                                                         solver="euler"), rtol=1e-6)
    for model, message in (("cond-label", "'guidance' applies to diffusion and flow-matching "
                            "models; model 'cond-label' is a flow: leave it out"),
                           ("moons-edm", "model 'moons-edm' was trained without label dropout "
                            "(train --condition label --cfg-dropout P)")):
        status, out = _post(families_server, "sample", {"model": model, "n": 2, "y": 1,
                                                        "guidance": 1.0})
        if model == "moons-edm":  # y is refused first on an unconditional model: ask without
            status, out = _post(families_server, "sample", {"model": model, "n": 2,
                                                            "guidance": 1.0})
        assert status == 400 and message in out["error"], out
        assert out["error"] in (Path(__file__).parents[1] / "docs" / "API.md").read_text()
    status, out = _post(families_server, "sample", {"model": "cond-cfm", "n": 2, "y": 1,
                                                    "guidance": -1})
    assert status == 400 and "'guidance': Input should be greater than or equal to 0" in \
        out["error"]


def test_fit_anomaly_and_score_read_the_label_column(tmp_path: Path) -> None:
    """fit-anomaly --label-col trains a conditional flow on a table's label column, and score
    reads that column from the file: rows placed at another class's centre are flagged under
    their own label, normal rows about at the target rate, and an unknown label is a bad
    row named in words."""
    from service.scoring import score_file
    from training.anomaly import fit_anomaly

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])

    def table(path: Path, rows: int, planted: int = 0, keys: bool = True) -> Path:
        g = rng.integers(0, 3, rows)
        x = centres[g] + 0.5 * rng.standard_normal((rows, 2))
        x[:planted] = centres[(g[:planted] + 1) % 3] + 0.5 * rng.standard_normal((planted, 2))
        ids = [np.arange(rows)] if keys else []
        np.savetxt(path, np.column_stack([*ids, x, g]), delimiter=",",
                   header="id,a,b,g" if keys else "a,b,g", comments="")
        return path

    summary = fit_anomaly(table(tmp_path / "normal.csv", 900, keys=False), tmp_path / "model",
                          label_col="g", model="maf", steps=200, target_fpr=0.05,
                          progress=False)
    assert "conditioned on label column(s) g" in summary["note"]
    rt = open_runtime(tmp_path / "model")
    cond = rt.manifest.condition
    assert cond.columns == ["g"] and cond.classes == ["0", "1", "2"]
    assert rt.manifest.data.columns == ["a", "b"]
    with pytest.raises(ValueError, match="one conditional flow scored by nll"):
        fit_anomaly(tmp_path / "normal.csv", tmp_path / "m2", label_col="g", ensemble=2)
    out = score_file(tmp_path / "model", table(tmp_path / "new.csv", 400, planted=40),
                     tmp_path / "scores.csv", keep=["id"])
    flags = np.loadtxt(tmp_path / "scores.csv", delimiter=",", skiprows=1,
                       usecols=3, dtype=str) == "true"
    assert out["scored"] == 400 and flags[:40].mean() > 0.9 and flags[40:].mean() < 0.15
    (tmp_path / "bad.csv").write_text("id,a,b,g\n1,0,0,7\n")
    with pytest.raises(DataError, match="row id=1.0: column 'g' is 7, not a class of the "
                       r"model \(its classes: 0, 1, 2\)"):
        score_file(tmp_path / "model", tmp_path / "bad.csv", tmp_path / "bad-out.csv",
                   keep=["id"])
