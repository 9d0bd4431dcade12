"""Every request gets an answer (issue #31): hostile input and hostile clients against a real
server, each with a deadline in the test, so an unanswered request fails instead of waiting.

The four requests that used to hang (nesting 5 000 and 100 000 deep, a 5 000-digit number in
``x`` and in ``n``), the JSON limits, the catch-all 500, lingering over unread bodies, header
and body deadlines, the header size limit, the connection bound, gRPC's hostile messages, a
seeded mutation fuzzer over raw HTTP bytes and gRPC messages, and atheris over the
boundary's parse-and-validate function and the OIP decoder (longer runs: ``bench/fuzz.py``,
``bench/fuzz_atheris.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from test_batching import MARKER as FAULT_MARKER
from test_batching import add_fault

from bench.fuzz import exchange_raw, fuzz_grpc, fuzz_http, grpc_call
from bench.mutations import grpc_seeds, http_request, http_seeds
from service.devserver import Server, running_server
from service.grpc import grpc_predict_v2_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "exported_models"  # the committed default models: nothing to train
DIMS = {"moons-nsf": 2, "moons-otcfm": 2, "breast-cancer-maf": 30}
DEADLINE = 10.0  # seconds: "answered at all", never a timing claim
LEAKS = re.compile(r"Traceback|File \"|/work/|/tmp/|site-packages|\.py\b")
METRICS_TOKEN = "metrics-token-0123456789abcdef"
HOSTILE_ENV = {
    "GENSERVE_MAX_ROWS": "500",
    "GENSERVE_MAX_BODY_BYTES": str(1 << 20),
    "GENSERVE_LINGER_BYTES": str(4 << 20),
    "GENSERVE_HEADER_TIMEOUT_S": "1",
    "GENSERVE_BODY_TIMEOUT_S": "3",
    "GENSERVE_MIN_BODY_RATE": "1024",
    "GENSERVE_MAX_HEADER_BYTES": "8192",
    "GENSERVE_MAX_CONNECTIONS": "32",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default models with small limits and short deadlines (``HOSTILE_ENV``)."""
    folder = tmp_path_factory.mktemp("hostile")
    token = folder / "metrics-token"
    token.write_text(METRICS_TOKEN)
    env = dict(HOSTILE_ENV, GENSERVE_METRICS_TOKEN_FILE=str(token))
    with running_server(MODELS, folder / "server.log", env=env) as server:
        yield server


@pytest.fixture(scope="module")
def hostile_grpc(hostile: Server) -> str:
    """The hostile server's own gRPC edge."""
    return hostile.grpc_address


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.rsplit("//", 1)[1].split(":")
    return host, int(port)


def _raw(server: Server, data: bytes) -> tuple[int | None, dict]:
    reply = exchange_raw(_address(server), data, DEADLINE)
    assert reply.status is not None, f"no answer within {DEADLINE} s ({reply.note})"
    body = json.loads(reply.body) if reply.body.startswith(b"{") else {}
    return reply.status, body


def _post(server: Server, path: str, body: bytes) -> tuple[int | None, dict]:
    return _raw(server, http_request(path, body))


def _good(server: Server) -> None:
    status, answer = _post(server, "/log_likelihood", b'{"model": "moons-nsf", "x": [[0, 1]]}')
    assert status == 200, answer


# --- the four requests of the issue, and the JSON limits --------------------------------------

HANGING = {
    "x nested 5 000 deep": ("/log_likelihood", b'{"model": "moons-nsf", "x": '
                            + b"[" * 5000 + b"]" * 5000 + b"}", "5001 levels deep"),
    "x nested 100 000 deep": ("/log_likelihood", b'{"model": "moons-nsf", "x": '
                              + b"[" * 100_000 + b"]" * 100_000 + b"}", "100001 levels deep"),
    "a 5 000-digit integer in x": ("/log_likelihood", b'{"model": "moons-nsf", "x": [['
                                   + b"7" * 5000 + b", 1]]}", "5000 characters"),
    "n a 5 000-digit integer": ("/sample", b'{"model": "moons-nsf", "n": ' + b"7" * 5000 + b"}",
                                "5000 characters"),
}


@pytest.mark.parametrize("case", sorted(HANGING))
def test_the_requests_that_hung_are_answered_400(hostile: Server, case: str) -> None:
    path, body, words = HANGING[case]
    status, answer = _post(hostile, path, body)
    assert status == 400 and words in answer["error"], answer
    assert "at most 32" in answer["error"] or "at most 100" in answer["error"], answer
    _good(hostile)


@pytest.mark.parametrize("body, words", [
    (b'{"model": "moons-nsf", "model": "moons-otcfm", "n": 2}', "key 'model' more than once"),
    (b'{"model": "moons-\xff", "n": 2}', "not valid UTF-8 (byte 0xff at position 17)"),
    (b'{"model": "moons-nsf", "n": 2, "seed": ' + b"[" * 32 + b"]" * 32 + b"}",
     "33 levels deep; at most 32"),
    (b'{"model": "moons-nsf", "x": [[1e' + b"0" * 200 + b', 1]]}', "202 characters"),
])
def test_json_the_parser_cannot_take_is_400_saying_which(hostile: Server, body: bytes,
                                                         words: str) -> None:
    status, answer = _post(hostile, "/sample", body)
    assert status == 400 and words in answer["error"], answer


def test_strings_may_hold_brackets_and_digits(hostile: Server) -> None:
    """The scan blanks string literals: what they hold does not count as nesting or numbers."""
    status, answer = _post(hostile, "/sample", json.dumps(
        {"model": "[" * 100 + "7" * 200, "n": 2}).encode())
    assert status == 400 and "String should have at most 64 characters" in answer["error"]


# --- the catch-all ------------------------------------------------------------------------------


def test_an_unexpected_exception_is_a_json_500_with_a_request_id(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """The boundary in process, its request body read failing in a way nothing expects: the
    client gets ``internal error`` and an id, the log the traceback under that id."""
    from service.http.boundary import BoundaryMiddleware
    from service.settings import Settings

    async def app(scope: dict, receive: object, send: object) -> None:
        raise AssertionError("the request must not reach the app")

    async def receive() -> dict:
        raise RuntimeError("the body could not be read")

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    boundary = BoundaryMiddleware(app, Settings(models_dir=tmp_path, fast_path=False))
    scope = {"type": "http", "method": "POST", "path": "/sample",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"9")]}
    with caplog.at_level(logging.ERROR, logger="genserve"):
        asyncio.run(boundary(scope, receive, send))
    assert sent[0]["status"] == 500
    answer = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert set(answer) == {"error", "request_id"} and answer["error"] == "internal error"
    record = next(r for r in caplog.records if answer["request_id"] in r.getMessage())
    assert record.exc_info and "the body could not be read" in str(record.exc_info[1])


# --- lingering over unread bodies -------------------------------------------------------------


@pytest.mark.parametrize("path, content_type, status", [
    ("/log_likelihood", "application/json", 413),  # over GENSERVE_MAX_BODY_BYTES
    ("/log_likelihood", "text/plain", 415),
    ("/metrics", "application/json", 401),  # /metrics asks for its token
])
def test_early_answers_reach_clients_that_send_the_whole_body_first(
        hostile: Server, path: str, content_type: str, status: int) -> None:
    """urllib sends ``Connection: close`` and the whole body before it reads: it reads the
    answer, not a connection reset."""
    body = b'{"model": "moons-nsf", "x": [[0.1, 0.2]]' + b" " * (2 << 20) + b"}"
    got, headers, raw = hostile.exchange("POST", path, body, {"Content-Type": content_type},
                                         timeout=DEADLINE)
    assert got == status and "error" in json.loads(raw), raw


def test_a_refused_body_is_drained_and_the_connection_serves_the_next_request(
        hostile: Server) -> None:
    big = http_request("/log_likelihood", b"[" + b" " * (2 << 20) + b"]")
    good = http_request("/log_likelihood", b'{"model": "moons-nsf", "x": [[0, 1]]}')
    with socket.create_connection(_address(hostile), timeout=DEADLINE) as sock:
        sock.sendall(big + good)
        replies = b""
        while replies.count(b"HTTP/1.1 ") < 2 or not replies.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, f"closed after {replies!r}"
            replies += chunk
    assert replies.startswith(b"HTTP/1.1 413") and b"HTTP/1.1 200" in replies, replies[:500]


def test_a_body_beyond_the_linger_bound_still_gets_the_answer_while_writing(
        hostile: Server) -> None:
    """6 MiB > GENSERVE_LINGER_BYTES (4 MiB): a client that reads while it writes reads the
    413, and the connection ends."""
    data = http_request("/log_likelihood", b" " * (6 << 20))
    with socket.create_connection(_address(hostile), timeout=DEADLINE) as sock:
        writer = threading.Thread(target=lambda: _send_quietly(sock, data), daemon=True)
        writer.start()
        head = sock.recv(65536)
        writer.join(DEADLINE)
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower(), head


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the server has answered and closed the connection


# --- connection-level faults ----------------------------------------------------------------


def _until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_headers_that_never_finish_are_408_and_the_connection_closed(hostile: Server) -> None:
    with socket.create_connection(_address(hostile), timeout=DEADLINE) as sock:
        sock.sendall(b"POST /sample HTTP/1.1\r\nHost: x\r\nContent-Ty")
        answer = _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer


def test_a_connection_that_sends_nothing_is_closed(hostile: Server) -> None:
    with socket.create_connection(_address(hostile), timeout=DEADLINE) as sock:
        assert _until_closed(sock) == b""


@pytest.mark.parametrize("drip", [False, True], ids=["nothing", "one byte per 0.5 s"])
def test_a_body_that_does_not_arrive_in_time_is_408(hostile: Server, drip: bool) -> None:
    """Headers, then nothing, or a body far below GENSERVE_MIN_BODY_RATE (1024 bytes/s)."""
    head = http_request("/log_likelihood", b"")
    head = head.replace(b"Content-Length: 0", b"Content-Length: 1000")
    with socket.create_connection(_address(hostile), timeout=DEADLINE) as sock:
        sock.sendall(head)
        sock.settimeout(0.5 if drip else DEADLINE)
        answer = b""
        start = time.monotonic()
        while not answer and time.monotonic() - start < DEADLINE:
            if drip:
                sock.sendall(b" ")
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                continue
        sock.settimeout(DEADLINE)
        answer += _until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"connection: close" in answer.lower() and b"did not arrive in time" in answer


@pytest.mark.parametrize("headers", [b"X-Big: " + b"a" * 9000,
                                     b"\r\n".join(b"X-%d: %s" % (i, b"b" * 50)
                                                  for i in range(200))],
                         ids=["one big header", "many headers"])
def test_header_blocks_over_the_limit_are_431(hostile: Server, headers: bytes) -> None:
    data = http_request("/livez", b"", method="GET").replace(b"\r\n\r\n", b"\r\n" + headers
                                                             + b"\r\n\r\n")
    status, answer = _raw(hostile, data)
    assert status == 431 and "exceed 8192 bytes" in answer["error"]


def test_invalid_http_is_answered_400_as_json(hostile: Server) -> None:
    status, answer = _raw(hostile, b"P\x00ST /sample HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400 and "not valid HTTP/1.1" in answer["error"], answer


def test_idle_connections_beyond_the_bound_make_room_for_new_ones(server: Server) -> None:
    """The default bound, 1024 connections per worker: 40 idle connections more than that, and
    the longest idle are closed to make room (not the others, which the 10 s header deadline
    would close later), while a new connection is served."""
    socks = [socket.create_connection(_address(server), timeout=DEADLINE) for _ in range(1064)]
    try:
        status, answer = _raw(server, http_request("/sample", b'{"model": "moons-nsf", "n": 1}'))
        assert status == 200, answer
        oldest, newest = socks[:40], socks[-900:]
        closed: set[int] = set()
        poll = select.poll()
        for sock in oldest:
            poll.register(sock, select.POLLIN)
        deadline = time.monotonic() + DEADLINE / 2
        while len(closed) < len(oldest) and time.monotonic() < deadline:
            for fd, _ in poll.poll(100):
                poll.unregister(fd)
                closed.add(fd)
        assert len(closed) == len(oldest) and all(s.recv(1) == b"" for s in oldest)
        poll = select.poll()
        for sock in newest:
            poll.register(sock, select.POLLIN)
        assert not poll.poll(0)  # still open, waiting for a request
    finally:
        for sock in socks:
            sock.close()


def test_a_connection_over_the_bound_with_all_busy_is_503(hostile: Server) -> None:
    """32 connections (GENSERVE_MAX_CONNECTIONS) each hold a request whose body the server is
    reading (it has asked for it: ``100 Continue``); one more is answered 503 with
    Retry-After, and once their bodies time out (408) the server serves again."""
    head = http_request("/log_likelihood", b"").replace(
        b"Content-Length: 0", b"Content-Length: 100\r\nExpect: 100-continue")
    busy = []
    try:
        for _ in range(32):
            sock = socket.create_connection(_address(hostile), timeout=DEADLINE)
            sock.sendall(head)
            assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue")
            busy.append(sock)
        status, answer = _post(hostile, "/sample", b'{"model": "moons-nsf", "n": 1}')
        assert status == 503 and "limit of 32 connections" in answer["error"], answer
        for sock in busy:
            assert _until_closed(sock).startswith(b"HTTP/1.1 408")
    finally:
        for sock in busy:
            sock.close()
    _good(hostile)


def test_the_glue_finds_everything_it_touches_in_uvicorn() -> None:
    from service.http.uvicorn_glue import TOUCHES, missing

    gone = missing()
    assert not gone, "uvicorn lacks what service/http/uvicorn_glue.py touches: " + "; ".join(
        f"{name} ({TOUCHES[name]})" for name in gone)


# --- gRPC -------------------------------------------------------------------------------------


def _infer(address: str, req: pb.ModelInferRequest | bytes) -> tuple[str, str]:
    payload = req if isinstance(req, bytes) else req.SerializeToString()
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:
        reply = grpc_call(channel, "ModelInfer", payload, DEADLINE)
    assert reply.status != "DEADLINE_EXCEEDED", "no answer within the deadline"
    return str(reply.status), reply.body.decode()


def _x_request(shape: list[int], values: list[float] | None = None,
               field: str = "fp32_contents") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="moons-nsf.log_likelihood")
    t = req.inputs.add(name="x", datatype="FP32", shape=shape)
    getattr(t.contents, field).extend(values or [])
    return req


def _nested(depth: int) -> bytes:
    req = _x_request([1, 2], [0.1, 0.2]).SerializeToString()
    return req + b"\x9b\x06" * depth + b"\x9c\x06" * depth  # field 99, start / end group


def _many_inputs(count: int) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="moons-nsf.log_likelihood")
    for i in range(count):
        req.inputs.add(name=f"i{i}")
    return req


GRPC_CASES = {  # case: (request, code, words in the details)
    "nested 200 000 deep": (lambda: _nested(200_000), "INVALID_ARGUMENT", "not a valid"),
    "shape overflowing int64": (lambda: _x_request([1, 2**32, 2**32]), "RESOURCE_EXHAUSTED",
                                "multiply to 18446744073709551616"),
    "shape product just over 2**63": (lambda: _x_request([1, 3037000500, 3037000500]),
                                      "RESOURCE_EXHAUSTED", "multiply to 9223372037000250000"),
    "an empty shape too big to make": (lambda: _x_request([0, 2**40, 2**40]),
                                       "RESOURCE_EXHAUSTED", f"multiply to {2**80}"),
    "2 million shape entries": (lambda: _x_request([1] * 2_000_000), "INVALID_ARGUMENT",
                                "2000000 dimensions"),
    "200 000 inputs": (lambda: _many_inputs(200_000), "INVALID_ARGUMENT", "200000 inputs"),
    "values in the wrong contents field": (lambda: _x_request([1, 2], [1, 2], "int64_contents"),
                                           "INVALID_ARGUMENT", "in contents.int64_contents"),
    "more rows than allowed, declared": (lambda: _x_request([20_000, 2]), "RESOURCE_EXHAUSTED",
                                         "'x' is 20000; the largest allowed is 500"),
}


@pytest.mark.parametrize("case", sorted(GRPC_CASES))
def test_hostile_grpc_messages_are_refused_never_unknown(hostile_grpc: str, case: str) -> None:
    make, code, words = GRPC_CASES[case]
    got, details = _infer(hostile_grpc, make())
    assert got == code and words in details, (got, details)


def test_an_unexpected_grpc_failure_is_internal_with_a_request_id(tmp_path: Path) -> None:
    """A model whose graph raises (a fault planted in its preprocess graph) answers a gRPC
    call INTERNAL, with a request id the server log explains and no internals."""
    models = tmp_path / "models"
    shutil.copytree(MODELS / "moons-nsf", models / "moons-nsf-faulty")
    add_fault(models / "moons-nsf-faulty")
    with running_server(models, tmp_path / "server.log") as server:
        req = _x_request([1, 2], [0.1, FAULT_MARKER])
        req.model_name = "moons-nsf-faulty.log_likelihood"
        code, details = _infer(server.grpc_address, req)
        log = server.log.read_text()
    assert code == "INTERNAL" and details.startswith("internal error (request_id "), details
    request_id = details.split()[-1].rstrip(")")
    assert f"(request_id {request_id})" in log and "Traceback" in log
    assert not LEAKS.search(details)


# --- the mutation fuzzer ------------------------------------------------------------------------


def test_mutated_http_requests_are_all_answered_never_5xx(hostile: Server) -> None:
    """Seeded mutations of valid requests over raw sockets: each answered within the
    deadline, no 5xx, and a good request answered 200 after each."""
    tally = fuzz_http(_address(hostile), http_seeds(DIMS), count=300, seed=31, jobs=4,
                      deadline_s=DEADLINE, incomplete=0.0)
    summary = tally.summary()
    assert summary["unanswered"] == 0 and summary["server_errors"] == 0, summary["failures"]
    assert summary["good_failures"] == 0, summary["failures"]
    assert len(summary["statuses"]) >= 5, summary  # the mutations reach many answers
    assert "internal error on" not in hostile.log.read_text()


def test_mutated_grpc_messages_are_all_answered_never_unknown(hostile_grpc: str,
                                                              hostile: Server) -> None:
    tally = fuzz_grpc(hostile_grpc, grpc_seeds(DIMS), count=200, seed=31, jobs=4,
                      deadline_s=DEADLINE)
    summary = tally.summary()
    assert summary["unanswered"] == 0 and summary["server_errors"] == 0, summary["failures"]
    assert summary["good_failures"] == 0, summary["failures"]
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= set(summary["statuses"]), summary


@pytest.mark.parametrize("target", ["boundary", "oip"])
def test_atheris_finds_no_exception_but_refusals(target: str, tmp_path: Path) -> None:
    """Coverage-guided fuzzing in process, bounded (``python -m bench.fuzz_atheris`` runs
    longer): only RequestError / OipError may leave the functions."""
    proc = subprocess.run([sys.executable, "-m", "bench.fuzz_atheris", "--target", target,
                           "--runs", "20000", "--seed", "31"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Done 20000 runs" in proc.stderr
    assert not list(tmp_path.glob("crash-*"))
