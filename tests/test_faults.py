"""Overload, timeouts and faults against real `bentoml serve` processes: a full queue answers
503 with Retry-After at once, without waiting for a slot (UNAVAILABLE over gRPC), a request
past its timeout answers 504 and the service goes on, a killed worker is replaced without
anyone's help, and SIGTERM lets the requests in flight finish before the process exits.

No assertion reads the wall clock against a fixed window: what must come first is shown to
have come first (a metric, a log line, an answer), polled with a deadline that only guards
against a hang."""

from __future__ import annotations

import http.client
import math
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psutil
import pytest
from conftest import metric_sum, scrape_metrics
from test_auth import access_lines

from service.devserver import Server, running_server
from service.grpc import grpc_predict_v2_pb2 as pb
from service.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

QUEUE, TIMEOUT_S = 2, 8
SMALL = {"model": "moons-nsf", "x": [[0.1, 0.2]]}


@pytest.fixture(scope="module")
def busy(served_models: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("busy") / "server.log"
    env = {"GENSERVE_MAX_QUEUE": str(QUEUE), "GENSERVE_TIMEOUT_S": str(TIMEOUT_S),
           "GENSERVE_MAX_STEPS": "1000000", "GENSERVE_MAX_SAMPLES": "20000",
           "GENSERVE_RETRY_AFTER_S": "2"}
    with running_server(served_models, log, env=env) as s:
        yield s


def _slow_body(server: Server, seconds: float) -> dict:
    """A /sample request that keeps a worker busy for about ``seconds`` (measured here)."""
    body = {"model": "moons-cfm", "n": 2000, "solver": "euler"}
    # a short request is mostly fixed costs (and BentoML's batcher may hold it back while it
    # learns), which would make a step look dearer and the "slow" request far shorter
    steps, took = _timed_steps(server, body, 100, 0.5)
    return dict(body, steps=int(min(1_000_000, max(200, seconds * steps / took))))


def _timed_steps(server: Server, body: dict, steps: int, at_least_s: float
                 ) -> tuple[int, float]:
    """Double ``steps`` from ``steps`` until one ``/sample`` request takes ``at_least_s``:
    the steps and the fastest of three requests of that many steps, the cost of a step
    without the fixed costs. (Load only slows a request down: one slowed by a busy moment
    would make a step look dearer, and a request sized from it far shorter than meant.)"""

    def timed(again: bool = False) -> float:
        start = time.perf_counter()
        status, out = server.post("/sample", dict(body, steps=steps))
        took = time.perf_counter() - start
        if again and status == 504:  # a repeat slowed past the server's timeout: no estimate
            return math.inf
        assert status == 200, (steps, took, out)
        return took

    took = 0.0
    while took < at_least_s and steps < 1_000_000:
        steps *= 2
        took = timed()
    return steps, min(took, timed(again=True), timed(again=True))


def _post_with_headers(server: Server, path: str, body: bytes) -> tuple[int, dict, float]:
    req = urllib.request.Request(server.url + path, data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            resp.read()
            return resp.status, _lower(resp.headers), time.perf_counter() - start
    except urllib.error.HTTPError as err:
        err.read()
        return err.code, _lower(err.headers), time.perf_counter() - start


def _lower(headers) -> dict:
    return {k.lower(): v for k, v in headers.items()}


def _until(condition, what: str, deadline_s: float = 60) -> None:
    """Poll ``condition()`` until true; the deadline only guards against a hang."""
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {deadline_s} s"
        time.sleep(0.1)


def _batches_started(server: Server, model: str, verb: str) -> float:
    """Graph batches begun (``genserve_batch_rows`` is observed as a batch starts to run)."""
    return metric_sum(scrape_metrics(server), "genserve_batch_rows_count", model=model,
                      verb=verb)


def test_a_full_queue_answers_503_at_once_with_a_retry_hint(busy: Server) -> None:
    import json

    # two admitted requests may run one after the other: 2 x 1.5 s stays inside the 8 s
    # timeout on a machine 2.5x slower than when measured
    before = len(_access_lines(busy.log, "sample"))
    slow = json.dumps(_slow_body(busy, 1.5)).encode()
    _until(lambda: len(_access_lines(busy.log, "sample")) > before,
           "the calibration request's access line")
    logged = len(_access_lines(busy.log, "sample"))
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: _post_with_headers(busy, "/sample", slow), range(12)))
    # admitted: answered, or past the timeout on a machine far slower than measured
    admitted = [r for r in results if r[0] in (200, 504)]
    rejected = [r for r in results if r[0] == 503]
    assert len(admitted) + len(rejected) == 12, [r[0] for r in results]
    assert 1 <= len(admitted) <= QUEUE and len(rejected) >= 12 - QUEUE
    for _, headers, _ in rejected:
        assert headers.get("retry-after") == "2"
    # at once: every rejection was answered before any admitted request, each of which ran
    # for ~1.5 s of compute (a rejection that waited for a slot would take at least as long)
    slowest_rejection = max(seconds for *_, seconds in rejected)
    fastest_admitted = min(seconds for *_, seconds in admitted)
    assert slowest_rejection < fastest_admitted, (slowest_rejection, fastest_admitted)
    status, out = busy.post("/log_likelihood", SMALL)  # and it serves again at once
    assert status == 200, out
    wanted = Counter(r[0] for r in results)  # one line per request, refused ones too

    def logged_statuses() -> Counter:
        return Counter(line["status"] for line in _access_lines(busy.log, "sample")[logged:])

    _until(lambda: logged_statuses() >= wanted, f"access lines for {wanted}")


def _access_lines(log: Path, verb: str) -> list[dict]:
    return [line for line in access_lines(log) if line["verb"] == verb]


def test_overload_reaches_grpc_as_unavailable(busy: Server) -> None:
    """The worker's one queue bound holds for both transports: full from HTTP requests,
    it refuses a gRPC call too (UNAVAILABLE with the retry hint)."""
    import json

    slow = json.dumps(_slow_body(busy, 4.0)).encode()
    with grpc.insecure_channel(busy.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name="moons-nsf.log_likelihood")
        t = req.inputs.add(name="x", datatype="FP32", shape=[1, 2])
        t.contents.fp32_contents.extend([0.1, 0.2])

        def grpc_call() -> tuple[str, str, dict]:
            try:
                stub.ModelInfer(req, timeout=30)
                return "OK", "", {}
            except grpc.RpcError as err:
                return err.code().name, err.details(), dict(err.trailing_metadata() or ())

        assert grpc_call()[0] == "OK"
        # more holders than the queue admits, all at once: the queue fills, the rest 503
        hold = [threading.Thread(target=_post_with_headers, args=(busy, "/sample", slow))
                for _ in range(QUEUE + 2)]
        for th in hold:
            th.start()
        time.sleep(0.5)
        deadline = time.monotonic() + 30  # until the queue is seen full over HTTP
        while busy.post("/log_likelihood", SMALL)[0] != 503:
            assert time.monotonic() < deadline, "the queue never filled"
            time.sleep(0.05)
        code, details, metadata = grpc_call()
        for th in hold:
            th.join()
        assert code == "UNAVAILABLE" and "at capacity" in details, (code, details)
        assert metadata.get("retry-after") == "2", metadata
        assert grpc_call()[0] == "OK"


def test_request_timeout_is_enforced_and_the_service_goes_on(busy: Server) -> None:
    import json

    slow = json.dumps(_slow_body(busy, TIMEOUT_S * 6)).encode()
    logged = len(_access_lines(busy.log, "sample"))
    rows = {"model": "moons-cfm", "verb": "sample"}
    rows_before = _counter(busy, "genserve_rows_total", **rows)
    status, _, seconds = _post_with_headers(busy, "/sample", slow)  # answered: no hang
    # not before its timeout; ~6 timeouts of work were asked for, so only the timeout (not
    # the end of the work) can have answered it, and the access log says 504 as well
    assert status == 504 and seconds >= TIMEOUT_S - 0.5, (status, seconds)
    _until(lambda: any(line["status"] == 504
                       for line in _access_lines(busy.log, "sample")[logged:]),
           "the 504's access line")
    # its batch had started, so it runs to the end (its rows are counted then): waiting for
    # that leaves no stray work to slow the tests after this one
    done = rows_before + json.loads(slow)["n"]
    _until(lambda: _counter(busy, "genserve_rows_total", **rows) >= done,
           "the timed-out request's batch finishing", deadline_s=180)
    status, out = busy.post("/log_likelihood", SMALL)  # and the service goes on
    assert status == 200, out


def _counter(server: Server, name: str, **labels: str) -> float:
    return metric_sum(scrape_metrics(server), name, **labels)


def test_a_request_that_timed_out_in_the_queue_is_not_computed(served_models: Path,
                                                               tmp_path: Path) -> None:
    """A request still queued when it times out (504) is left out of its batch: its rows are
    never computed (``genserve_abandoned_total`` counts it, ``genserve_rows_total`` does not).
    Its own server, with a 2 s timeout, so the request ahead of it need only run a few s."""
    import json

    timeout_s = 2  # the probes below (< 1 s, plus BentoML's hold-back) must fit in it
    env = {"GENSERVE_TIMEOUT_S": str(timeout_s), "GENSERVE_MAX_STEPS": "1000000",
           "GENSERVE_MAX_SAMPLES": "20000",
           # above the timeout: BentoML's batcher drops requests queued longer than this
           # itself, which would hide genserve's own leaving-out of timed-out ones
           "GENSERVE_MAX_LATENCY_MS": "60000"}
    body = {"model": "moons-cfm", "n": 2000, "solver": "euler"}
    rows = {"model": "moons-cfm", "verb": "sample"}
    with running_server(served_models, tmp_path / "server.log", env=env) as busy:
        # BentoML's batcher spends its first 11 batches learning its latency model, and in
        # the last two holds a lone request back for company for a few learned batch times:
        # after slow batches that outlasts the 2 s timeout. Cheap requests get it past that.
        for _ in range(12):
            assert busy.post("/sample", dict(body, n=1, steps=1))[0] == 200
        # the cost of a step from a request of at least 0.7 s: a hiccup makes it look dearer
        # (a difference of two short requests could make it look far cheaper)
        steps, took = _timed_steps(busy, body, 25, 0.7)  # doubling stays under the 2 s timeout
        # ~10 s: it must outlast the next request's 2 s timeout even if a hiccup while
        # measuring made a step look several times dearer than it is
        slow = dict(body, steps=int(min(1_000_000, 10.0 * steps / took)))
        before = (_counter(busy, "genserve_rows_total", **rows),
                  _counter(busy, "genserve_abandoned_total", **rows))
        started = _batches_started(busy, "moons-cfm", "sample")

        # (the model's version sits between the model and the rows)
        def logged_504s() -> int:
            return sum('"verb":"sample","model":"moons-cfm",' in ln
                       and '"rows":2000,"status":504' in ln
                       for ln in busy.log.read_text().splitlines())

        # a repeat of _timed_steps slowed past the timeout is a 504 of its own
        logged_before = logged_504s()
        answers: dict = {}
        first = threading.Thread(target=lambda: answers.update(
            first=_post_with_headers(busy, "/sample", json.dumps(slow).encode())))
        first.start()
        # the first request's batch is running, so the next one waits in the queue
        _until(lambda: _batches_started(busy, "moons-cfm", "sample") > started,
               "the first request's batch starting")
        queued = json.dumps(dict(slow, seed=7)).encode()
        status, _, seconds = _post_with_headers(busy, "/sample", queued)
        assert status == 504 and seconds >= timeout_s - 0.5, (status, seconds)
        first.join()
        assert answers["first"][0] == 504  # it ran past the timeout too, but had started
        _until(lambda: _counter(busy, "genserve_abandoned_total", **rows) >= before[1] + 1,
               "the timed-out request left out of its batch", deadline_s=90)
        # a 1-sample request queued behind it: once answered, every earlier batch has run
        assert busy.post("/sample", dict(body, n=1, steps=1))[0] == 200
        assert _counter(busy, "genserve_rows_total", **rows) == before[0] + slow["n"] + 1
        assert _counter(busy, "genserve_abandoned_total", **rows) == before[1] + 1
        assert busy.post("/log_likelihood", SMALL)[0] == 200
        # the access log says what the clients got (it said 500 or 503 before)
        _until(lambda: logged_504s() >= logged_before + 2, "both 504s in the access log")
        assert logged_504s() == logged_before + 2


def _workers(server: Server) -> list[psutil.Process]:
    return [p for p in psutil.Process(server.proc.pid).children(recursive=True)
            if "_bentoml_impl.worker" in " ".join(p.cmdline())]


def test_a_killed_worker_is_replaced_and_service_recovers(busy: Server) -> None:
    (worker,) = _workers(busy)
    results: list[tuple[float, object]] = []
    stop = time.monotonic() + 600

    def load() -> None:
        while time.monotonic() < stop:
            try:
                status, _ = busy.post("/log_likelihood", SMALL, timeout=10)
            except (OSError, http.client.HTTPException) as err:  # the killed worker's answers
                status = type(err).__name__
            results.append((time.monotonic(), status))
            time.sleep(0.02)

    threads = [threading.Thread(target=load) for _ in range(QUEUE)]
    for th in threads:
        th.start()
    _until(lambda: sum(s == 200 for _, s in results) >= 5, "answers before the kill")
    killed_at = time.monotonic()
    os.kill(worker.pid, signal.SIGKILL)
    recovered = None
    while time.monotonic() < killed_at + 90:
        time.sleep(0.5)
        late = [s for t, s in results if t > time.monotonic() - 2]
        if len(late) >= 8 and all(s in (200, 503) for s in late) and 200 in late:
            recovered = time.monotonic() - killed_at
            break
    stop = 0
    for th in threads:
        th.join()
    assert recovered is not None, sorted({str(s) for _, s in results})
    (replacement,) = _workers(busy)
    assert replacement.pid != worker.pid
    assert busy.get("/readyz")[0] == 200
    assert sum(s == 200 for t, s in results if t < killed_at) > 0


def test_sigterm_drains_requests_in_flight(served_models: Path, tmp_path: Path) -> None:
    import json

    env = {"GENSERVE_MAX_STEPS": "1000000", "GENSERVE_MAX_SAMPLES": "20000"}
    with running_server(served_models, tmp_path / "drain.log", env=env) as s:
        slow = json.dumps(_slow_body(s, 3.0)).encode()
        started = _batches_started(s, "moons-cfm", "sample")
        answer: dict = {}
        th = threading.Thread(target=lambda: answer.update(
            r=_post_with_headers(s, "/sample", slow)))
        th.start()
        _until(lambda: _batches_started(s, "moons-cfm", "sample") > started,
               "the slow request's batch starting")  # in flight, not still on its way
        os.killpg(s.proc.pid, signal.SIGTERM)
        th.join(timeout=120)
        assert answer["r"][0] == 200, answer
        assert s.proc.wait(timeout=60) == 0
