"""Batching never changes an answer, and never fails one request for another's sake.

Against a real server with ``GENSERVE_MAX_BATCH_ROWS=64``: concurrent seeded requests of mixed
sizes (some above 64 rows, so the batcher splits them) for every verb and every family, each
equal to its lone answer computed in process on the same artifact. ODE models (diffusion,
flow matching; exact and Hutchinson likelihoods, deterministic and stochastic samplers) are
equal bit for bit. Flows are equal to float32 rounding: ONNX Runtime's ReduceSum takes a
vectorised path whose summation order depends on a row's memory alignment, so a flow's
one-pass ``log_prob`` or ``sample`` row can move by one float32 ulp with its place in the
batch (no solver amplifies it). A graph that raises for rows carrying a marker fails only
the requests that carried one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families

from artifact.manifest import sha256_file
from service.devserver import ROOT, running_server
from service.runtime import ModelRuntime, open_runtime

BATCH_ROWS = 64
SIZES = (3, 40, 150)  # 150 > 64: split across batches
MARKER = 777.0  # a value in x that makes the faulty model's preprocess graph raise
FLOAT32_ROUNDING = 2.5e-7  # two float32 ulps, relative


def add_fault(folder: Path) -> None:
    """Make ``preprocess.onnx`` raise (a Gather out of bounds) for a batch holding MARKER."""
    path = folder / "preprocess.onnx"
    model = onnx.load(path)
    graph = model.graph
    ladj = graph.output[1].name
    for node in graph.node:
        node.output[:] = [f"{o}_clean" if o == ladj else o for o in node.output]
    x = graph.input[0].name
    graph.initializer.extend([
        helper.make_tensor("marker", TensorProto.FLOAT, [], [MARKER]),
        helper.make_tensor("far", TensorProto.FLOAT, [], [1e6]),
        helper.make_tensor("zero_table", TensorProto.FLOAT, [1], [0.0]),
    ])
    graph.node.extend([
        helper.make_node("Equal", [x, "marker"], ["is_marker"]),
        helper.make_node("Cast", ["is_marker"], ["marker_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMax", ["marker_f"], ["any_marker"], keepdims=0),
        helper.make_node("Mul", ["any_marker", "far"], ["index_f"]),
        helper.make_node("Cast", ["index_f"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["zero_table", "index"], ["zero"]),
        helper.make_node("Add", [f"{ladj}_clean", "zero"], [ladj]),
    ])
    onnx.save(model, path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["name"] = folder.name
    manifest["files"]["preprocess.onnx"] = sha256_file(path)
    for fmt in list(manifest["graphs"]["preprocess"]):  # ONNX only: the TorchScript is unchanged
        if fmt != "onnx":
            del manifest["graphs"]["preprocess"][fmt]
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _hutchinson_by_default(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["name"] = folder.name
    manifest["defaults"] |= {"method": "hutchinson", "probes": 4}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed default models, a faulty flow and an ODE model scored by Hutchinson."""
    root = tmp_path_factory.mktemp("batching") / "models"
    shutil.copytree(ROOT / "exported_models", root)
    shutil.copytree(root / "moons-nsf", root / "moons-nsf-faulty")
    add_fault(root / "moons-nsf-faulty")
    shutil.copytree(root / "moons-otcfm", root / "moons-otcfm-hutchinson")
    _hutchinson_by_default(root / "moons-otcfm-hutchinson")
    return root


@pytest.fixture(scope="module")
def batch_server(models: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("batching-logs") / "server.log"
    # requests wait up to 50 ms for company, so concurrent ones share graph batches
    env = {"GENSERVE_MAX_BATCH_ROWS": str(BATCH_ROWS), "GENSERVE_MAX_LATENCY_MS": "60000",
           "GENSERVE_MAX_BATCH_WAIT_MS": "50"}
    with running_server(models, log, env=env) as server:
        yield server


def _requests(rt: ModelRuntime, rng: np.random.Generator) -> list[tuple[str, dict]]:
    """Seeded requests of mixed sizes for every verb; ``x`` drawn from the model itself."""
    ode = rt.family != "flow"
    sample_opts = [{}] if not ode else [{}, {"solver": "heun", "steps": 6}]
    if rt.family == "diffusion":
        sample_opts.append({"solver": "ddpm", "steps": 8})  # stochastic: noise per row
    out: list[tuple[str, dict]] = []
    for n in SIZES:
        seed = int(rng.integers(1 << 31))
        ll_opts = [{}] if not ode else [{}, {"solver": "rk4", "steps": 6},
                                        {"method": "hutchinson", "probes": 3, "steps": 6,
                                         "solver": "rk4", "seed": seed}]
        out += [("sample", {"model": rt.name, "n": n, "seed": seed, **o}) for o in sample_opts]
        x = rt.sample(n, seed=seed + 1, steps=8, solver="heun" if ode else None)
        x = (x + 0.05 * rng.standard_normal(x.shape)).tolist()
        out += [("log_likelihood", {"model": rt.name, "x": x, **o}) for o in ll_opts]
        out.append(("anomaly_score", {"model": rt.name, "x": x}))
    return out


def _lone(rt: ModelRuntime, verb: str, body: dict) -> dict[str, Any]:
    """The answer of ``body`` computed alone, unsplit, in process."""
    opts = {k: v for k, v in body.items() if k not in ("model", "x", "n")}
    if verb == "sample":
        return {"samples": rt.sample(body["n"], **opts)}
    x = np.asarray(body["x"])
    if verb == "log_likelihood":
        out = rt.log_likelihood(x, **opts)
        return {"log_likelihood": out.log_prob, "std_error": out.std_error}
    out = rt.anomaly_score(x)
    return {"scores": out.scores, "percentile": out.percentile}


def _assert_same(rt: ModelRuntime, got: dict, expected: dict[str, Any], what: str) -> None:
    for key, want in expected.items():
        if want is None:
            assert got.get(key) in (None, []), what
            continue
        have = np.asarray(got[key], dtype=np.float64)
        if rt.family == "flow":
            np.testing.assert_allclose(have, want, rtol=FLOAT32_ROUNDING, atol=0, err_msg=what)
        else:
            assert np.array_equal(have, want), f"{what}: {key} differs by " \
                f"{np.abs(have - want).max()}"


def _concurrently(server: Any, calls: list[tuple[str, dict]],
                  workers: int = 24) -> list[tuple[int, dict]]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda c: server.post(f"/{c[0]}", c[1], timeout=120), calls))


def _metric(server: Any, name: str, **labels: str) -> Callable[[str], float]:
    status, raw = server.get("/metrics")
    assert status == 200
    samples = [s for f in text_string_to_metric_families(raw.decode()) for s in f.samples
               if all(s.labels.get(k) == v for k, v in labels.items())]
    return lambda suffix, le=None: sum(
        s.value for s in samples if s.name == name + suffix
        and (le is None or s.labels.get("le") == le))


def test_concurrent_split_and_batched_answers_equal_lone_ones(batch_server, models) -> None:
    rng = np.random.default_rng(0)
    runtimes = {name: open_runtime(models / name) for name in
                ("moons-nsf", "moons-ddpm", "moons-otcfm", "breast-cancer-maf",
                 "moons-otcfm-hutchinson")}
    calls = [call for rt in runtimes.values() for call in _requests(rt, rng)]
    expected = [_lone(runtimes[body["model"]], verb, body) for verb, body in calls]
    for round_ in range(2):  # two arrival orders: each request meets other neighbours
        order = list(range(len(calls)))
        random.Random(round_).shuffle(order)
        answers = _concurrently(batch_server, [calls[i] for i in order])
        for i, (status, body) in zip(order, answers, strict=True):
            verb, request = calls[i]
            what = f"{verb} {request['model']} {len(request.get('x', [])) or request.get('n')}"
            assert status == 200, (what, body)
            _assert_same(runtimes[request["model"]], body, expected[i], what)
    for verb in ("sample", "log_likelihood", "anomaly_score"):
        rows = _metric(batch_server, "genserve_batch_rows", verb=verb)
        # never more than 64 rows in one graph batch: the 150-row requests were split
        assert rows("_bucket", str(float(BATCH_ROWS))) == rows("_count") > 0
        # and some graph batches served several requests at once
        requests = _metric(batch_server, "genserve_batch_requests", verb=verb)
        assert requests("_bucket", "1.0") < requests("_count"), verb


def test_a_request_whose_graph_raises_fails_alone(batch_server, models) -> None:
    rt = open_runtime(models / "moons-nsf")
    rng = np.random.default_rng(1)
    calls = []
    for i in range(24):
        x = rng.normal(size=(int(rng.integers(1, 90)), 2)).tolist()
        if i % 8 == 3:
            x[len(x) // 2][1] = MARKER
        calls.append(("log_likelihood" if i % 2 else "anomaly_score",
                      {"model": "moons-nsf-faulty", "x": x}))
    answers = _concurrently(batch_server, calls)
    failed = []
    for (verb, body), (status, out) in zip(calls, answers, strict=True):
        if any(MARKER in row for row in body["x"]):
            assert status == 500, out
            assert out["error"] == "internal error" and len(out["request_id"]) == 16
            assert "Traceback" not in json.dumps(out)
            failed.append(out["request_id"])
            continue
        assert status == 200, out
        _assert_same(rt, out, _lone(rt, verb, body), f"{verb} next to a failing request")
    assert len(failed) == 3
    log = batch_server.log.read_text()
    for request_id in failed:  # each failure is explained in the server log
        assert f"request_id {request_id}" in log
    assert "Gather" in log  # ONNX Runtime's error, with its traceback, stays server-side
    # the failing requests shared batches with others, which were answered all the same
    assert re.search(r"model moons-nsf-faulty failed on a batch of ([2-9]|\d\d+) ", log)
