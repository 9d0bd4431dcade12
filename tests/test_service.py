"""End to end against a real `bentoml serve` subprocess on a loopback port."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import bentoml
import numpy as np
import psutil
import pytest
from conftest import metric_samples, metric_sum, running_server, scrape_metrics

from service.runtime import ModelRuntime, open_runtime

FAMILY_MODELS = {"flow": "moons-nsf", "diffusion": "moons-ddpm", "flow_matching": "moons-cfm"}
X = [[0.1, 0.2], [1.0, -0.3], [-0.7, 0.4]]


def _runtime(served_models, name: str) -> ModelRuntime:
    return open_runtime(served_models / name)


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_sample_matches_the_runtime(family: str, server, served_models) -> None:
    name = FAMILY_MODELS[family]
    body = {"model": name, "n": 5, "seed": 42}
    if family != "flow":
        body |= {"steps": 6, "solver": "heun"}
    status, out = server.post("/sample", body)
    assert status == 200, out
    expected = _runtime(served_models, name).sample(5, seed=42, steps=body.get("steps"),
                                                    solver=body.get("solver"))
    assert np.allclose(out["samples"], expected, atol=1e-6)
    assert out["seed"] == 42 and out["model"] == name
    again = server.post("/sample", body)[1]
    assert again["samples"] == out["samples"]


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_log_likelihood_and_anomaly_score_match_the_runtime(family: str, server,
                                                            served_models) -> None:
    name = FAMILY_MODELS[family]
    rt = _runtime(served_models, name)
    body = {"model": name, "x": X}
    opts = {}
    if family != "flow":
        body |= {"steps": 8, "solver": "rk4"}
        opts = {"steps": 8, "solver": "rk4"}
    status, out = server.post("/log_likelihood", body)
    assert status == 200, out
    direct = rt.log_likelihood(np.array(X), **opts)
    assert np.allclose(out["log_likelihood"], direct.log_prob, atol=1e-6)
    assert np.allclose(out["bits_per_dim"], direct.bits_per_dim, atol=1e-6)
    assert out["method"] == "exact"
    status, out = server.post("/anomaly_score", {"model": name, "x": X + [[30.0, -30.0]]})
    assert status == 200, out
    direct = rt.anomaly_score(np.array(X + [[30.0, -30.0]]))
    assert np.allclose(out["scores"], direct.scores, atol=1e-6)
    assert out["is_anomaly"] == direct.is_anomaly.tolist() and out["is_anomaly"][-1]
    assert out["threshold"] == pytest.approx(direct.threshold)


def test_hutchinson_over_http_reports_standard_errors(server, served_models) -> None:
    body = {"model": "moons-cfm", "x": X, "method": "hutchinson", "steps": 8, "solver": "rk4",
            "probes": 4, "seed": 3}
    status, out = server.post("/log_likelihood", body)
    assert status == 200, out
    direct = _runtime(served_models, "moons-cfm").log_likelihood(
        np.array(X), method="hutchinson", steps=8, solver="rk4", probes=4, seed=3)
    assert np.allclose(out["log_likelihood"], direct.log_prob, atol=1e-6)
    assert np.allclose(out["std_error"], direct.std_error, atol=1e-9)
    # in 2-D a few Rademacher probes can all agree (s.e. exactly 0), but not for every row
    assert all(s >= 0 for s in out["std_error"]) and any(s > 0 for s in out["std_error"])


def test_bentoml_sync_client(server, served_models) -> None:

    with bentoml.SyncHTTPClient(server.url, timeout=60) as client:
        out = client.log_likelihood({"model": "moons-nsf", "x": X})
        direct = _runtime(served_models, "moons-nsf").log_likelihood(np.array(X))
        assert np.allclose(out["log_likelihood"], direct.log_prob, atol=1e-6)
        listing = client.list_models()
        assert {m["name"] for m in listing["models"]} == set(FAMILY_MODELS.values())


def test_models_listing_and_refused_folder(server) -> None:
    status, raw = server.get("/models")
    assert status == 200
    listing = json.loads(raw)
    assert {m["name"] for m in listing["models"]} == set(FAMILY_MODELS.values())
    assert "sha256" in listing["failed"]["broken"]
    ddpm = next(m for m in listing["models"] if m["name"] == "moons-ddpm")
    assert "dpmpp2m" in ddpm["solvers"] and ddpm["calibration"]["target_fpr"] == 0.01
    # where each graph runs (no GPU here: GENSERVE_DEVICE=auto falls to the CPU)
    assert ddpm["devices"] == {g: "cpu" for g in ddpm["graphs"]}
    assert server.get("/readyz")[0] == 200 and server.get("/livez")[0] == 200


def test_batching_really_happens_and_changes_nothing(server, served_models) -> None:
    before = scrape_metrics(server)
    rows = np.random.default_rng(0).normal(size=(48, 2)).tolist()
    body = {"model": "moons-ddpm", "steps": 40, "solver": "rk4"}

    def one(row: list[float]) -> list[float]:
        status, out = server.post("/log_likelihood", body | {"x": [row]})
        assert status == 200, out
        return out["log_likelihood"]

    with ThreadPoolExecutor(24) as pool:
        served = [v[0] for v in pool.map(one, rows)]
    direct = _runtime(served_models, "moons-ddpm").log_likelihood(np.array(rows), steps=40,
                                                                  solver="rk4")
    assert np.allclose(served, direct.log_prob, atol=1e-5)
    after = scrape_metrics(server)
    labels = {"model": "moons-ddpm", "verb": "log_likelihood"}
    batches = (metric_sum(after, "genserve_batch_rows_count", **labels)
               - metric_sum(before, "genserve_batch_rows_count", **labels))
    batched_rows = (metric_sum(after, "genserve_batch_rows_sum", **labels)
                    - metric_sum(before, "genserve_batch_rows_sum", **labels))
    assert batched_rows == 48
    assert batches < 48, "no two requests were ever batched together"


BAD = [
    ({"model": "nope", "x": X}, 404, "served models: moons-cfm, moons-ddpm, moons-nsf"),
    ({"model": "moons-nsf", "x": [[1.0, 2.0, 3.0]]}, 400, "expects 2"),
    ({"model": "moons-nsf", "x": [[1.0, 2.0], [3.0]]}, 400, "row 1 has 1 values"),
    ({"model": "moons-nsf", "x": []}, 400, "empty"),
    ({"model": "moons-nsf", "x": [[1.0, "a"]]}, 400, "only numbers"),
    ({"model": "moons-nsf", "x": [[1.0, None]]}, 400, "only numbers"),
    ({"model": "moons-nsf", "x": [[1.0, 2.0], [True, 0.5]]}, 400, "only numbers"),
    ({"model": "moons-nsf", "x": [[1.0, 2.0]] * 501}, 413, "largest allowed is 500"),
    ({"model": "moons-nsf", "x": X, "extra": 1}, 400, "'extra': unknown field"),
    ({"model": "moons-nsf", "x": X, "method": "hutchinson"}, 400, "exact"),
    ({"model": "moons-cfm", "x": X, "solver": "magic"}, 400, "choose one of: euler"),
    ({"model": "moons-cfm", "x": X, "steps": 10_000}, 400, "largest allowed is 200"),
    ({"x": X}, 400, "'model': Field required"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD)
def test_bad_log_likelihood_requests(body: dict, status: int, message: str, server) -> None:
    got, out = server.post("/log_likelihood", body)
    assert got == status and message in out["error"], out


def test_non_finite_values_and_bad_bodies(server) -> None:
    for payload in (b'{"model": "moons-nsf", "x": [[NaN, 1.0]]}',
                    b'{"model": "moons-nsf", "x": [[1e400, 1.0]]}'):
        status, raw = server.request("POST", "/log_likelihood", payload)
        assert status == 400 and b"non-finite value at row 0, column 0" in raw
    status, raw = server.request("POST", "/log_likelihood", b'{"model": ')
    assert status == 400 and b"not valid JSON" in raw
    status, raw = server.request("POST", "/log_likelihood", b"x=1", "text/plain")
    assert status == 415 and b"application/json" in raw
    status, raw = server.request("POST", "/log_likelihood", b"[1, 2]")
    assert status == 400 and b"JSON object" in raw


def test_openapi_document_lists_every_answer_the_boundary_gives(server) -> None:
    """/docs.json documents each verb's error answers with the body they really carry, and
    docs/API.md's status table lists the same statuses."""
    import re
    from pathlib import Path

    import jsonschema

    from service.http.openapi import ERRORS

    status, raw = server.get("/docs.json")
    assert status == 200
    doc = json.loads(raw)
    error_schema = doc["components"]["schemas"]["Error"]
    for path in ("/sample", "/log_likelihood", "/anomaly_score"):
        responses = doc["paths"][path]["post"]["responses"]
        for code in ERRORS:
            assert responses[str(code)]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"}, (path, code)
        assert "Retry-After" in responses["429"]["headers"]
        assert "Retry-After" in responses["503"]["headers"]
        assert "WWW-Authenticate" in responses["401"]["headers"]
    assert "200" in doc["paths"]["/models"]["get"]["responses"]
    status, raw = server.get("/models")
    assert status == 200 and "models" in json.loads(raw)
    for method, body, ctype, code in (("POST", b"x=1", "text/plain", 415),
                                      ("GET", None, "application/json", 405),
                                      ("POST", b'{"model": "nope", "x": [[0, 0]]}',
                                       "application/json", 404)):
        status, raw = server.request(method, "/log_likelihood", body, ctype)
        assert status == code
        jsonschema.validate(json.loads(raw), error_schema)
    api_md = (Path(__file__).resolve().parents[1] / "docs" / "API.md").read_text()
    # the verbs' status table is the one under "## Errors" (other routes have their own)
    errors = api_md.split("\n## Errors", 1)[1].split("\n#", 1)[0]
    table = {int(m) for m in re.findall(r"^\| (\d{3}) \|", errors, flags=re.M)}
    assert table == set(ERRORS), \
        "docs/API.md's status table and service.http.openapi.ERRORS differ"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"model": "moons-nsf", "n": 0}, 400, "'n'"),
        ({"model": "moons-nsf", "n": 2001}, 413, "largest allowed is 2000"),
        ({"model": "moons-nsf", "n": 2, "seed": -1}, 400, "'seed'"),
        ({"model": "moons-nsf", "n": 2, "seed": 1.5}, 400, "'seed'"),
        ({"model": "moons-nsf", "n": "many"}, 400, "'n'"),
        ({"model": "moons-ddpm", "n": 2, "solver": "warp"}, 400, "ddpm, ddim, dpmpp2m"),
        ({"model": "moons-nsf", "n": 2, "solver": "rk4"}, 400, "choose one of: exact"),
    ],
)
def test_bad_sample_requests(body: dict, status: int, message: str, server) -> None:
    got, out = server.post("/sample", body)
    assert got == status and message in out["error"], out


def test_bad_requests_never_hurt_concurrent_good_ones(server, served_models) -> None:
    good = {"model": "moons-cfm", "x": X, "steps": 20, "solver": "rk4"}
    expected = _runtime(served_models, "moons-cfm").log_likelihood(
        np.array(X), steps=20, solver="rk4").log_prob
    jobs = [good if i % 2 else BAD[i % len(BAD)][0] for i in range(40)]
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda b: server.post("/log_likelihood", b), jobs))
    for body, (status, out) in zip(jobs, results, strict=True):
        if body is good:
            assert status == 200 and np.allclose(out["log_likelihood"], expected, atol=1e-6)
        else:
            assert 400 <= status < 500 and "error" in out


def test_metrics_parse_and_counters_move(server) -> None:
    before = scrape_metrics(server)
    for _ in range(3):
        assert server.post("/log_likelihood", {"model": "moons-nsf", "x": X})[0] == 200
    assert server.post("/anomaly_score", {"model": "moons-nsf", "x": [[40.0, 40.0]]})[0] == 200
    assert server.post("/sample", {"model": "nope", "n": 1})[0] == 404
    after = scrape_metrics(server)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("genserve_requests_total", model="moons-nsf", verb="log_likelihood",
                 status="200") == 3
    assert delta("genserve_rows_total", model="moons-nsf", verb="log_likelihood") == 9
    assert delta("genserve_anomalies_total", model="moons-nsf") == 1
    assert delta("genserve_requests_total", model="unknown", verb="sample", status="404") == 1
    assert delta("genserve_graph_seconds_count", model="moons-nsf", graph="log_prob") >= 3
    assert metric_sum(after, "genserve_models_loaded", state="ok") == 3
    assert metric_sum(after, "genserve_models_loaded", state="failed") == 1
    # BentoML's own counters sit beside genserve's and move too
    assert delta("bentoml_service_request_total", endpoint="/log_likelihood",
                 http_response_code="200") == 3


def test_metrics_add_up_across_two_workers(served_models, tmp_path) -> None:
    """With 2 worker processes both serve, and /metrics (whichever worker answers) counts
    every request. BentoML's per-process ``last_request_timestamp`` gauge says which
    workers served since the test began (its probe and /metrics paths do not set it)."""
    body = {"model": "moons-nsf", "x": X}
    with running_server(served_models, tmp_path / "two.log",
                        env={"GENSERVE_WORKERS": "2"}) as two:
        workers = {p.pid for p in psutil.Process(two.proc.pid).children(recursive=True)
                   if "_bentoml_impl.worker" in " ".join(p.cmdline())}
        assert len(workers) == 2
        began, sent, served_by = time.time(), 0, set()
        deadline = time.monotonic() + 60
        while served_by != workers:  # the kernel hands each connection to either worker
            assert time.monotonic() < deadline, f"only {served_by} of {workers} served"
            with ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(lambda _: two.post("/log_likelihood", body)[0],
                                         range(24)))
            assert statuses == [200] * 24
            sent += 24
            stamps = metric_samples(scrape_metrics(two),
                                    "bentoml_service_last_request_timestamp_seconds")
            served_by = {int(dict(labels)["pid"]) for labels, t in stamps.items()
                         if t >= began}
            assert served_by <= workers, (served_by, workers)
        for _ in range(3):  # any worker may answer the scrape; each must see the total
            after = scrape_metrics(two)
            assert metric_sum(after, "genserve_requests_total", model="moons-nsf",
                              verb="log_likelihood", status="200") == sent
            assert metric_sum(after, "genserve_rows_total", model="moons-nsf",
                              verb="log_likelihood") == 3 * sent
        assert metric_sum(after, "genserve_models_loaded", state="ok") == 3


def test_fast_path_answers_like_bentomls_route(server, served_models, tmp_path) -> None:
    """Verb requests go from the boundary straight to BentoML's batcher
    (``service.http.dispatch``); through BentoML's own HTTP route
    (``GENSERVE_FAST_PATH=false``) and with batching off the answers, statuses and content
    types are the same."""
    from conftest import running_server

    requests = [
        ("/sample", {"model": "moons-nsf", "n": 4, "seed": 3}),
        ("/sample", {"model": "moons-ddpm", "n": 3, "seed": 5, "steps": 6, "solver": "heun"}),
        ("/log_likelihood", {"model": "moons-nsf", "x": X}),
        ("/log_likelihood", {"model": "moons-cfm", "x": X, "steps": 8, "solver": "rk4"}),
        ("/anomaly_score", {"model": "moons-nsf", "x": X + [[30.0, -30.0]]}),
        ("/anomaly_score", {"model": "moons-nsf", "x": X, "target_fpr": 0.2}),
        ("/log_likelihood", {"model": "moons-nsf", "x": [[0.1]]}),  # refused at the boundary
    ]

    def answers(srv) -> list[tuple[int, str, object]]:
        out = []
        for path, body in requests:
            status, headers, raw = srv.exchange("POST", path, json.dumps(body).encode())
            out.append((status, headers.get("content-type"), json.loads(raw)))
        return out

    fast = answers(server)
    assert [a[0] for a in fast] == [200] * 6 + [400], fast
    assert "straight to BentoML's batcher" in server.log.read_text()
    env = {"GENSERVE_MAX_LATENCY_MS": "30000"}
    with running_server(served_models, tmp_path / "route.log",
                        env=env | {"GENSERVE_FAST_PATH": "false"}) as route:
        assert answers(route) == fast
        assert "through BentoML's HTTP route" in route.log.read_text()
    with running_server(served_models, tmp_path / "unbatched.log",
                        env=env | {"GENSERVE_BATCHING": "false"}) as unbatched:
        assert answers(unbatched) == fast
