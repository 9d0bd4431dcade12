"""Open Inference Protocol tensors <-> the data plane's verb requests and answers.

One OIP model per (served model, verb), named ``NAME.VERB``, each with a fixed signature
(``signature``) that ModelMetadata reports and ModelInfer checks. A request's tensors are
decoded from typed ``contents`` or ``raw_input_contents`` and checked (datatype, shape
against the model's dimension, finite values, raw size) before anything is forwarded, so a
bad request is answered here with INVALID_ARGUMENT and a message as clear as the HTTP one.
Options travel as request parameters and become the request's fields. Tensors become numpy
arrays and answers' arrays become tensors, raw bytes or typed contents, with no lists of
Python numbers between.

Counts are checked before anything is iterated, and sizes in exact integers: at most
``MAX_TENSORS`` inputs, outputs and raw entries, ``MAX_PARAMETERS`` parameters, ``MAX_DIMS``
dimensions per shape, and a shape's product (which would overflow int64; empty dimensions
counted as 1) at most ``MAX_VALUES``; values must sit in the contents field of their
datatype; with ``max_rows`` given, ``x`` is refused on its declared rows before it is
decoded (RESOURCE_EXHAUSTED, as HTTP's 413). A request with millions of entries is answered
as fast as a small one.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
import numpy as np
from pydantic import BaseModel

from artifact.families import family
from service.grpc import grpc_predict_v2_pb2 as pb
from service.schemas import VERBS, ModelInfo

__all__ = ["OipError", "decode_inputs", "encode_outputs", "request_fields",
           "response_tensors", "signature", "split_name"]

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
MAX_TENSORS = 8  # inputs, outputs, raw entries: each verb has at most 2 inputs and 4 outputs
MAX_PARAMETERS = 32
MAX_DIMS = 8
MAX_VALUES = 1 << 26  # more than a 64 MiB message can carry in any datatype

# datatype -> (little-endian numpy dtype, typed contents field)
DATATYPES = {
    "BOOL": ("|b1", "bool_contents"),
    "INT32": ("<i4", "int_contents"),
    "INT64": ("<i8", "int64_contents"),
    "FP32": ("<f4", "fp32_contents"),
    "FP64": ("<f8", "fp64_contents"),
}
X_TYPES = ("FP32", "FP64")
INT_TYPES = ("INT64", "INT32")
TOKEN_TYPES = ("INT64", "INT32", *X_TYPES)  # a token model's rows: integers, or floats of them

# Request parameters each verb takes (the JSON field of the same name) and their kind.
PARAMETERS = {
    "sample": {"seed": int, "steps": int, "solver": str, "guidance": float},
    "log_likelihood": {"method": str, "steps": int, "solver": str, "probes": int, "seed": int,
                       "marginal": bool},
    "anomaly_score": {"target_fpr": float, "seed": int},
}
# Parameters standard clients add on their own (tritonclient: timeout, priority, sequences).
CLIENT_PARAMETERS = {"sequence_id", "sequence_start", "sequence_end", "priority", "timeout",
                     "binary_data_output", "headers"}


class OipError(Exception):
    """A request that cannot be served, with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def split_name(oip_name: str) -> tuple[str, str] | None:
    """``"moons-nsf.log_likelihood"`` -> ``("moons-nsf", "log_likelihood")``, else None."""
    model, dot, verb = oip_name.rpartition(".")
    return (model, verb) if dot and model and verb in VERBS else None


def _condition_inputs(info: ModelInfo) -> list[tuple[str, str, list[int]]]:
    """A conditional model's extra input: ``y`` (the class each row is given, as the integer
    that names it; one value for every row, or one per row) or ``context`` (one row for every
    row, or one per row)."""
    if info.condition is None:
        return []
    if info.condition["kind"] == "label":
        return [("y", "INT64", [-1])]
    return [("context", "FP32", [-1, info.condition["width"]])]


def signature(verb: str, info: ModelInfo) -> tuple[list, list]:
    """``(inputs, outputs)`` as ``(name, datatype, shape)`` of the OIP model ``NAME.VERB``."""
    dim = info.dim
    cond = _condition_inputs(info)
    if verb == "sample":
        return ([("n", "INT64", [1]), ("seed", "INT64", [1]), *cond],
                [("samples", "INT64" if family(info.family).tokens else "FP64", [-1, dim])])
    x = [("x", "INT64" if family(info.family).tokens else "FP32", [-1, dim]), *cond]
    if verb == "log_likelihood":
        out = [("log_likelihood", "FP64", [-1]), ("bits_per_dim", "FP64", [-1])]
        served = family(info.family).served_methods(info.defaults.get("method"))
        if served != ("exact",):  # Hutchinson's, the ELBO's
            out.append(("std_error", "FP64", [-1]))
        return x, out
    out = [("scores", "FP64", [-1]), ("is_anomaly", "BOOL", [-1]),
           ("percentile", "FP64", [-1]), ("threshold", "FP64", [1])]
    if info.condition is not None and info.condition.get("thresholds"):
        out.append(("thresholds", "FP64", [-1]))  # each row's class threshold
    return x, out


def _check_counts(req: pb.ModelInferRequest) -> None:
    for what, count, most in (("inputs", len(req.inputs), MAX_TENSORS),
                              ("raw_input_contents entries", len(req.raw_input_contents),
                               MAX_TENSORS),
                              ("requested outputs", len(req.outputs), MAX_TENSORS),
                              ("parameters", len(req.parameters), MAX_PARAMETERS)):
        if count > most:
            raise OipError(INVALID, f"the request has {count} {what}; at most {most} are "
                           "allowed")


def _shape(t: Any) -> tuple[list[int], int]:
    """The declared shape and its number of values (exact), checked."""
    if len(t.shape) > MAX_DIMS:
        raise OipError(INVALID, f"input '{t.name[:32]}' has {len(t.shape)} dimensions; at most "
                       f"{MAX_DIMS} are allowed")
    shape = list(t.shape)
    if any(s < 0 for s in shape):
        raise OipError(INVALID, f"input '{t.name[:32]}' has shape {shape}; a request's shape "
                       "must not contain negative sizes")
    # its sizes with empty dimensions taken as 1: numpy refuses to shape even an empty array
    # whose other sizes multiply past its index range
    span = math.prod(max(s, 1) for s in shape)
    if span > MAX_VALUES:
        raise OipError(EXHAUSTED, f"input '{t.name[:32]}' has shape {shape}, whose sizes "
                       f"multiply to {span}; at most {MAX_VALUES} are allowed")
    return shape, math.prod(shape)


def _typed(t: Any, field: str) -> Any:
    """The typed contents of ``t``; INVALID_ARGUMENT if values sit in another field."""
    for other, _ in t.contents.ListFields():
        if other.name != field:
            raise OipError(INVALID, f"input '{t.name[:32]}' is {t.datatype} but has values in "
                           f"contents.{other.name}; {t.datatype} values go in "
                           f"contents.{field}")
    return getattr(t.contents, field)


def decode_inputs(req: pb.ModelInferRequest) -> tuple[dict[str, tuple[str, np.ndarray]], bool]:
    """``{name: (datatype, array)}`` and whether the tensors came in raw form."""
    _check_counts(req)
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise OipError(INVALID, f"raw_input_contents has {len(raw)} entries but the request "
                       f"declares {len(req.inputs)} inputs; send one entry per input, in order")
    out: dict[str, tuple[str, np.ndarray]] = {}
    for i, t in enumerate(req.inputs):
        if t.name in out:
            raise OipError(INVALID, f"input '{t.name[:32]}' is given twice")
        if t.datatype not in DATATYPES:
            raise OipError(INVALID, f"input '{t.name[:32]}' has datatype {t.datatype[:16]!r}; "
                           f"supported: {', '.join(DATATYPES)}")
        shape, size = _shape(t)
        dtype, field = DATATYPES[t.datatype]
        if raw:
            if t.HasField("contents"):
                raise OipError(INVALID, f"input '{t.name[:32]}' has typed contents but the "
                               "request uses raw_input_contents; use one form for every input")
            need = size * np.dtype(dtype).itemsize
            if len(raw[i]) != need:
                raise OipError(INVALID, f"raw contents of input '{t.name[:32]}' are "
                               f"{len(raw[i])} bytes; shape {shape} of {t.datatype} needs {need}")
            arr = np.frombuffer(raw[i], dtype=dtype)
        else:
            typed = _typed(t, field)
            if len(typed) != size:
                raise OipError(INVALID, f"input '{t.name[:32]}' has {len(typed)} values in "
                               f"contents.{field}; shape {shape} needs {size}")
            arr = np.asarray(typed, dtype=dtype)
        out[t.name] = (t.datatype, arr.reshape(shape))
    return out, bool(raw)


def _parameter(verb: str, key: str, p: pb.InferParameter) -> Any:
    kind = PARAMETERS[verb][key]
    choice = p.WhichOneof("parameter_choice")
    value = getattr(p, choice) if choice else None
    try:
        if kind is str and choice == "string_param":
            return value
        if kind is bool and choice == "bool_param":
            return value
        if kind is int and choice in ("int64_param", "uint64_param", "string_param"):
            return int(value)
        if kind is float and choice in ("double_param", "int64_param", "string_param"):
            return float(value)
    except ValueError:
        pass
    want = {str: "a string", int: "an integer", float: "a number (double or string)",
            bool: "a boolean"}[kind]
    raise OipError(INVALID, f"parameter '{key}' must be {want}; got {choice or 'nothing'} "
                   f"{value!r}"[:200])


def _parameters(verb: str, params: Any) -> dict[str, Any]:
    out = {}
    for key, p in params.items():
        if key in CLIENT_PARAMETERS:
            continue
        if key not in PARAMETERS[verb]:
            raise OipError(INVALID, f"unknown parameter {key[:32]!r} for {verb}; allowed: "
                           f"{', '.join(PARAMETERS[verb])}")
        out[key] = _parameter(verb, key, p)
    return out


def _one_int(name: str, datatype: str, arr: np.ndarray) -> int:
    if datatype not in INT_TYPES or arr.size != 1:
        raise OipError(INVALID, f"input '{name}' must be INT64 with shape [1]; got "
                       f"{datatype} with shape {list(arr.shape)}")
    return int(arr.reshape(-1)[0])


def _rows(model: str, info: ModelInfo, datatype: str, arr: np.ndarray) -> np.ndarray:
    dim = info.dim
    if family(info.family).tokens:
        if datatype not in TOKEN_TYPES:
            raise OipError(INVALID, f"input 'x' has datatype {datatype}; model '{model}' "
                           "takes integer tokens: send INT64 (or INT32, FP32, FP64)")
    elif datatype not in X_TYPES:
        raise OipError(INVALID, f"input 'x' has datatype {datatype}; send FP32 (or FP64)")
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise OipError(INVALID, f"input 'x' has shape {list(arr.shape)} but model '{model}' "
                       f"expects [rows, {dim}]")
    if arr.shape[0] == 0:
        raise OipError(INVALID, "input 'x' has no rows; send at least one row")
    bad = ~np.isfinite(arr)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise OipError(INVALID, f"input 'x' has a non-finite value at row {r}, column {c}; "
                       "every value must be a finite number")
    return arr.astype(np.float64)


def _check_rows(req: pb.ModelInferRequest, max_rows: int) -> None:
    """RESOURCE_EXHAUSTED, in HTTP's words, if ``x`` declares more rows than allowed."""
    for t in req.inputs:
        if t.name == "x" and len(t.shape) and t.shape[0] > max_rows:
            raise OipError(EXHAUSTED, f"'x' is {t.shape[0]}; the largest allowed is {max_rows} "
                           "(server limit)")


def request_fields(model: str, verb: str, info: ModelInfo, req: pb.ModelInferRequest,
                   max_rows: int | None = None) -> tuple[dict, bool]:
    """The verb request's fields (``x`` a float64 array), checked, and whether the tensors
    came raw.

    ``max_rows``: refuse ``x`` with more rows on its declared shape, before decoding it."""
    if max_rows is not None and len(req.inputs) <= MAX_TENSORS:
        _check_rows(req, max_rows)
    tensors, raw = decode_inputs(req)
    body: dict[str, Any] = {"model": model, **_parameters(verb, req.parameters)}
    allowed = [name for name, _, _ in signature(verb, info)[0]]
    for name in tensors:
        if name not in allowed:
            raise OipError(INVALID, f"unknown input {name[:32]!r} for {model}.{verb}; "
                           f"inputs: {', '.join(allowed)}")
    if verb == "sample":
        if "n" not in tensors:
            raise OipError(INVALID, "input 'n' (INT64 [1], number of samples) is missing")
        body["n"] = _one_int("n", *tensors["n"])
        if "seed" in tensors:
            seed = _one_int("seed", *tensors["seed"])
            if body.get("seed", seed) != seed:
                raise OipError(INVALID, "seed is given as an input and as a parameter with "
                               "different values; give it once")
            body["seed"] = seed
    else:
        if "x" not in tensors:
            kind = signature(verb, info)[0][0][1]
            raise OipError(INVALID, f"input 'x' ({kind} [rows, {info.dim}]) is missing")
        body["x"] = _rows(model, info, *tensors["x"])
    body.update(_condition(tensors))
    return body, raw


def _condition(tensors: dict[str, tuple[str, np.ndarray]]) -> dict[str, Any]:
    """``y`` and ``context`` as the JSON request writes them; the data plane's validation
    checks them against the model (HTTP's words)."""
    out: dict[str, Any] = {}
    if "y" in tensors:
        datatype, arr = tensors["y"]
        if datatype not in INT_TYPES:
            raise OipError(INVALID, f"input 'y' has datatype {datatype}; send INT64 (the "
                           "integers that name the classes)")
        values = [int(v) for v in arr.reshape(-1)]
        out["y"] = values[0] if arr.size == 1 else values
    if "context" in tensors:
        datatype, arr = tensors["context"]
        if datatype not in X_TYPES:
            raise OipError(INVALID, f"input 'context' has datatype {datatype}; send FP32 (or "
                           "FP64)")
        out["context"] = arr.astype(np.float64)
    return out


def response_tensors(verb: str, answer: BaseModel) -> tuple[list, dict[str, Any]]:
    """Output tensors ``(name, datatype, array)`` and response parameters of a verb's answer."""
    f64 = np.float64
    if verb == "sample":
        params = {"seed": answer.seed, "steps": answer.steps, "solver": answer.solver,
                  "nfe": answer.nfe}
        samples = np.asarray(answer.samples)
        if samples.dtype.kind in "iu":  # a token model's integers
            return [("samples", "INT64", samples.astype(np.int64))], params
        return [("samples", "FP64", samples.astype(f64))], params
    if verb == "log_likelihood":
        out = [("log_likelihood", "FP64", np.asarray(answer.log_likelihood, f64)),
               ("bits_per_dim", "FP64", np.asarray(answer.bits_per_dim, f64))]
        if len(answer.std_error):  # Hutchinson's or the ELBO's (empty when exact)
            out.append(("std_error", "FP64", np.asarray(answer.std_error, f64)))
        return out, {"method": answer.method, "nfe": answer.nfe}
    out = [("scores", "FP64", np.asarray(answer.scores, f64)),
           ("is_anomaly", "BOOL", np.asarray(answer.is_anomaly, bool)),
           ("percentile", "FP64", np.asarray(answer.percentile, f64)),
           ("threshold", "FP64", np.asarray([answer.threshold], f64))]
    if len(answer.thresholds):  # a label model calibrated per class
        out.append(("thresholds", "FP64", np.asarray(answer.thresholds, f64)))
    return out, {"score": answer.score}


def _set_param(p: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def encode_outputs(resp: pb.ModelInferResponse, tensors: list, params: dict[str, Any],
                   requested: list[str], raw: bool) -> None:
    """Fill ``resp`` with the tensors (only ``requested`` ones when given), raw or typed."""
    names = [name for name, _, _ in tensors]
    for name in requested:
        if name not in names:
            raise OipError(INVALID, f"unknown output {name[:32]!r}; outputs: {', '.join(names)}")
    for name, datatype, arr in tensors:
        if requested and name not in requested:
            continue
        out = resp.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        dtype, field = DATATYPES[datatype]
        if raw:
            resp.raw_output_contents.append(np.ascontiguousarray(arr, dtype=dtype).tobytes())
        else:
            getattr(out.contents, field).extend(arr.reshape(-1))
    for key, value in params.items():
        if value is not None:
            _set_param(resp.parameters[key], value)
