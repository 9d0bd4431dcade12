"""Hostile requests made from valid ones: the mutation fuzzer's seeds and mutators.

HTTP: raw HTTP/1.1 request bytes (request line, headers, body) for each verb, and mutations
of them: truncation, bit flips, deep nesting, huge numbers, invalid UTF-8, duplicate keys,
junk values, and edits of the request line and headers (method, path, content type and
length, chunked bodies, huge or many headers, ``Expect: 100-continue``, HTTP/1.0). Body
mutations fix ``Content-Length`` so the request is complete; a few on purpose leave it wrong
or cut the request short, and are answered only by the server's deadlines.

gRPC: serialized ``ModelInferRequest`` messages, mutated as bytes (truncation, bit flips,
deeply nested unknown groups) and as messages (shapes that overflow int64 or have millions
of entries, values in the wrong contents field, raw contents of the wrong size, many inputs,
junk names and parameters).

Every mutator takes a ``random.Random``: a run is reproduced by its seed.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.grpc import grpc_predict_v2_pb2 as pb

__all__ = ["GRPC_METHODS", "HttpRequest", "grpc_mutation", "grpc_seeds", "http_mutation",
           "http_request", "http_seeds"]

GRPC_METHODS = ("ModelInfer", "ModelMetadata", "ModelReady")


@dataclass(frozen=True)
class HttpRequest:
    """A request as bytes, and the mutation that made it (``seed`` for an untouched one)."""

    data: bytes
    mutation: str = "seed"


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None,
                 method: str = "POST", version: str = "HTTP/1.1") -> bytes:
    head = {"Host": "127.0.0.1", "Content-Type": "application/json",
            "Content-Length": str(len(body)), **(headers or {})}
    lines = [f"{method} {path} {version}"] + [f"{k}: {v}" for k, v in head.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def http_seeds(models: dict[str, int], headers: dict[str, str] | None = None,
               ) -> list[HttpRequest]:
    """Valid requests of every verb for each ``{model name: dim}``."""
    rng = np.random.default_rng(0)
    out = []
    for name, dim in sorted(models.items()):
        for rows in (1, 3):
            x = rng.normal(size=(rows, dim)).round(4).tolist()
            for verb in ("log_likelihood", "anomaly_score"):
                body = json.dumps({"model": name, "x": x}).encode()
                out.append(HttpRequest(http_request(f"/{verb}", body, headers)))
        body = json.dumps({"model": name, "n": 2, "seed": 1}).encode()
        out.append(HttpRequest(http_request("/sample", body, headers)))
    return out


def _split(data: bytes) -> tuple[bytes, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def _with_body(head: bytes, body: bytes) -> bytes:
    head = re.sub(rb"(?im)^content-length: *\d+", b"Content-Length: %d" % len(body), head)
    return head + b"\r\n\r\n" + body


def _insert(rng: random.Random, body: bytes, piece: bytes) -> bytes:
    at = rng.randrange(len(body) + 1)
    return body[:at] + piece + body[at:]


def _value(rng: random.Random) -> bytes:
    depth = rng.choice((2, 40, 5000, 100_000))
    return rng.choice((
        b"[" * depth + b"]" * depth,
        b"[" * depth,
        b'{"a":' * depth + b"1" + b"}" * depth,
        b"1" * rng.choice((101, 4301, 5000, 20_000)),
        b"-0." + b"0" * 5000 + b"1e-99999",
        b"1e" + b"9" * rng.choice((3, 400)),
        b"NaN", b"Infinity", b"-Infinity", b"null", b"true", b'"a"', b"{}", b"[]", b"[[]]",
        b'"\xff\xfe"', b'"\xed\xa0\x80"', b'"\\ud800"', b'"' + b"\\" * 7,
        b"1" * 40, b"18446744073709551616", b"-9223372036854775809", b"1.5", b"0",
        json.dumps([[1e308, -1e308]]).encode(), json.dumps([[[[0.1]]]] * 3).encode(),
    ))


# -- body mutations: Content-Length fixed afterwards -------------------------------------------
def _truncate(rng: random.Random, body: bytes) -> bytes:
    return body[:rng.randrange(len(body) + 1)]


def _bit_flips(rng: random.Random, body: bytes) -> bytes:
    out = bytearray(body)
    for _ in range(rng.choice((1, 1, 2, 8))):
        if out:
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _junk_value(rng: random.Random, body: bytes) -> bytes:
    """A value replaced: numbers, strings, rows, or a field's value."""
    spots = [m.span() for m in re.finditer(rb'-?\d[\d.eE+-]*|"[^"]*"|\[[^\[\]]*\]', body)]
    if not spots:
        return _insert(rng, body, _value(rng))
    a, b = rng.choice(spots)
    return body[:a] + _value(rng) + body[b:]


def _nesting(rng: random.Random, body: bytes) -> bytes:
    depth = rng.choice((33, 1000, 5000, 100_000))
    return body.replace(b'"x": ', b'"x": ' + b"[" * depth, 1) + b"]" * depth


def _huge_number(rng: random.Random, body: bytes) -> bytes:
    digits = b"9" * rng.choice((101, 4300, 4301, 5000, 50_000))
    return re.sub(rb'("n": |\[\[)(-?\d)', lambda m: m.group(1) + digits, body, count=1)


def _invalid_utf8(rng: random.Random, body: bytes) -> bytes:
    return _insert(rng, body, rng.choice((b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80",
                                          b"\xc0\xaf", b"\x00")))


def _duplicate_key(rng: random.Random, body: bytes) -> bytes:
    return body.replace(b"{", b'{"model": "moons-nsf", ', 1) if rng.random() < 0.5 else \
        body.replace(b"}", b', "x": [[0, 0]]}', 1)


def _splice(rng: random.Random, body: bytes) -> bytes:
    return _insert(rng, body, rng.randbytes(rng.randrange(1, 64)))


def _replace_body(rng: random.Random, body: bytes) -> bytes:
    return rng.choice((b"", b"{}", b"[]", b"null", b'"x"', b"{" * 40, body * 2, b"\xef\xbb\xbf"
                       + body, body + b"garbage", b'{"model": "moons-nsf", "x": ' + _value(rng)
                       + b"}", b'{"model": "moons-nsf", "n": ' + _value(rng) + b"}"))


BODY_MUTATIONS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "truncate": _truncate, "bit flips": _bit_flips, "junk value": _junk_value,
    "nesting": _nesting, "huge number": _huge_number, "invalid UTF-8": _invalid_utf8,
    "duplicate key": _duplicate_key, "splice bytes": _splice, "replace body": _replace_body,
}


# -- request line and header mutations ----------------------------------------------------------
def _method(rng: random.Random, head: bytes, body: bytes) -> bytes:
    verb = rng.choice((b"GET", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD", b"TRACE",
                       b"POSTX", b"P\x00ST", b"get"))
    return head.replace(b"POST", verb, 1) + b"\r\n\r\n" + body


def _path(rng: random.Random, head: bytes, body: bytes) -> bytes:
    path = rng.choice((b"/sample", b"/log_likelihood", b"/anomaly_score", b"/models", b"/nope",
                       b"/sample?x=1", b"//sample", b"/%ff", b"/\xff", b"*", b"/" + b"a" * 9000,
                       b"/sample#", b"/../etc/passwd", b"http://evil/sample"))
    return re.sub(rb"^(\S+) \S+", lambda m: m.group(1) + b" " + path, head, count=1) + \
        b"\r\n\r\n" + body


def _content_type(rng: random.Random, head: bytes, body: bytes) -> bytes:
    ctype = rng.choice((b"text/plain", b"application/json; charset=latin-1", b"",
                        b"application/JSON", b"multipart/form-data; boundary=x", b"\xff"))
    return re.sub(rb"(?im)^content-type:.*$", b"Content-Type: " + ctype, head) + \
        b"\r\n\r\n" + body


def _drop_header(rng: random.Random, head: bytes, body: bytes) -> bytes:
    name = rng.choice((b"content-type", b"host", b"content-length"))
    return re.sub(rb"(?im)^" + name + rb":.*\r\n?", b"", head) + b"\r\n\r\n" + body


def _chunked(rng: random.Random, head: bytes, body: bytes) -> bytes:
    head = re.sub(rb"(?im)^content-length:.*$", b"Transfer-Encoding: chunked", head)
    cut = rng.randrange(len(body) + 1)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:cut], body[cut:]) if p)
    tail = rng.choice((b"0\r\n\r\n", b"0\r\n\r\n", b"zz\r\n", b"ffffffffffffffffff\r\n"))
    return head + b"\r\n\r\n" + chunks + tail


def _big_headers(rng: random.Random, head: bytes, body: bytes) -> bytes:
    if rng.random() < 0.5:
        extra = b"\r\nX-Big: " + b"a" * rng.choice((8000, 40_000, 200_000))
    else:
        extra = b"".join(b"\r\nX-%d: %s" % (i, b"b" * 40) for i in range(rng.choice((100,
                                                                                   2000))))
    return head + extra + b"\r\n\r\n" + body


def _header_edit(rng: random.Random, head: bytes, body: bytes) -> bytes:
    extra = rng.choice((b"Expect: 100-continue", b"Connection: close", b"Connection: keep-alive",
                        b"Content-Length: 5", b"Transfer-Encoding: gzip", b"X-Bad\x00: 1",
                        b"Authorization: Bearer nope", b": empty-name", b"Host: \xff",
                        b"Content-Encoding: gzip"))
    if rng.random() < 0.3:
        head = head.replace(b"HTTP/1.1", rng.choice((b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9")), 1)
    return head + b"\r\n" + extra + b"\r\n\r\n" + body


def _head_flips(rng: random.Random, head: bytes, body: bytes) -> bytes:
    return _bit_flips(rng, head) + b"\r\n\r\n" + body


HEAD_MUTATIONS: dict[str, Callable[[random.Random, bytes, bytes], bytes]] = {
    "method": _method, "path": _path, "content type": _content_type,
    "drop header": _drop_header, "chunked": _chunked, "big headers": _big_headers,
    "header edit": _header_edit, "head bit flips": _head_flips,
}


# -- mutations that leave the request incomplete: answered by the server's deadlines ----------
def _cut_request(rng: random.Random, data: bytes) -> bytes:
    return data[:rng.randrange(1, len(data))]


def _longer_length(rng: random.Random, data: bytes) -> bytes:
    head, body = _split(data)
    return re.sub(rb"(?im)^content-length: *\d+", b"Content-Length: %d"
                  % (len(body) + rng.randrange(1, 1000)), head) + b"\r\n\r\n" + body


INCOMPLETE: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "cut request": _cut_request, "longer Content-Length": _longer_length,
}


def http_mutation(rng: random.Random, seed: HttpRequest, incomplete: float = 0.02,
                  ) -> HttpRequest:
    """One mutation of ``seed``: a body mutation (60 %), a head mutation (the rest), or with
    probability ``incomplete`` a request left incomplete on purpose."""
    if rng.random() < incomplete:
        name = rng.choice(sorted(INCOMPLETE))
        return HttpRequest(INCOMPLETE[name](rng, seed.data), name)
    head, body = _split(seed.data)
    if rng.random() < 0.6:
        name = rng.choice(sorted(BODY_MUTATIONS))
        return HttpRequest(_with_body(head, BODY_MUTATIONS[name](rng, body)), name)
    name = rng.choice(sorted(HEAD_MUTATIONS))
    return HttpRequest(HEAD_MUTATIONS[name](rng, head, body), name)


# -- gRPC ----------------------------------------------------------------------------------------
def grpc_seeds(models: dict[str, int]) -> list[tuple[str, bytes]]:
    """``(method, serialized request)`` pairs, valid, for every verb of each model."""
    rng = np.random.default_rng(1)
    out = []
    for name, dim in sorted(models.items()):
        for verb in ("log_likelihood", "anomaly_score"):
            x = rng.normal(size=(2, dim)).astype(np.float32)
            req = pb.ModelInferRequest(model_name=f"{name}.{verb}")
            t = req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
            t.contents.fp32_contents.extend(x.ravel().tolist())
            out.append(("ModelInfer", req.SerializeToString()))
            raw = pb.ModelInferRequest(model_name=f"{name}.{verb}")
            raw.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
            raw.raw_input_contents.append(x.tobytes())
            out.append(("ModelInfer", raw.SerializeToString()))
        req = pb.ModelInferRequest(model_name=f"{name}.sample")
        req.inputs.add(name="n", datatype="INT64", shape=[1]).contents.int64_contents.append(2)
        req.parameters["seed"].int64_param = 3
        out.append(("ModelInfer", req.SerializeToString()))
        meta = pb.ModelMetadataRequest(name=f"{name}.log_likelihood")
        out.append(("ModelMetadata", meta.SerializeToString()))
        ready = pb.ModelReadyRequest(name=f"{name}.sample")
        out.append(("ModelReady", ready.SerializeToString()))
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _message(rng: random.Random, data: bytes) -> bytes:
    """A structural mutation of a ModelInferRequest."""
    req = pb.ModelInferRequest.FromString(data)
    t = req.inputs[0] if req.inputs else req.inputs.add(name="x", datatype="FP32")
    kind = rng.randrange(11)
    if kind == 0:  # a shape whose product overflows int64
        t.ClearField("shape")
        t.shape.extend(rng.choice(([2**32, 2**32], [2**62, 4], [2**63 - 1, 2**63 - 1, 2],
                                   [3037000500, 3037000500], [-1, 2], [0, 2**63 - 1])))
    elif kind == 1:  # millions of shape entries
        t.shape.extend([1] * rng.choice((9, 1000, 2_000_000)))
    elif kind == 2:  # values in another contents field than the datatype's
        field = rng.choice(("int64_contents", "bool_contents", "fp64_contents",
                            "uint64_contents", "int_contents", "fp32_contents"))
        values = {"bool_contents": [True, False]}.get(field, [1, 2, 3, 4])
        getattr(t.contents, field).extend(values)
    elif kind == 3:  # another datatype
        t.datatype = rng.choice(("FP64", "INT64", "BOOL", "BYTES", "FP16", "UINT8", "", "fp32",
                                 "\x00"))
    elif kind == 4:  # raw contents of the wrong size, or both forms
        req.raw_input_contents.append(rng.randbytes(rng.choice((0, 3, 8, 1001))))
    elif kind == 5:  # many inputs, outputs or parameters
        many = rng.choice((9, 10_000, 100_000))
        target = rng.choice(("inputs", "outputs", "parameters"))
        for i in range(many):
            if target == "inputs":
                req.inputs.add(name=f"i{i}", datatype="FP32")
            elif target == "outputs":
                req.outputs.add(name=f"o{i}")
            else:
                req.parameters[f"p{i}"].int64_param = i
    elif kind == 6:  # junk names
        req.model_name = rng.choice(("", ".", "moons-nsf", "x" * 10_000, "\u00e9\u202e.sample",
                                     "moons-nsf.sample.sample", "moons-nsf.x"))
    elif kind == 7:  # junk parameters
        key = rng.choice(("seed", "steps", "solver", "method", "probes", "target_fpr", "bogus",
                          "timeout", ""))
        p = req.parameters[key]
        choice = rng.randrange(5)
        if choice == 0:
            p.string_param = rng.choice(("9" * 5000, "nan", "inf", "-1", "1e999", "", "x"))
        elif choice == 1:
            p.double_param = rng.choice((float("nan"), float("inf"), -0.0, 1e308, 0.5))
        elif choice == 2:
            p.uint64_param = 2**64 - 1
        elif choice == 3:
            p.int64_param = rng.choice((-(2**63), 2**63 - 1, 0))
        else:
            p.bool_param = True
    elif kind == 8:  # many values, declared consistently
        rows = rng.choice((100_000, 1_000_000))
        t.ClearField("shape")
        t.shape.extend([rows, 2])
        t.ClearField("contents")
        t.contents.fp32_contents.extend([0.5] * (2 * rows))
    elif kind == 9:  # non-finite or huge values
        t.contents.fp32_contents[:] = []
        t.contents.fp32_contents.extend([float("nan"), float("inf"), 3.4e38, -1e-45][:len(
            t.contents.fp32_contents) or 2])
    else:  # the input renamed or duplicated
        if rng.random() < 0.5:
            t.name = rng.choice(("", "X", "n", "x" * 1000, "seed"))
        else:
            req.inputs.add().CopyFrom(t)
    return req.SerializeToString()


def _nested_group(rng: random.Random, data: bytes) -> bytes:
    depth = rng.choice((50, 101, 10_000, 200_000))
    start, end = _varint(99 << 3 | 3), _varint(99 << 3 | 4)
    return data + start * depth + end * depth


def _huge_varint(rng: random.Random, data: bytes) -> bytes:
    """A length-delimited field that claims more bytes than the message has."""
    return data + _varint(5 << 3 | 2) + _varint(rng.choice((2**31, 2**63, 2**70)))


GRPC_BYTE_MUTATIONS: dict[str, Callable[[random.Random, bytes], bytes]] = {
    "truncate": _truncate, "bit flips": _bit_flips, "splice bytes": _splice,
    "nested groups": _nested_group, "huge length": _huge_varint,
}


def grpc_mutation(rng: random.Random, seed: tuple[str, bytes]) -> tuple[str, bytes, str]:
    """``(method, payload, mutation name)`` made from a seed."""
    method, data = seed
    if method == "ModelInfer" and rng.random() < 0.6:
        return method, _message(rng, data), "message"
    name = rng.choice(sorted(GRPC_BYTE_MUTATIONS))
    return method, GRPC_BYTE_MUTATIONS[name](rng, data), name
