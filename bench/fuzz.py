"""Reliability fuzzing: every hostile request answered, in time, never with a server error.

    python -m bench.fuzz [--http 100000] [--grpc 100000] [--jobs 4] [--seed 0]

It starts ``genserve serve`` with the default models (``service.devserver``; gRPC is
served by the same worker), then sends mutated requests (``bench.mutations``, seeded) over raw HTTP
sockets and gRPC, each followed by a valid request that must be answered 200 / OK. It checks
the invariant of issue #31: every request is answered within its deadline, never with a 5xx
(HTTP) or UNKNOWN / INTERNAL (gRPC), and the server answers a good request after each. It
writes the "reliability-fuzzing" section of docs/BENCHMARKS.md: requests sent, answered, by
status, unanswered, 5xx, worker restarts, RSS before and after, and the good requests' p99
latency during the run next to an idle server's. Coverage-guided fuzzing in process is
``bench.fuzz_atheris``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Reply", "Tally", "exchange_raw", "fuzz_grpc", "fuzz_http", "good_latency",
           "grpc_call", "main", "markdown", "run_bench"]

ROOT = Path(__file__).resolve().parents[1]
GOOD_HTTP_STATUS = 200
# gRPC codes that mean "not answered as the protocol promises"
GRPC_BAD = {"UNKNOWN", "INTERNAL", "DEADLINE_EXCEEDED", "UNAVAILABLE", "DATA_LOSS",
            "UNIMPLEMENTED"}


# -- sending -----------------------------------------------------------------------------------
@dataclass
class Reply:
    """What came back for one request: the status (None: no answer) and how long it took."""

    status: int | str | None
    seconds: float
    body: bytes = b""
    note: str = ""


def exchange_raw(address: tuple[str, int], data: bytes, deadline_s: float) -> Reply:
    """Send raw request bytes on a new connection and read one HTTP answer, by a deadline."""
    start = time.monotonic()
    end = start + deadline_s
    note = ""
    with socket.create_connection(address, timeout=deadline_s) as sock:
        try:
            sock.sendall(data)
        except OSError as err:  # answered and closed before the whole request was sent
            note = f"send: {type(err).__name__}"
        buf = b""
        while True:
            found = _parse_answer(buf)
            if found is not None:
                status, body = found
                return Reply(status, time.monotonic() - start, body, note)
            left = end - time.monotonic()
            if left <= 0:
                return Reply(None, time.monotonic() - start, buf[:200], "deadline")
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return Reply(None, time.monotonic() - start, buf[:200], "deadline")
            except OSError as err:
                return Reply(_status_of(buf), time.monotonic() - start, buf[:200],
                             f"recv: {type(err).__name__}")
            if not chunk:
                return Reply(_status_of(buf), time.monotonic() - start, buf[:200],
                             note or "closed")
            buf += chunk


def _status_of(buf: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", buf)
    return int(m.group(1)) if m and int(m.group(1)) >= 200 else None


def _parse_answer(buf: bytes) -> tuple[int, bytes] | None:
    """``(status, body)`` of the first final answer in ``buf``, if it is complete."""
    while True:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if not sep:
            return None
        status = _status_of(head)
        if status is None and re.match(rb"HTTP/1\.[01] 1\d\d", head):
            buf = rest  # 100 Continue: the final answer follows
            continue
        if status is None:
            return None
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        if length is not None:
            size = int(length.group(1))
            return (status, rest[:size]) if len(rest) >= size else None
        if re.search(rb"(?im)^transfer-encoding: *chunked", head):
            return (status, rest) if rest.endswith(b"0\r\n\r\n") else None
        return None  # to the end of the connection


def grpc_call(channel: Any, method: str, payload: bytes, deadline_s: float,
              metadata: tuple = ()) -> Reply:
    import grpc

    start = time.monotonic()
    call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                               request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=deadline_s, metadata=metadata)
    except grpc.RpcError as err:
        return Reply(err.code().name, time.monotonic() - start,
                     (err.details() or "").encode()[:300])
    return Reply("OK", time.monotonic() - start)


# -- running -----------------------------------------------------------------------------------
@dataclass
class Tally:
    """What a fuzzing run saw; ``failures`` lists the requests that broke the invariant."""

    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_mutation: Counter = field(default_factory=Counter)
    unanswered: int = 0
    server_errors: int = 0
    good_failures: int = 0
    good_seconds: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def summary(self) -> dict:
        good = np.array(self.good_seconds or [0.0]) * 1000
        return {"sent": self.sent, "answered": self.sent - self.unanswered,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
                "unanswered": self.unanswered, "server_errors": self.server_errors,
                "good_failures": self.good_failures, "good_p50_ms": float(np.median(good)),
                "good_p99_ms": float(np.percentile(good, 99)), "failures": self.failures[:20]}


def fuzz_http(address: tuple[str, int], seeds: list, count: int, seed: int = 0,
              jobs: int = 4, deadline_s: float = 30.0, incomplete: float = 0.02) -> Tally:
    """``count`` mutated requests over raw sockets, each followed by a valid one."""
    from bench.mutations import http_mutation

    tally = Tally()
    good = seeds[0].data

    def one(i: int) -> None:
        rng = random.Random(f"{seed}:{i}")
        req = http_mutation(rng, rng.choice(seeds), incomplete)
        reply = exchange_raw(address, req.data, deadline_s)
        after = exchange_raw(address, good, deadline_s)
        with tally.lock:
            tally.sent += 1
            tally.statuses[reply.status if reply.status is not None else "none"] += 1
            tally.by_mutation[req.mutation] += 1
            tally.good_seconds.append(after.seconds)
            problem = ""
            if reply.status is None:
                tally.unanswered += 1
                problem = f"unanswered ({reply.note})"
            elif reply.status >= 500:
                tally.server_errors += 1
                problem = f"{reply.status} {reply.body[:200]!r}"
            if after.status != GOOD_HTTP_STATUS:
                tally.good_failures += 1
                problem += f"; then a good request got {after.status} ({after.note})"
            if problem:
                tally.failures.append(f"#{i} {req.mutation}: {problem}; request "
                                      f"{req.data[:160]!r}")

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, range(count)))
    return tally


def fuzz_grpc(address: str, seeds: list, count: int, seed: int = 0, jobs: int = 4,
              deadline_s: float = 30.0) -> Tally:
    """``count`` mutated gRPC calls, each followed by a valid ``ModelInfer``."""
    import grpc

    from bench.mutations import grpc_mutation

    tally = Tally()
    good = next(payload for method, payload in seeds if method == "ModelInfer")
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(address, options=options) as channel:

        def one(i: int) -> None:
            rng = random.Random(f"{seed}:grpc:{i}")
            method, payload, mutation = grpc_mutation(rng, rng.choice(seeds))
            reply = grpc_call(channel, method, payload, deadline_s)
            after = grpc_call(channel, "ModelInfer", good, deadline_s)
            with tally.lock:
                tally.sent += 1
                tally.statuses[reply.status] += 1
                tally.by_mutation[mutation] += 1
                tally.good_seconds.append(after.seconds)
                problem = ""
                if reply.status == "DEADLINE_EXCEEDED":
                    tally.unanswered += 1
                    problem = "unanswered"
                elif reply.status in GRPC_BAD:
                    tally.server_errors += 1
                    problem = f"{reply.status} {reply.body[:200]!r}"
                if after.status != "OK":
                    tally.good_failures += 1
                    problem += f"; then a good call got {after.status} {after.body[:100]!r}"
                if problem:
                    tally.failures.append(f"#{i} {method} {mutation}: {problem}; payload "
                                          f"{payload[:120]!r}")

        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(one, range(count)))
    return tally


# -- the benchmark -------------------------------------------------------------------------------
def _rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _workers(pid: int) -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


def good_latency(send: Callable[[], Reply], count: int, jobs: int) -> dict:
    """p50 / p99 ms of ``count`` valid requests from ``jobs`` threads: the baseline of the
    fuzzing run's good requests, at the same concurrency without the mutated ones."""
    with ThreadPoolExecutor(jobs) as pool:
        ms = np.array([r.seconds for r in pool.map(lambda _: send(), range(count))]) * 1000
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}


def run_bench(models: Path, http_count: int, grpc_count: int, jobs: int, seed: int) -> dict:
    """Start the server, fuzz its HTTP and gRPC ports, measure; see the module docstring."""
    import grpc

    from artifact.manifest import read_manifest
    from bench.mutations import grpc_seeds, http_seeds
    from service.devserver import running_server

    dims = {m.name: m.dim for m in (read_manifest(p, verify=False) for p in sorted(
        models.iterdir()) if (p / "manifest.json").exists())}
    log = Path(tempfile.mkdtemp(prefix="fuzz-")) / "server.log"
    env = {"GENSERVE_HEADER_TIMEOUT_S": "2", "GENSERVE_BODY_TIMEOUT_S": "2"}
    with running_server(models, log, env=env) as server:
        host, port = server.url.rsplit("//", 1)[1].split(":")
        address = (host, int(port))
        seeds = http_seeds(dims)
        good_http = partial(exchange_raw, address, seeds[0].data, 30.0)
        good_latency(good_http, 200, jobs)  # warm-up
        idle = {"http": good_latency(good_http, 5000, jobs)}
        pid = server.proc.pid
        workers0, rss0 = _workers(pid), _rss_mb(pid)
        started = time.monotonic()
        http = fuzz_http(address, seeds, http_count, seed, jobs)
        http_s = time.monotonic() - started
        gaddress = server.grpc_address
        gseeds = grpc_seeds(dims)
        with grpc.insecure_channel(gaddress) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            good_grpc = partial(grpc_call, channel, *gseeds[0], 30.0)
            good_latency(good_grpc, 200, jobs)  # warm-up
            idle["grpc"] = good_latency(good_grpc, 5000, jobs)
        started = time.monotonic()
        grpc_tally = fuzz_grpc(gaddress, gseeds, grpc_count, seed, jobs)
        grpc_s = time.monotonic() - started
        workers1, rss1 = _workers(pid), _rss_mb(pid)
        internal = log.read_text().count("internal error on")
    return {"http": http.summary(), "grpc": grpc_tally.summary(), "http_s": http_s,
            "grpc_s": grpc_s, "http_mutations": dict(http.by_mutation),
            "grpc_mutations": dict(grpc_tally.by_mutation), "without_mutations": idle,
            "rss_before_mb": rss0, "rss_after_mb": rss1,
            "worker_restarts": len(workers0 - workers1), "internal_errors_logged": internal,
            "jobs": jobs, "seed": seed}


def markdown(r: dict, command: str) -> str:
    from bench.report import machine_line, markdown_table

    def statuses(s: dict) -> str:
        return ", ".join(f"{k}: {v}" for k, v in s["statuses"].items())

    h, g = r["http"], r["grpc"]
    rows = [
        ["mutated requests sent", h["sent"], g["sent"]],
        ["answered", h["answered"], g["answered"]],
        ["answers by status", statuses(h), statuses(g)],
        ["unanswered (target 0)", h["unanswered"], g["unanswered"]],
        ["5xx / UNKNOWN, INTERNAL (target 0)", h["server_errors"], g["server_errors"]],
        ["good request after each: not 200 / OK", h["good_failures"], g["good_failures"]],
        ["good request p50 / p99 during the run", f"{h['good_p50_ms']:.1f} / "
         f"{h['good_p99_ms']:.1f} ms", f"{g['good_p50_ms']:.1f} / {g['good_p99_ms']:.1f} ms"],
        ["good request p50 / p99, no mutated requests", *(
            f"{w['p50_ms']:.1f} / {w['p99_ms']:.1f} ms" for w in (
                r["without_mutations"]["http"], r["without_mutations"]["grpc"]))],
        ["wall time", f"{r['http_s']:.0f} s", f"{r['grpc_s']:.0f} s"],
    ]
    return f"""## Reliability: fuzzing

Reproduce: `{command}` ({machine_line()}).

The default models (`exported_models/`), one worker, default limits but
`GENSERVE_HEADER_TIMEOUT_S=2` and `GENSERVE_BODY_TIMEOUT_S=2` (so requests left incomplete on
purpose are answered 408 in 2 s, not 10). Mutations of valid requests (`bench/mutations.py`,
seed {r['seed']}): HTTP over raw sockets (body: truncation, bit flips, nesting up to 100 000
deep, numbers up to 50 000 digits, invalid UTF-8, duplicate keys, junk values; head: method,
path, content type, chunked bodies, huge or many headers, `Expect`, HTTP/1.0; 2 % left
incomplete on purpose), gRPC on the worker's own port (bytes: truncation, bit flips, nesting,
false lengths; messages: shapes that overflow int64 or have 2 million entries, values in the
wrong contents field, raw contents of the wrong size, 100 000 inputs or parameters, junk names
and parameters, a million rows). {r['jobs']} client threads; each mutated request is followed
by a valid one on the same server, whose latency is the "during" figure. Deadline per request
30 s.

{markdown_table(["figure", "HTTP", "gRPC"], rows)}

"No mutated requests": before each fuzzing run, the same {r['jobs']} threads send 5 000 good
requests alone. During the run fewer good requests are in
flight at once (the threads also wait on mutated ones, 408s included), so the p50 can sit
below the baseline's; the p99 carries the mutated requests that share the worker (nesting
100 000 deep, 50 000-digit numbers, messages of a million rows).

Server (arbiter and worker): RSS {r['rss_before_mb']:.0f} MiB before the fuzzing, \
{r['rss_after_mb']:.0f} MiB after (two points, not a slope: the soak section measures growth); \
worker restarts: {r['worker_restarts']}; "internal error on" lines in its log: \
{r['internal_errors_logged']}.
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--http", type=int, default=100_000, help="mutated HTTP requests")
    p.add_argument("--grpc", type=int, default=100_000, help="mutated gRPC calls")
    p.add_argument("--jobs", type=int, default=4, help="client threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", type=Path, default=ROOT / "exported_models")
    p.add_argument("--no-write", action="store_true", help="print, do not write the docs")
    ns = p.parse_args(argv)
    result = run_bench(ns.models, ns.http, ns.grpc, ns.jobs, ns.seed)
    print(json.dumps(result, indent=1))
    out = Path(tempfile.gettempdir()) / "genserve-fuzz.json"
    out.write_text(json.dumps(result, indent=1))
    if not ns.no_write:
        from bench.report import write_section

        command = "python -m bench.fuzz " + " ".join(a for a in argv if a != "--no-write")
        write_section("reliability-fuzzing", markdown(result, command.strip()))
    bad = sum(result[k][f] for k in ("http", "grpc")
              for f in ("unanswered", "server_errors", "good_failures"))
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    raise SystemExit(main())
