"""Shared fixtures: tiny trained checkpoints and exported artifacts, built once per session;
Prometheus text parsed for the tests that read ``/metrics``; and the rule that the spec runs
whole: a skipped test fails the session unless it is marked ``gpu``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

os.environ.setdefault("TQDM_DISABLE", "1")

# One tiny configuration per model type: small enough that the whole zoo trains and exports
# in a few minutes on 2 cores, big enough that parity and calibration are meaningful.
TINY_MODEL = {"hidden_features": 16, "hidden_layers": 1, "transforms": 2, "bins": 4,
              "time_embedding": 4}
TINY_STEPS = 60


# Model types that need their own data and settings: (data set, ModelConfig fields).
TINY_DATA = {"rfm": ("vmf_s2", {"manifold": "sphere"}), "dfm": ("markov_seq", {})}


def tiny_checkpoint(model_type: str, out: Path, data: str | None = None,
                    steps: int = TINY_STEPS, **fields: object):
    from training.config import ModelConfig, TrainConfig
    from training.fit import fit

    own_data, own_fields = TINY_DATA.get(model_type, ("moons", {}))
    return fit(
        model_type,
        data or own_data,
        out=out,
        rows=1000,
        model_cfg=ModelConfig(**TINY_MODEL | own_fields | fields),
        train_cfg=TrainConfig(steps=steps, batch_size=128, eval_every=steps, progress=False,
                              warmup_steps=5),
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny MLPs run several times faster on one thread than on two busy ones: a module of
    such tests says ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One zoo for the whole run: the xdist workers share it (their base temporary folders
    are siblings), so each model is trained and exported once, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    zoo = root / "zoo"
    zoo.mkdir(exist_ok=True)
    return zoo


def built_once(path: Path, build: Callable[[Path], object]) -> Path:
    """``path``, made by ``build(path)`` once per run whichever worker asks first: under a file
    lock, and marked done only when ``build`` returns (a worker that died half-way leaves no
    mark, and the next one builds again)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    done = path.parent / f".{path.name}.done"
    with FileLock(str(path.parent / f".{path.name}.lock")):
        if not done.exists():
            if path.is_dir():
                shutil.rmtree(path)
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def checkpoint_factory(zoo_dir: Path):
    """``factory(model_type) -> checkpoint path``, trained once per type per run."""

    def factory(model_type: str) -> Path:
        return built_once(zoo_dir / "ckpt" / model_type,
                          lambda path: tiny_checkpoint(model_type, path))

    return factory


@pytest.fixture(scope="session")
def artifact_factory(zoo_dir: Path, checkpoint_factory):
    """``factory(model_type) -> artifact dir`` exported to ONNX and TorchScript, once."""

    def factory(model_type: str) -> Path:
        from training.checkpoint import load_checkpoint
        from training.export import export_checkpoint

        return built_once(zoo_dir / "models" / f"moons-{model_type}", lambda out: (
            export_checkpoint(load_checkpoint(checkpoint_factory(model_type)), out,
                              formats=("onnx", "torchscript"))))

    return factory


# --- a real `bentoml serve` subprocess on a loopback port -------------------------------------

import json  # noqa: E402

from service.devserver import Server, running_server  # noqa: E402,F401


@pytest.fixture(scope="session")
def served_models(zoo_dir: Path, artifact_factory) -> Path:
    """A models directory: a flow, a diffusion and a flow-matching model, and a tampered one."""

    def build(root: Path) -> None:
        root.mkdir()
        for kind in ("nsf", "ddpm", "cfm"):
            shutil.copytree(artifact_factory(kind), root / f"moons-{kind}")
        broken = root / "broken"
        shutil.copytree(artifact_factory("nice"), broken)
        manifest = json.loads((broken / "manifest.json").read_text())
        manifest["name"] = "broken"
        (broken / "manifest.json").write_text(json.dumps(manifest))
        (broken / "log_prob.onnx").write_bytes(b"not a graph")

    return built_once(zoo_dir / "served", build)


@pytest.fixture(scope="session")
def server(served_models: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(served_models, log, env={"GENSERVE_MAX_ROWS": "500",
                                                 "GENSERVE_MAX_SAMPLES": "2000",
                                                 "GENSERVE_MAX_STEPS": "200",
                                                 "GENSERVE_MAX_LATENCY_MS": "30000"}) as s:
        yield s


def context_table(path: Path, rows: int = 2000, seed: int = 0) -> Path:
    """A CSV ``x0, x1, c``: the context column ``c`` moves the rows, ``x = (c, -c) + noise``."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(-2, 2, rows)
    x = np.stack([c, -c], 1) + 0.3 * rng.standard_normal((rows, 2))
    np.savetxt(path, np.column_stack([x, c]), delimiter=",", header="x0,x1,c", comments="")
    return path


@pytest.fixture(scope="session")
def conditional_models(zoo_dir: Path) -> dict[str, Path]:
    """Conditional artifacts (ONNX and TorchScript), trained once: ``label`` a MAF on gmm2
    given the mixture component (exact ``p(x | y)``), ``context`` a RealNVP on
    :func:`context_table` given its column ``c``, ``cfm`` a tiny CFM on gmm2 given the
    component with label dropout (classifier-free guidance; uncalibrated)."""
    from training.checkpoint import load_checkpoint
    from training.config import ModelConfig, TrainConfig
    from training.export import export_checkpoint
    from training.fit import fit

    out = {}
    flow = ModelConfig(hidden_features=32, transforms=3)
    table = built_once(zoo_dir / "context.csv", context_table)
    specs = {"label": ("maf", "gmm2", flow, 400, {"condition": "label", "rows": 3000}),
             "context": ("realnvp", str(table), flow, 400,
                         {"condition": "context", "context_cols": ["c"]}),
             "cfm": ("cfm", "gmm2", ModelConfig(**TINY_MODEL, cfg_dropout=0.2), 100,
                     {"condition": "label", "rows": 1000})}
    def train(path: Path, kind: str, data: str, model: ModelConfig, steps: int,
              options: dict) -> None:
        fit(kind, data, out=path, model_cfg=model, **options, train_cfg=TrainConfig(
            steps=steps, batch_size=256, eval_every=100, progress=False))

    def export(path: Path, ckpt: Path, kind: str) -> None:
        # the ODE model's PF-ODE calibration is left out (slow)
        export_checkpoint(load_checkpoint(ckpt), path, formats=("onnx", "torchscript"),
                          target_fpr=0.05, calibration=kind != "cfm")

    for name, (kind, data, model, steps, options) in specs.items():
        ckpt = built_once(zoo_dir / "ckpt" / f"cond-{name}",
                          partial(train, kind=kind, data=data, model=model, steps=steps,
                                  options=options))
        out[name] = built_once(zoo_dir / "models" / f"cond-{name}",
                               partial(export, ckpt=ckpt, kind=kind))
    return out


@pytest.fixture(scope="session")
def dfm_uniform_artifact(zoo_dir: Path) -> Path:
    """A tiny DFM with the uniform source on markov_seq, exported to ONNX and TorchScript."""
    from training.checkpoint import load_checkpoint
    from training.export import export_checkpoint

    ckpt = built_once(zoo_dir / "ckpt" / "dfm-uniform",
                      lambda path: tiny_checkpoint("dfm", path, source="uniform"))
    return built_once(zoo_dir / "models" / "moons-dfm-uniform", lambda out: export_checkpoint(
        load_checkpoint(ckpt), out, formats=("onnx", "torchscript")))


@pytest.fixture(scope="session")
def families_models(zoo_dir: Path, artifact_factory, conditional_models,
                    dfm_uniform_artifact) -> Path:
    """A models directory of the newer families (EDM; RFM on vmf_s2; DFM on markov_seq, masked
    and uniform source), one tiny model each (named ``moons-KIND`` like the zoo, whatever their
    data), and the conditional models (``cond-label``, ``cond-context``, ``cond-cfm``)."""

    def build(root: Path) -> None:
        root.mkdir()
        for kind in ("edm", "rfm", "dfm"):
            shutil.copytree(artifact_factory(kind), root / f"moons-{kind}")
        shutil.copytree(dfm_uniform_artifact, root / dfm_uniform_artifact.name)
        for path in conditional_models.values():
            shutil.copytree(path, root / path.name)

    return built_once(zoo_dir / "families", build)


@pytest.fixture(scope="session")
def families_server(families_models: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real server over :func:`families_models` (HTTP and gRPC)."""
    log = tmp_path_factory.mktemp("logs") / "families-server.log"
    with running_server(families_models, log,
                        env={"GENSERVE_MAX_LATENCY_MS": "30000"}) as s:
        yield s


# --- /metrics, parsed by prometheus_client's own parser ---------------------------------------

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="session")
def spark(tmp_path_factory: pytest.TempPathFactory):
    """One local Spark session per test process (starting one takes seconds): two cores, no
    UI, tables in a temporary warehouse, and Arrow batches of 256 rows so that a few thousand
    rows make many batches."""
    from genserve.spark import session

    s = session("local[2]", {
        "spark.ui.enabled": "false", "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "2", "spark.driver.memory": "1g",
        "spark.sql.execution.arrow.maxRecordsPerBatch": "256",
        "spark.sql.warehouse.dir": str(tmp_path_factory.mktemp("warehouse"))})
    s.sparkContext.setLogLevel("OFF")
    yield s
    s.stop()


def parse_metrics(text: str) -> Metrics:
    """``{(sample name, sorted labels): value}`` of a Prometheus text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape_metrics(server: Server, headers: dict[str, str] | None = None) -> Metrics:
    status, _, raw = server.exchange("GET", "/metrics", headers=headers)
    assert status == 200, raw[:500]
    return parse_metrics(raw.decode())


def metric_sum(metrics: Metrics, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(v for (n, lab), v in metrics.items()
               if n == name and all(dict(lab).get(k) == val for k, val in labels.items()))


def metric_samples(metrics: Metrics, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample ``name`` by its labels: for the tests that need the sample to exist."""
    return {lab: v for (n, lab), v in metrics.items() if n == name}


# --- the spec runs whole: only GPU tests may skip ---------------------------------------------


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            reason = (f"needs a CUDA device; torch {torch.__version__} ({build}) sees none "
                      "(make gpu-check runs these on a lent GPU machine)")
            for item in gpu_items:
                item.add_marker(pytest.mark.skip(reason=reason))


_SKIPPED: list[pytest.TestReport | pytest.CollectReport] = []


def _note_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    if report.skipped and "gpu" not in getattr(report, "keywords", {}):
        _SKIPPED.append(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A skip that is not a GPU test's fails the run (pytest-xdist: the controller sees every
    worker's reports); other failing statuses (5: no tests ran) are kept as they are."""
    if _SKIPPED and exitstatus == pytest.ExitCode.OK and not hasattr(session.config,
                                                                     "workerinput"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _SKIPPED or hasattr(config, "workerinput"):
        return
    terminalreporter.section("skipped tests fail the run", sep="=", red=True, bold=True)
    terminalreporter.line("Only tests marked gpu may skip; each of these needs something this "
                          "machine lacks (`make install` sets up the Python side):")
    for report in _SKIPPED:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        terminalreporter.line(f"  {report.nodeid}: {reason}")
