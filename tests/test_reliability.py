"""Hostile input against the real service: the bad-input matrix over HTTP and gRPC (the table
in docs/API.md is this test's output), OpenAPI fuzzing with schemathesis, batch isolation with
extreme-but-valid rows, numerical robustness far outside the training support, and the
security basics (no pickle, no tracebacks or paths in answers, loopback by default).

Regenerate the docs table after a deliberate change of messages:
``GENSERVE_WRITE_DOCS=1 .venv/bin/python -m pytest tests/test_reliability.py -k matrix``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, response_schema_conformance

from bench.fuzz import exchange_raw
from service.grpc import grpc_predict_v2_pb2 as pb
from service.runtime import LOG_LIKELIHOOD_FLOOR, open_runtime

ROOT = Path(__file__).resolve().parents[1]
API_DOC = ROOT / "docs" / "API.md"
BEGIN, END = "<!-- BEGIN bad-input-matrix -->", "<!-- END bad-input-matrix -->"
X = [[0.1, 0.2], [1.0, -0.3]]
LL, SAMPLE, SCORE = "log_likelihood", "sample", "anomaly_score"
LEAKS = re.compile(r"Traceback|File \"|/work/|/tmp/|site-packages|\.py\b")


# --- the matrix -------------------------------------------------------------------------------


@dataclass(frozen=True)
class GrpcCall:
    """One ModelInfer request: tensors as (name, datatype, shape, values), parameters."""

    model: str
    inputs: tuple = ()
    parameters: tuple = ()
    raw: bytes | None = None  # a whole serialized message (for the malformed case)
    version: str = ""  # model_version


@dataclass(frozen=True)
class Case:
    label: str
    verb: str
    http: object  # a JSON-able body, raw body bytes, a RawHttp request, or None (gRPC only)
    http_status: int | None
    http_words: str  # must appear in the HTTP error message (or the note, without HTTP form)
    grpc: GrpcCall | None  # None: the case has no gRPC form (said in `grpc_note`)
    grpc_code: str = ""
    grpc_words: str = ""
    content_type: str = "application/json"
    method: str = "POST"
    grpc_note: str = ""


@dataclass(frozen=True)
class RawHttp:
    """A whole HTTP/1.1 request as bytes (request line and headers included)."""

    data: bytes


def _x(rows, datatype: str = "FP32", name: str = "x") -> tuple:
    arr = np.asarray(rows)
    return (name, datatype, list(arr.shape), arr.ravel().tolist())


def _n(n: int, seed=None) -> tuple:
    out = [("n", "INT64", [1], [n])]
    if seed is not None:
        out.append(seed)
    return tuple(out)


NSF_LL, CFM_LL, NSF_S = "moons-nsf.log_likelihood", "moons-cfm.log_likelihood", "moons-nsf.sample"
BIG_BODY = b'{"model": "moons-nsf", "x": [[0.1, 0.2]]' + b" " * (9 << 20) + b"}"
DEEP = b"[" * 5000 + b"]" * 5000
X_FP32 = ("x", "FP32", [2, 2], [0.1, 0.2, 1.0, -0.3], "fp32_contents")


def _message(model: str = NSF_LL, inputs: tuple = (X_FP32,), suffix: bytes = b"") -> bytes:
    """A serialized request built by hand (for what GrpcCall cannot say), plus raw bytes."""
    req = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape, values, field in inputs:
        getattr(req.inputs.add(name=name, datatype=datatype, shape=shape).contents,
                field).extend(values)
    return req.SerializeToString() + suffix

CASES = [
    Case("malformed JSON / protobuf", LL, b'{"model": "moons-nsf", "x": [[0.1,', 400,
         "not valid JSON", GrpcCall(NSF_LL, raw=b"\xff\xff\xff\xff"), "INVALID_ARGUMENT",
         "not a valid inference.ModelInferRequest"),
    Case("body is not an object", LL, b"[1, 2]", 400, "JSON object", None,
         grpc_note="protobuf messages are always objects"),
    Case("wrong type: model", LL, {"model": 5, "x": X}, 400, "'model'",
         GrpcCall(NSF_LL, (_x(X, "BYTES"),)), "INVALID_ARGUMENT", "supported: BOOL"),
    Case("wrong type: x", LL, {"model": "moons-nsf", "x": "abc"}, 400, "'x'",
         GrpcCall(NSF_LL, (_x(np.array(X, int), "INT64"),)), "INVALID_ARGUMENT", "send FP32"),
    Case("wrong type: value in x", LL, {"model": "moons-nsf", "x": [[0.1, "a"]]}, 400,
         "only numbers", None, grpc_note="tensors are typed"),
    Case("boolean among x's numbers", LL, {"model": "moons-nsf", "x": [[0.1, True]]}, 400,
         "only numbers", None, grpc_note="tensors are typed"),
    Case("ragged rows", LL, {"model": "moons-nsf", "x": [[0.1, 0.2], [0.3]]}, 400,
         "row 1 has 1 values", GrpcCall(NSF_LL, (("x", "FP32", [2, 2], [0.1, 0.2, 0.3]),)),
         "INVALID_ARGUMENT", "shape"),
    Case("wrong dimension", LL, {"model": "moons-nsf", "x": [[0.1, 0.2, 0.3]]}, 400,
         "expects 2", GrpcCall(NSF_LL, (_x([[0.1, 0.2, 0.3]]),)), "INVALID_ARGUMENT",
         "expects [rows, 2]"),
    Case("NaN", LL, b'{"model": "moons-nsf", "x": [[NaN, 0.2]]}', 400, "non-finite",
         GrpcCall(NSF_LL, (_x([[float("nan"), 0.2]]),)), "INVALID_ARGUMENT", "non-finite"),
    Case("Inf", LL, b'{"model": "moons-nsf", "x": [[1e400, 0.2]]}', 400, "non-finite",
         GrpcCall(NSF_LL, (_x([[float("inf"), 0.2]]),)), "INVALID_ARGUMENT", "non-finite"),
    Case("beyond float32 (1e300)", LL, {"model": "moons-nsf", "x": [[1e300, 0.2]]}, 400,
         "beyond float32 range", GrpcCall(NSF_LL, (_x([[1e300, 0.2]], "FP64"),)),
         "INVALID_ARGUMENT", "float32"),
    Case("far outside the data (1e30): floor, flagged", SCORE,
         {"model": "moons-nsf", "x": [[1e30, 0.2]]}, 200, "scores [1e+30], is_anomaly [true]",
         GrpcCall("moons-nsf.anomaly_score", (_x([[1e30, 0.2]]),)), "OK"),
    Case("empty x", LL, {"model": "moons-nsf", "x": []}, 400, "empty",
         GrpcCall(NSF_LL, (("x", "FP32", [0, 2], []),)), "INVALID_ARGUMENT", "no rows"),
    Case("too many rows (501 > 500)", LL, {"model": "moons-nsf", "x": [[0.1, 0.2]] * 501},
         413, "largest allowed is 500",
         GrpcCall(NSF_LL, (_x(np.zeros((501, 2))),)), "RESOURCE_EXHAUSTED",
         "largest allowed is 500"),
    Case("oversized body (9 MiB > 8 MiB; gRPC > 64 MiB)", LL, BIG_BODY, 413, "limit",
         GrpcCall(NSF_LL, raw=b"big"), "RESOURCE_EXHAUSTED", "larger than max"),
    Case("huge n (2001 > 2000)", SAMPLE, {"model": "moons-nsf", "n": 2001}, 413,
         "largest allowed is 2000", GrpcCall(NSF_S, _n(2001)), "RESOURCE_EXHAUSTED",
         "largest allowed is 2000"),
    Case("huge steps (10000 > 200)", LL, {"model": "moons-cfm", "x": X, "steps": 10000}, 400,
         "largest allowed is 200",
         GrpcCall(CFM_LL, (_x(X),), (("steps", 10000),)), "INVALID_ARGUMENT",
         "largest allowed is 200"),
    Case("negative seed", SAMPLE, {"model": "moons-nsf", "n": 2, "seed": -1}, 400, "'seed'",
         GrpcCall(NSF_S, _n(2, ("seed", "INT64", [1], [-1]))), "INVALID_ARGUMENT", "seed"),
    Case("non-integer seed", SAMPLE, {"model": "moons-nsf", "n": 2, "seed": 1.5}, 400,
         "'seed'", GrpcCall(NSF_S, _n(2, ("seed", "FP64", [1], [1.5]))), "INVALID_ARGUMENT",
         "seed"),
    Case("non-integer n", SAMPLE, {"model": "moons-nsf", "n": "many"}, 400, "'n'",
         GrpcCall(NSF_S, (("n", "FP64", [1], [2.5]),)), "INVALID_ARGUMENT", "'n'"),
    Case("unknown model", LL, {"model": "nope", "x": X}, 404, "moons-cfm, moons-ddpm",
         GrpcCall("nope.log_likelihood", (_x(X),)), "NOT_FOUND", "moons-cfm.sample"),
    Case("unknown solver", SAMPLE, {"model": "moons-cfm", "n": 2, "solver": "warp"}, 400,
         "choose one of", GrpcCall("moons-cfm.sample", _n(2), (("solver", "warp"),)),
         "INVALID_ARGUMENT", "choose one of"),
    Case("unknown method", LL, {"model": "moons-cfm", "x": X, "method": "magic"}, 400,
         "'method'", GrpcCall(CFM_LL, (_x(X),), (("method", "magic"),)), "INVALID_ARGUMENT",
         "method"),
    Case("unknown field / parameter", LL, {"model": "moons-nsf", "x": X, "extra": 1}, 400,
         "unknown field", GrpcCall(NSF_LL, (_x(X),), (("bogus", 1),)), "INVALID_ARGUMENT",
         "unknown parameter"),
    Case("missing field", LL, {"x": X}, 400, "'model': Field required",
         GrpcCall(NSF_LL), "INVALID_ARGUMENT", "'x'"),
    Case("target_fpr out of range", SCORE, {"model": "moons-nsf", "x": X, "target_fpr": 2},
         400, "target_fpr",
         GrpcCall("moons-nsf.anomaly_score", (_x(X),), (("target_fpr", 2.0),)),
         "INVALID_ARGUMENT", "target_fpr"),
    Case("wrong content type", LL, b"x=1", 415, "application/json", None,
         content_type="text/plain", grpc_note="gRPC carries protobuf only"),
    Case("wrong HTTP method", SAMPLE, b"", 405, "use POST", None, method="GET",
         grpc_note="gRPC has one method per call"),
    Case("unicode junk in strings", LL, {"model": "\u00e9\U0001f4a5\u0000\ud800\u202e",
                                         "x": X}, 400, "unicode string",
         GrpcCall("\u00e9\U0001f4a5\u0000\u202e.log_likelihood", (_x(X),)), "NOT_FOUND",
         "unknown model"),
    Case("invalid UTF-8", SAMPLE, b'{"model": "moons-\xff", "n": 2}', 400, "not valid UTF-8",
         GrpcCall(NSF_S, raw=b"\x0a\x07moons-\xff"), "INVALID_ARGUMENT", "not a valid"),
    Case("nested 5 000 deep (limit 32)", LL, b'{"model": "moons-nsf", "x": ' + DEEP + b"}",
         400, "5001 levels deep; at most 32",
         GrpcCall(NSF_LL, raw=_message(suffix=b"\x9b\x06" * 5000 + b"\x9c\x06" * 5000)),
         "INVALID_ARGUMENT", "not a valid"),
    Case("a 5 000-digit number (limit 100 characters)", SAMPLE,
         b'{"model": "moons-nsf", "n": ' + b"7" * 5000 + b"}", 400, "at most 100", None,
         grpc_note="tensors are typed: int64 and floats have fixed sizes"),
    Case("key given twice / input given twice", SAMPLE,
         b'{"model": "moons-nsf", "model": "moons-cfm", "n": 2}', 400, "more than once",
         GrpcCall(NSF_LL, raw=_message(inputs=(X_FP32, X_FP32))), "INVALID_ARGUMENT",
         "given twice"),
    Case("shape whose product overflows int64", LL, None, None,
         "JSON rows declare no shape",
         GrpcCall(NSF_LL, raw=_message(inputs=(("x", "FP32", [1, 2**32, 2**32], [],
                                                "fp32_contents"),))),
         "RESOURCE_EXHAUSTED", "at most 67108864"),
    Case("2 000 000 shape entries", LL, None, None, "JSON rows declare no shape",
         GrpcCall(NSF_LL, raw=_message(inputs=(("x", "FP32", [1] * 2_000_000, [],
                                                "fp32_contents"),))),
         "INVALID_ARGUMENT", "at most 8"),
    Case("values in another contents field than the datatype's", LL, None, None,
         "JSON numbers have no datatype",
         GrpcCall(NSF_LL, raw=_message(inputs=(("x", "FP32", [1, 2], [1, 2],
                                                "int64_contents"),))),
         "INVALID_ARGUMENT", "values go in contents.fp32_contents"),
    Case("request line and headers over 32 KiB", LL,
         RawHttp(b"POST /log_likelihood HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40_000
                 + b"\r\n\r\n"), 431, "exceed 32768 bytes", None,
         grpc_note="grpcio's metadata limit (8 KiB) answers RESOURCE_EXHAUSTED"),
    Case("not HTTP/1.1", LL, RawHttp(b"P\x00ST /log_likelihood HTTP/1.1\r\n\r\n"), 400,
         "not valid HTTP/1.1", None, grpc_note="HTTP/2 framing errors are grpcio's"),
    Case("a version the model does not have (7)", LL, {"model": "moons-nsf", "x": X,
                                                       "version": 7},
         404, "has no version 7 serving; its versions serving: 1",
         GrpcCall(NSF_LL, (_x(X),), version="7"), "NOT_FOUND",
         "has no version 7 serving; its versions serving: 1"),
    Case("version not a positive integer", LL, {"model": "moons-nsf", "x": X, "version": 0},
         400, "'version'", GrpcCall(NSF_LL, (_x(X),), version="v1"), "NOT_FOUND",
         "is not a version"),
    Case("repository load of a path outside the models directory", "models/../load", {}, 400,
         "not a model folder of the models directory", None,
         grpc_note="RepositoryModelLoad with model_name '..': INVALID_ARGUMENT, same words"),
]


def _early_answer(server, path: str, body: bytes) -> tuple[int, bytes]:
    """Send the headers and the first KiB only: an oversized body must be refused on its
    declared length, before the server reads (and buffers) it."""
    host, port = server.url.rsplit("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
                     f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body[:1024])
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"content-length: (\d+)", reply, re.I).group(1)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, payload = reply.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), payload


def _http(server, case: Case) -> tuple[int, str]:
    if isinstance(case.http, RawHttp):
        host, port = server.url.rsplit("//", 1)[1].split(":")
        reply = exchange_raw((host, int(port)), case.http.data, 30.0)
        assert reply.status is not None, (case.label, reply.note)
        return reply.status, json.loads(reply.body)["error"]
    if isinstance(case.http, bytes):
        body = case.http
    else:
        body = json.dumps(case.http).encode()
    if len(body) > 1 << 20:
        status, raw = _early_answer(server, f"/{case.verb}", body)
    else:
        status, raw = server.request(case.method, f"/{case.verb}", body if body else None,
                                     content_type=case.content_type)
    answer = json.loads(raw)
    if status == 200:  # the one valid row of the matrix: say what came back
        return status, ", ".join(f"{k} {json.dumps(answer[k])}" for k in
                                 ("scores", "is_anomaly", "percentile") if k in answer)
    assert set(answer) == {"error"}, answer
    return status, answer["error"]


def _infer_request(call: GrpcCall) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=call.model, model_version=call.version)
    fields = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
              "BYTES": "bytes_contents"}
    for name, datatype, shape, values in call.inputs:
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
        if datatype == "BYTES":
            values = [str(v).encode() for v in values]
        getattr(t.contents, fields[datatype]).extend(values)
    for key, value in call.parameters:
        param = req.parameters[key]
        if isinstance(value, str):
            param.string_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.int64_param = value
    return req


def _grpc(channel: grpc.Channel, call: GrpcCall) -> tuple[str, str]:
    method = "/inference.GRPCInferenceService/ModelInfer"
    if call.raw == b"big":  # over the server's 64 MiB receive limit
        req = _infer_request(GrpcCall(call.model, (_x(np.zeros((8_500_000, 2), np.float32)),)))
        payload = req.SerializeToString()
    elif call.raw is not None:
        payload = call.raw
    else:
        payload = _infer_request(call).SerializeToString()
    raw_call = channel.unary_unary(method, request_serializer=None,
                                   response_deserializer=pb.ModelInferResponse.FromString)
    try:
        raw_call(payload, timeout=60)
    except grpc.RpcError as err:
        return err.code().name, err.details() or ""
    return "OK", ""


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_address,
                               options=[("grpc.max_send_message_length", -1)]) as ch:
        yield ch


def _cell(text: str) -> str:
    text = text if len(text) <= 150 else text[:147] + "..."
    return text.replace("|", "\\|").replace("\n", " ")


def test_bad_input_matrix_over_http_and_grpc(server, channel) -> None:
    rows = ["| input | HTTP | HTTP `error` | gRPC | gRPC details |", "|---|---|---|---|---|"]
    for case in CASES:
        if case.http is None:
            status, message = "–", case.http_words
        else:
            status, message = _http(server, case)
            assert status == case.http_status, (case.label, status, message)
            assert case.http_words in message, (case.label, message)
            assert not LEAKS.search(message), (case.label, message)
        if case.grpc is None:
            code, details = "–", case.grpc_note
        else:
            code, details = _grpc(channel, case.grpc)
            assert code == case.grpc_code, (case.label, code, details)
            assert case.grpc_words in details, (case.label, details)
            assert not LEAKS.search(details), (case.label, details)
        rows.append(f"| {case.label} | {status} | {_cell(message) or '(answered)'} | {code} | "
                    f"{_cell(details) or '(answered)'} |")
    table = "\n".join(rows)
    doc = API_DOC.read_text()
    block = f"{BEGIN}\n{table}\n{END}"
    current = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), doc, re.S)
    if os.environ.get("GENSERVE_WRITE_DOCS") == "1":
        doc = doc.replace(current.group(0), block) if current else doc + "\n" + block + "\n"
        API_DOC.write_text(doc)
        current = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), doc, re.S)
    assert current is not None, f"docs/API.md lacks the {BEGIN} block"
    assert current.group(0) == block, (
        "docs/API.md's bad-input table is out of date; regenerate it with "
        "GENSERVE_WRITE_DOCS=1 pytest tests/test_reliability.py -k matrix")


# --- fuzzing against the service's own OpenAPI document ---------------------------------------

VERB_PATHS = ("/sample", "/log_likelihood", "/anomaly_score")
FUZZ_EXAMPLES = 100  # per operation and generation mode: ~8 s against the session server
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _fuzz_schema(server) -> dict:
    """/docs.json with each verb's ``model`` an enum of the served names, and ``x`` rows of
    their dimension holding float32 numbers: what a valid request is, so positive cases pass
    validation and reach the batcher and a graph (with ``model`` any string, every case
    stopped at 404), and negative cases break one rule at a time (unknown model, wrong row
    length, a number beyond float32, a wrong type, a missing or unknown field)."""
    doc = json.loads(server.get("/docs.json")[1])
    models = json.loads(server.get("/models")[1])["models"]
    (dim,) = {m["dim"] for m in models}  # the session's served models are all 2-D
    for path in VERB_PATHS:
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        fields = body["schema"]["properties"]
        fields["model"] = {"type": "string", "enum": sorted(m["name"] for m in models)}
        if "x" in fields:
            fields["x"]["items"] |= {"minItems": dim, "maxItems": dim, "items": {
                "type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}}
    return doc


def test_fuzzing_finds_no_server_error_and_answers_match_the_schema(server) -> None:
    """Every operation of /docs.json, with the served model names: seeded valid and invalid
    requests (schemathesis' positive and negative generation). No answer is a 5xx or leaks
    internals, each matches the schema the document gives for its status, every verb
    answered valid requests with 200, and the invalid ones met at least three different
    4xx statuses."""
    schema = schemathesis.openapi.from_dict(_fuzz_schema(server))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {*VERB_PATHS, "/models"}
    statuses: dict[str, Counter] = {}
    for operation in operations:
        modes = [GenerationMode.POSITIVE]
        if operation.method.upper() == "POST":
            modes.append(GenerationMode.NEGATIVE)
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                      database=None, phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            def fuzz(case) -> None:
                response = case.call(base_url=server.url, timeout=60)
                statuses.setdefault(case.operation.label, Counter())[response.status_code] += 1
                case.validate_response(response,
                                       checks=[not_a_server_error, response_schema_conformance])
                assert not LEAKS.search(response.text[:5000]), response.text[:500]

            fuzz()
    everything = sum(statuses.values(), Counter())
    assert not [code for code in everything if code >= 500], statuses
    for verb in VERB_PATHS:
        assert statuses[f"POST {verb}"][200] >= 1, statuses
    refusals = {code for code in everything if 400 <= code < 500}
    assert len(refusals) >= 3, statuses


# --- batch isolation with rows that pass validation but are extreme ----------------------------


def test_extreme_rows_in_the_same_batch_leave_good_rows_untouched(server, served_models) -> None:
    good = {"model": "moons-cfm", "x": X, "steps": 20, "solver": "rk4"}
    expected = open_runtime(served_models / "moons-cfm").log_likelihood(
        np.array(X), steps=20, solver="rk4").log_prob
    extreme = [dict(good, x=[[1e30, -1e30]]), dict(good, x=[[3e38, 0.0], [0.1, 0.2]]),
               dict(good, x=[[1e7, 1e7]]), dict(good, x=[["NaN", 1.0]])]
    jobs = [good if i % 2 else extreme[i // 2 % len(extreme)] for i in range(48)]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda b: server.post(f"/{LL}", b), jobs))
    for body, (status, out) in zip(jobs, results, strict=True):
        if body is good:
            assert status == 200 and np.allclose(out[LL], expected, atol=1e-6), out
        elif body["x"][0][0] == "NaN":
            assert status == 400 and "only numbers" in out["error"]
        else:
            assert status == 200, out
            assert out[LL][0] == LOG_LIKELIHOOD_FLOOR and np.isfinite(out[LL]).all()


# --- numerical robustness far outside the training support ------------------------------------

FAR = [1e1, 1e3, 1e6, 1e12, 1e30, 3.4e38]


@pytest.mark.parametrize("kind", ["nsf", "maf", "cfm", "ddpm"])
def test_far_inputs_get_finite_likelihoods_and_are_flagged(kind: str, artifact_factory) -> None:
    rt = open_runtime(artifact_factory(kind))
    inside = np.array([[0.5, 0.25]])
    rows = np.concatenate([inside] + [np.array([[v, v], [-v, 0.0]]) for v in FAR])
    out = rt.log_likelihood(rows, **({} if kind in ("nsf", "maf") else {"steps": 8,
                                                                       "solver": "rk4"}))
    assert np.isfinite(out.log_prob).all() and np.isfinite(out.bits_per_dim).all()
    assert (out.log_prob >= LOG_LIKELIHOOD_FLOOR).all()
    assert (out.log_prob[1:] < out.log_prob[0]).all()
    scores = rt.anomaly_score(rows, **({} if kind in ("nsf", "maf") else {"steps": 8,
                                                                          "solver": "rk4"}))
    assert scores.is_anomaly[1:].all() and np.isfinite(scores.scores).all()
    assert (scores.percentile[1:] == 100.0).all()


def test_spline_tails_are_computed_not_floored(artifact_factory) -> None:
    """NSF's linear tails: just outside [-B, B] the likelihood is still the model's own, and
    it keeps falling with distance (a Gaussian base behind identity tails)."""
    rt = open_runtime(artifact_factory("nsf"))
    radii = np.array([0.0, 6.0, 20.0, 100.0, 1e3])  # tail_bound is 5 (standardized units)
    lp = rt.log_likelihood(np.stack([radii, radii], 1)).log_prob
    assert (lp > LOG_LIKELIHOOD_FLOOR).all() and (np.diff(lp) < 0).all()


def test_logit_models_floor_rows_outside_the_unit_interval(tmp_path: Path) -> None:
    from training.checkpoint import DataSummary
    from training.config import ModelConfig, PreprocessConfig, TrainConfig
    from training.export import export_checkpoint
    from training.fit import fit_arrays

    rng = np.random.default_rng(0)
    x = rng.beta(2.0, 5.0, size=(600, 2))
    summary = DataSummary(name="beta", source="generated", rows=600, dim=2,
                          mean=x.mean(0).tolist(), std=x.std(0).tolist())
    ckpt = fit_arrays("nsf", x[:500], x[500:], data=summary,
                      model_cfg=ModelConfig(hidden_features=16, hidden_layers=1, transforms=2,
                                            bins=4),
                      pre_cfg=PreprocessConfig(logit_alpha=0.05),
                      train_cfg=TrainConfig(steps=40, batch_size=128, eval_every=40,
                                            progress=False, warmup_steps=5))
    export_checkpoint(ckpt, tmp_path / "beta-nsf", formats=("torchscript",))  # fast to export
    rt = open_runtime(tmp_path / "beta-nsf")
    rows = np.array([[0.2, 0.3], [0.0, 0.5], [1.0, 0.5], [-0.1, 0.5], [1.5, 0.5], [0.3, 1e9]])
    lp = rt.log_likelihood(rows).log_prob
    assert np.isfinite(lp).all()
    assert lp[0] > LOG_LIKELIHOOD_FLOOR and lp[1] > LOG_LIKELIHOOD_FLOOR  # alpha keeps 0 inside
    assert (lp[3:] == LOG_LIKELIHOOD_FLOOR).all()
    assert rt.anomaly_score(rows).is_anomaly[3:].all()


# --- security basics ----------------------------------------------------------------------------

# (?<![.\w]) before eval/exec/marshal: the builtins and the stdlib module, not attributes or
# packages of the same name (e.g. bentoml._internal.marshal, the batching dispatcher).
UNSAFE = re.compile(r"\bimport pickle\b|\bpickle\.|\bcloudpickle\b|allow_pickle\s*=\s*True|"
                    r"weights_only\s*=\s*False|(?<![.\w])eval\(|(?<![.\w])exec\(|"
                    r"yaml\.load\(|(?<![.\w])marshal\.")


def test_no_unsafe_deserialisation_where_user_bytes_arrive() -> None:
    hits = []
    for folder in ("service", "training"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "/oip/" in str(path) and path.name.endswith("_pb2.py"):
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if UNSAFE.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
                if "torch.load(" in line and "weights_only=True" not in line:
                    hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_refused_models_are_named_without_paths(server) -> None:
    status, raw = server.get("/models")
    listing = json.loads(raw)
    assert status == 200 and "broken" in listing["failed"]
    assert "fails its sha256 check" in listing["failed"]["broken"]
    assert not LEAKS.search(json.dumps(listing["failed"]))
    assert "refused model broken" in server.log.read_text()


def test_services_bind_loopback_unless_told_otherwise() -> None:
    from cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"
    assert re.search(r"^HOST\s*\?=\s*127\.0\.0\.1$", (ROOT / "Makefile").read_text(), re.M)


def test_missing_and_tampered_models_are_refused_while_others_load(artifact_factory,
                                                                   tmp_path: Path) -> None:
    from service.models import ModelSet
    from service.settings import load_settings

    root = tmp_path / "models"
    for name in ("good", "tampered", "missing"):
        shutil.copytree(artifact_factory("nsf"), root / name)
        manifest = json.loads((root / name / "manifest.json").read_text())
        manifest["name"] = name
        (root / name / "manifest.json").write_text(json.dumps(manifest))
    (root / "tampered" / "sample.onnx").write_bytes(b"evil")
    (root / "missing" / "log_prob.onnx").unlink()
    models = ModelSet.load(load_settings({"GENSERVE_MODELS_DIR": str(root)}))
    assert sorted(models.runtimes) == ["good"]
    assert models.failed["tampered"] == ("tampered/sample.onnx fails its sha256 check (the file "
                                         "was changed after export; re-export the model)")
    assert models.failed["missing"] == "missing/log_prob.onnx is missing"


def test_invalid_settings_stop_the_service_with_one_line() -> None:
    import subprocess
    import sys

    env = dict(os.environ, GENSERVE_MAX_QUEUE="0", GENSERVE_WORKERS="many")
    proc = subprocess.run([sys.executable, "-c", "import service.http.api"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("genserve: invalid settings: ")
    assert "GENSERVE_WORKERS" in last and "GENSERVE_MAX_QUEUE: Input should be greater" in last
