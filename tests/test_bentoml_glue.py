"""service.bentoml_glue: every private piece of BentoML genserve uses is still there,
and each does what it is there for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import bentoml
import pytest
from _bentoml_sdk.method import APIMethod
from bentoml._internal.marshal.dispatcher import Optimizer
from pydantic import Field

from service.bentoml_glue import PATCHES, bind_api_once, cap_batch_wait

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_the_installed_bentoml_has_what_each_patch_touches(patch) -> None:
    assert patch.present(), (
        f"service.bentoml_glue patch {patch.name!r} ({patch.purpose}) no longer finds "
        f"what it touches in bentoml {bentoml.__version__}: update the glue module, or drop "
        "the patch if a side-by-side `python -m bench.serving` shows no gain from it")


APP_FACTORY = """
from service.http.api import GenServe
from service.bentoml_glue import AppFactory

app = GenServe.to_asgi(is_main=True)
factory = AppFactory.find(app, ["/sample", "/log_likelihood", "/anomaly_score"])
print(factory is not None and factory.batchable("sample")
      and factory.input_type("sample").__name__ != "")
"""


def test_the_app_factory_is_found_in_a_running_app() -> None:
    """The boundary reaches BentoML's batcher and the service instance through the app's
    routes; a BentoML whose app is built differently fails here by name. (A process of its
    own: building the app sets BentoML's process-wide configuration.)"""
    out = subprocess.run([sys.executable, "-c", APP_FACTORY], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.stdout.strip().endswith("True"), \
        f"patch 'app-factory': BentoML's routes changed shape\n{out.stderr[-2000:]}"


def test_api_methods_are_bound_once_per_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    """BentoML rebuilt an API's bound wrapper (with ``inspect.signature``) on every request;
    ``bind_api_once`` keeps the first per instance, and calls still get Field defaults."""
    # the patch is process-wide: the test's teardown puts BentoML's own method back
    monkeypatch.setattr(APIMethod, "_local_call", APIMethod._local_call)

    @bentoml.service
    class Echo:
        @bentoml.api
        def echo(self, text: str = Field("a")) -> str:
            return text

    bind_api_once()
    patched = APIMethod._local_call
    bind_api_once()  # idempotent: no second wrapper
    assert APIMethod._local_call is patched
    first, second = Echo.inner(), Echo.inner()
    assert first.echo is first.echo and first.echo is not second.echo
    assert first.echo() == "a" and first.echo(text="b") == "b" and second.echo() == "a"


def test_batch_wait_learned_under_load_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    """BentoML's dispatcher learns its hold-back wait from the first request's queueing time;
    after a burst behind slow batches that is ~0.3 s, and lone requests were then held that
    long. ``cap_batch_wait`` bounds it (the real BentoML optimizer, fed a burst's statistics)."""
    # the patch is process-wide (the service installs it at import): the test's caps are
    # undone at teardown
    monkeypatch.setattr(Optimizer, "trigger_refresh", Optimizer.trigger_refresh)
    monkeypatch.setattr(Optimizer, "_genserve_wait_cap", None, raising=False)

    def after_burst() -> float:
        opt = Optimizer(max_latency=10.0)
        for _ in range(60):  # (rows in batch, duration s, wait of its first request s)
            opt.log_outbound(n=32, wait=0.3, duration=0.1)
        opt.trigger_refresh()
        return opt.wait

    cap_batch_wait(10.0)  # a cap above the burst's wait changes nothing: BentoML's own wait
    assert after_burst() == pytest.approx(0.3)
    cap_batch_wait(0.005)  # the service's default (GENSERVE_MAX_BATCH_WAIT_MS=5)
    assert after_burst() == pytest.approx(0.005)


UNSIZED_METRICS_FILE = """
import os, struct, sys
from pathlib import Path

os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from bentoml._internal.server.metrics.prometheus import PrometheusClient
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

Counter("genserve_glue_probe", "a sample written by this process").inc(3)
Path(sys.argv[1], "counter_999999.db").touch()  # another process, created but not yet sized

client = PrometheusClient(multiproc=True)
try:
    client.generate_latest()
    print("UNPATCHED-READ-OK")
except struct.error:
    print("UNPATCHED-RAISES")

from service.bentoml_glue import skip_unsized_metric_files
skip_unsized_metric_files()
skip_unsized_metric_files()  # idempotent
text = client.generate_latest().decode()
values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
print("PROBE", values["genserve_glue_probe_total"])
"""


def test_a_scrape_reads_a_not_yet_sized_metrics_file_as_empty(tmp_path: Path) -> None:
    """A worker's multiprocess metrics file exists but is empty for a moment after it starts;
    BentoML's /metrics (its own multiprocess client, parsed here as Prometheus text) must
    still answer, with every other process's samples."""
    out = subprocess.run([sys.executable, "-c", UNSIZED_METRICS_FILE, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert "UNPATCHED-RAISES" in lines, (
        "prometheus_client now reads an unsized multiprocess file without raising: the "
        "metrics-unsized-files patch in service.bentoml_glue can go")
    assert "PROBE" in lines and float(lines[lines.index("PROBE") + 1]) == 3.0, out.stdout


TIMEOUT_TIMERS = """
import asyncio, sys
from bentoml._internal.server.http.traffic import TimeoutMiddleware

async def quick(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

async def slow(scope, receive, send):
    await asyncio.sleep(5)

async def requests(app, n):
    sent = []
    async def receive():
        return {"type": "http.request", "body": b""}
    async def send(message):
        sent.append(message)
    for _ in range(n):
        await app({"type": "http", "method": "GET", "path": "/"}, receive, send)
    loop = asyncio.get_running_loop()
    live = sum(1 for h in loop._scheduled if not h.cancelled())  # pending timers
    return live, [m["status"] for m in sent if m["type"] == "http.response.start"]

def run(patched):
    if patched:
        from service.bentoml_glue import cancel_timeout_timers
        cancel_timeout_timers()
        cancel_timeout_timers()  # idempotent
    live, statuses = asyncio.run(requests(TimeoutMiddleware(quick, timeout=60), 200))
    _, late = asyncio.run(requests(TimeoutMiddleware(slow, timeout=0.05), 1))
    print("PATCHED" if patched else "UNPATCHED", live, statuses.count(200), late)

run(False)
run(True)
"""


def test_the_request_timeout_timer_is_cancelled_once_the_answer_starts() -> None:
    """BentoML's TimeoutMiddleware left one timer per request scheduled for
    ``traffic.timeout``; under load the loop held rate x 60 s of them and full garbage
    collections walked them all. Patched, no timer outlives its answer, and a request that
    does not start its answer in time is still answered 504."""
    out = subprocess.run([sys.executable, "-c", TIMEOUT_TIMERS], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["UNPATCHED"].startswith("200 200 "), (
        f"BentoML now cancels its timers ({lines['UNPATCHED']}): the timeout-timers patch "
        "in service.bentoml_glue can go")
    assert lines["PATCHED"] == "0 200 [504]", out.stdout
    assert lines["UNPATCHED"].endswith("[504]")
