"""Coverage-guided fuzzing (atheris, libFuzzer) of the boundary and the OIP decoder, in process.

    python -m bench.fuzz_atheris --target boundary|oip [--runs N] [--seed S]
    python -m bench.fuzz_atheris --target all [--runs N] [--seed S] [--no-write]

``boundary``: the boundary's one function from body bytes to a validated request
(``service.http.boundary.parse_and_validate``). ``oip``: the OIP decoder
(``service.grpc.convert.request_fields``), whose fields then go through the same validation
(``service.validation.validate_verb``) as a gRPC call's do. Any exception other than the
refusals they are meant to raise (``RequestError``, ``OipError``, protobuf's
``DecodeError``) is a crash: libFuzzer prints it with its input, writes ``crash-*`` in the
working directory and exits non-zero. Half the inputs are taken as they are, half drive a
structured generator (a JSON request, a message built field by field), which reaches
validation far more often than mutated bytes do. ``tests/test_hostile.py`` runs 20 000 inputs
of each; longer runs are for here: ``all`` runs both targets (each in its own process) and
writes the "reliability-atheris" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atheris_corpus", "atheris_target", "main", "run_atheris"]


def _cards() -> dict:
    from service.schemas import ModelInfo

    def card(name: str, family: str, shape: list[int], calibrated: bool) -> ModelInfo:
        solvers = [] if family == "flow" else ["euler", "heun", "dopri5"]
        return ModelInfo(name=name, family=family, model_type=name.split("-")[1],
                         dim=math.prod(shape), shape=shape, graphs=["log_prob"],
                         runtime="onnx", solvers=solvers, defaults={},
                         calibration={"threshold": 1.0} if calibrated else None)

    return {"moons-nsf": card("moons-nsf", "flow", [2], True),
            "moons-ddpm": card("moons-ddpm", "diffusion", [2], False),
            "digits-glow": card("digits-glow", "flow", [1, 2, 2], True)}


VERB_LIST = ("sample", "log_likelihood", "anomaly_score")


def atheris_corpus() -> dict[str, list[bytes]]:
    """Seed inputs of each target: the first byte picks the verb (and model)."""
    from bench.mutations import grpc_seeds, http_seeds

    boundary = []
    for req in http_seeds({"moons-nsf": 2, "digits-glow": 4}):
        head, _, body = req.data.partition(b"\r\n\r\n")
        verb = head.split(b" ")[1].decode().strip("/")
        boundary.append(bytes([VERB_LIST.index(verb) * 2 + 1]) + body)
    boundary.append(b"\x03" + json.dumps({"model": "digits-glow", "x": [[[[1, 2], [3, 4]]]]})
                    .encode())
    boundary += [bytes([i]) + random.Random(i).randbytes(64) for i in range(6)]
    oip = [bytes([i * 2 + 1]) + payload for i, (method, payload) in enumerate(
        grpc_seeds({"moons-nsf": 2})) if method == "ModelInfer"]
    oip += [bytes([i * 2]) + random.Random(i).randbytes(64) for i in range(12)]
    return {"boundary": boundary, "oip": oip}


KEYS = ("model", "x", "n", "seed", "steps", "solver", "method", "probes", "target_fpr")
NAMES = ("moons-nsf", "moons-ddpm", "digits-glow", "nope", "", "x" * 70)
STRINGS = ("exact", "hutchinson", "rk4", "dopri5", "ddim", "euler", "warp", "\ud800", "é")


def _json_value(fdp: Any, depth: int) -> Any:
    """A JSON-able value drawn from ``fdp`` (atheris.FuzzedDataProvider), nested at most
    ``depth`` deeper: numbers of every kind, strings, booleans, null, rows and objects."""
    kind = fdp.ConsumeIntInRange(0, 9 if depth > 0 else 6)
    if kind == 0:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 16))
    if kind == 1:
        return fdp.ConsumeFloat()  # NaN, inf, huge included
    if kind == 2:
        return fdp.PickValueInList(list(STRINGS + NAMES))
    if kind == 3:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 8))
    if kind == 4:
        return fdp.ConsumeBool()
    if kind == 5:
        return None
    if kind == 6:
        return fdp.ConsumeRegularFloat()
    if kind == 9:
        return {fdp.PickValueInList(list(KEYS)): _json_value(fdp, depth - 1)
                for _ in range(fdp.ConsumeIntInRange(0, 3))}
    size = fdp.ConsumeIntInRange(0, 5)
    return [_json_value(fdp, depth - 1) for _ in range(size)]


def _json_request(fdp: Any) -> bytes:
    """A verb request body: known keys with values of any kind (a few unknown keys)."""
    body: dict = {}
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        key = fdp.PickValueInList(list(KEYS) + ["extra"])
        if key == "model":
            body[key] = fdp.PickValueInList(list(NAMES))
        elif key == "x" and fdp.ConsumeBool():
            rows, dim = fdp.ConsumeIntInRange(0, 4), fdp.ConsumeIntInRange(0, 5)
            body[key] = [[fdp.ConsumeRegularFloat() for _ in range(dim)]
                         for _ in range(rows)]
        else:
            body[key] = _json_value(fdp, 4)
    return json.dumps(body).encode()


def _oip_request(fdp: Any) -> bytes:
    """A ModelInferRequest built field by field from ``fdp``, then serialized."""
    from service.grpc import grpc_predict_v2_pb2 as pb

    req = pb.ModelInferRequest()
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        t = req.inputs.add(name=fdp.PickValueInList(["x", "n", "seed", "y"]),
                           datatype=fdp.PickValueInList(["FP32", "FP64", "INT64", "INT32",
                                                         "BOOL", "BYTES", "UINT8"]))
        t.shape.extend(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 3),
                                                 -2, 2**63 - 1) if fdp.ConsumeBool()
                       else [fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 5)])
        count = fdp.ConsumeIntInRange(0, 12)
        field_name = fdp.PickValueInList(["fp32_contents", "fp64_contents", "int64_contents",
                                          "int_contents", "bool_contents", "raw"])
        if field_name == "raw":
            req.raw_input_contents.append(fdp.ConsumeBytes(count * 4))
        elif field_name in ("fp32_contents", "fp64_contents"):
            getattr(t.contents, field_name).extend(fdp.ConsumeFloatList(count))
        elif field_name == "bool_contents":
            t.contents.bool_contents.extend(fdp.ConsumeIntListInRange(count, 0, 1))
        else:
            bits = 31 if field_name == "int_contents" else 63
            getattr(t.contents, field_name).extend(fdp.ConsumeIntListInRange(
                count, -(2**bits), 2**bits - 1))
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        p = req.parameters[fdp.PickValueInList(list(KEYS[3:]) + ["timeout", "bogus"])]
        kind = fdp.ConsumeIntInRange(0, 4)
        if kind == 0:
            p.string_param = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 8))
        elif kind == 1:
            p.double_param = fdp.ConsumeFloat()
        elif kind == 2:
            p.int64_param = fdp.ConsumeIntInRange(-(2**63), 2**63 - 1)
        elif kind == 3:
            p.uint64_param = fdp.ConsumeIntInRange(0, 2**64 - 1)
        else:
            p.bool_param = fdp.ConsumeBool()
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        req.outputs.add(name=fdp.PickValueInList(["scores", "samples", "nope"]))
    return req.SerializeToString()


def atheris_target(name: str) -> Callable[[bytes], None]:
    """The one-input function of target ``name`` (our modules imported under coverage
    instrumentation). The first byte picks the verb and model, and whether the rest is taken
    as it is (odd) or drives a structured generator (even)."""
    import atheris
    import bentoml  # noqa: F401 - the boundary's heavy imports, loaded uninstrumented
    import google.protobuf  # noqa: F401
    import pydantic  # noqa: F401

    with atheris.instrument_imports(include=["service"]):
        from service.grpc import grpc_predict_v2_pb2 as pb
        from service.grpc.convert import OipError, request_fields
        from service.http.boundary import parse_and_validate
        from service.settings import Settings
        from service.validation import RequestError, validate_verb
    from google.protobuf.message import DecodeError

    cards = _cards()
    settings = Settings(max_rows=50, max_samples=100)

    def boundary(data: bytes) -> None:
        if not data:
            return
        body = data[1:] if data[0] & 1 else _json_request(atheris.FuzzedDataProvider(data[1:]))
        try:
            parse_and_validate(VERB_LIST[data[0] // 2 % 3], body, cards, settings)
        except RequestError:
            pass

    def oip(data: bytes) -> None:
        if not data:
            return
        verb = VERB_LIST[data[0] // 2 % 3]
        model = ("moons-nsf", "digits-glow")[data[0] // 6 % 2]
        raw = data[1:] if data[0] & 1 else _oip_request(atheris.FuzzedDataProvider(data[1:]))
        try:
            req = pb.ModelInferRequest.FromString(raw)
        except DecodeError:
            return
        try:
            fields, _ = request_fields(model, verb, cards[model], req, settings.max_rows)
            validate_verb(verb, fields, cards, settings)
        except (OipError, RequestError):
            pass

    return {"boundary": boundary, "oip": oip}[name]


def run_atheris(target: str, runs: int, seed: int, max_len: int = 4096) -> None:
    """libFuzzer over ``target`` for ``runs`` inputs from its seed corpus (does not return:
    libFuzzer exits, 0 when nothing crashed)."""
    import atheris

    corpus = Path(tempfile.mkdtemp(prefix=f"atheris-{target}-"))
    for i, data in enumerate(atheris_corpus()[target]):
        (corpus / f"seed{i}").write_bytes(data)
    one_input = atheris_target(target)
    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-seed={seed}", f"-max_len={max_len}",
                   "-timeout=20", "-rss_limit_mb=4096", str(corpus)], one_input)
    atheris.Fuzz()


def run_all(runs: int, seed: int) -> list[dict]:
    """Each target in its own process (libFuzzer exits when done): what it reported."""
    root = Path(__file__).resolve().parents[1]
    rows = []
    for target in ("boundary", "oip"):
        workdir = Path(tempfile.mkdtemp(prefix=f"atheris-run-{target}-"))
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "bench.fuzz_atheris", "--target", target,
                               "--runs", str(runs), "--seed", str(seed)], cwd=workdir,
                              env={**os.environ, "PYTHONPATH": str(root)},
                              capture_output=True, text=True)
        done = re.search(r"DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", proc.stderr)
        rows.append({"target": target, "runs": runs, "seconds": time.monotonic() - started,
                     "exit": proc.returncode,
                     "crashes": max(len(list(workdir.glob("crash-*"))), int(proc.returncode != 0)),
                     "edges": int(done.group(1)) if done else None,
                     "features": int(done.group(2)) if done else None,
                     "corpus": int(done.group(3)) if done else None,
                     "tail": proc.stderr[-2000:] if proc.returncode else ""})
    return rows


def markdown(rows: list[dict], command: str) -> str:
    from bench.report import machine_line, markdown_table

    names = {"boundary": "boundary: `parse_and_validate` (bytes to a validated request)",
             "oip": "OIP decoder: `request_fields`, then `validate_verb` of its fields"}
    table = markdown_table(
        ["target", "inputs", "time", "inputs/s", "crashes (target 0)", "coverage edges",
         "features", "corpus"],
        [[names[r["target"]], r["runs"], f"{r['seconds']:.0f} s",
          f"{r['runs'] / r['seconds']:.0f}", r["crashes"], r["edges"], r["features"],
          r["corpus"]] for r in rows])
    return f"""### Reliability: coverage-guided fuzzing (atheris)

Reproduce: `{command}` ({machine_line()}).

libFuzzer (atheris) in process, coverage measured on the `service` package only; half the
inputs are taken as bytes, half drive a structured generator (a JSON request of known and
unknown fields with values of every kind; a `ModelInferRequest` built field by field). A
crash is any exception other than the refusals the functions are meant to raise
(`RequestError`, `OipError`, protobuf's `DecodeError`). Before these runs atheris found two,
both fixed: `x` whose rows hold lists made a 3-D array that the float32-range check could
not index (now 400), and an empty tensor whose other sizes multiply past numpy's index range
(`[0, 2**40, 2**40]`) could not be shaped (now RESOURCE_EXHAUSTED).

{table}
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz_atheris",
                                description=__doc__.splitlines()[0])
    p.add_argument("--target", choices=("boundary", "oip", "all"), required=True)
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="all: print, do not write the docs")
    ns = p.parse_args(argv)
    if ns.target != "all":
        run_atheris(ns.target, ns.runs, ns.seed)
        return 0
    rows = run_all(ns.runs, ns.seed)
    print(json.dumps(rows, indent=1))
    if not ns.no_write:
        from bench.report import write_section

        write_section("reliability-atheris", markdown(
            rows, f"python -m bench.fuzz_atheris --target all --runs {ns.runs} --seed "
            f"{ns.seed}"))
    return 0 if all(r["exit"] == 0 and not r["crashes"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
