"""genserve's page at ``/`` and the API reference at ``/docs``, in headless Chromium.

One ``genserve serve`` (the committed default models plus a tiny image model, API keys on)
and one browser serve every test here; the tests share an xdist group so they run in one
worker. The browser is Debian's ``chromium`` + ``chromium-driver`` (``make browser``, a step
of ``make test``): without them these tests fail, they do not skip. Every request the page
makes is read back from Chromium's performance log, and every console message from its
browser log. With ``GENSERVE_WRITE_DOCS=1`` the run writes screenshots of the three views
to docs/img/ (shown in README).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from service.devserver import Server, running_server

pytestmark = pytest.mark.xdist_group("page")

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "page-test-token-3f9a"
MAX_ROWS = 1600  # GENSERVE_MAX_ROWS: the 40 x 40 density grid in one request
WAIT_S = 90  # the machine is shared: a verb can queue behind other suites' work
DOCS_IMG = ROOT / "docs" / "img"
DEFAULTS = sorted(p.parent.name for p in (ROOT / "exported_models").glob("*/manifest.json"))
IMAGE_MODEL = "digits-glow"


@pytest.fixture(scope="module")
def image_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Glow on 8 x 8 digits (10 steps: it draws noise, which is all the grid needs)."""
    from training.config import ModelConfig, TrainConfig
    from training.export import export_checkpoint
    from training.fit import fit

    root = tmp_path_factory.mktemp("page-image")
    ckpt = fit("glow_image", "digits_image", out=root / "ckpt",
               model_cfg=ModelConfig(hidden_features=8, hidden_layers=1, transforms=1,
                                     scales=1),
               train_cfg=TrainConfig(steps=10, batch_size=64, eval_every=10, lr=3e-3,
                                     warmup_steps=2, progress=False))
    export_checkpoint(ckpt, root / IMAGE_MODEL, formats=("onnx",))
    return root / IMAGE_MODEL


@pytest.fixture(scope="module")
def server(image_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    models = tmp_path_factory.mktemp("page-models")
    for name in DEFAULTS:
        shutil.copytree(ROOT / "exported_models" / name, models / name)
    shutil.copytree(image_model, models / IMAGE_MODEL)
    log = tmp_path_factory.mktemp("page-logs") / "server.log"
    env = {"GENSERVE_API_KEYS": f"page:{TOKEN}", "GENSERVE_MAX_ROWS": str(MAX_ROWS),
           "GENSERVE_MAX_LATENCY_MS": "60000"}
    with running_server(models, log, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and chromedriver):
        pytest.fail("the page's tests need Debian's chromium and chromium-driver: run "
                    "`make browser` (make test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(chromedriver), options=options)
    downloads = tmp_path_factory.mktemp("downloads")
    d.execute_cdp_cmd("Browser.setDownloadBehavior",
                      {"behavior": "allow", "downloadPath": str(downloads)})
    d.downloads = downloads
    size(d, 1280, 800)
    try:
        yield d
    finally:
        d.quit()


# --- helpers -----------------------------------------------------------------------------------

def size(d, width: int, height: int, mobile: bool = False) -> None:
    d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1,
                       "mobile": mobile})


def wait_for(d, what: Callable[[], object], timeout: float = WAIT_S):
    """Polls `what` until it is truthy; an element that the page redraws between finding
    and reading it (Swagger UI re-renders its header once the spec loads) is read again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(d, timeout, poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda _: what())


def css(d, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, selector)


def one(d, selector: str):
    (found,) = css(d, selector)
    return found


def drain(d) -> tuple[list[str], list[dict]]:
    """``(requested URLs, console entries)`` since the last drain."""
    urls = []
    for entry in d.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls, d.get_log("browser")


def foreign(urls: list[str], server: Server, allowed: tuple[str, ...] = ()) -> list[str]:
    own = urlsplit(server.url).netloc
    return [u for u in urls if urlsplit(u).netloc != own and not u.startswith(allowed)]


def open_page(d, server: Server, view: str = "", token: str | None = TOKEN) -> None:
    """Load the page (a new document: the token is forgotten) at ``#/view`` and give it a
    token; ``about:blank`` first, as going to another ``#`` of the same page loads nothing."""
    d.get("about:blank")
    d.get(f"{server.url}/#/{view}")
    wait_for(d, lambda: d.execute_script("return document.body.dataset.ready === 'true'"))
    if token is not None:
        one(d, "#token").send_keys(token)
        one(d, "#token-form button").click()
        wait_for(d, lambda: one(d, "#token-set").is_displayed())


def run_and_wait(d, button: str) -> None:
    one(d, button).click()
    wait_for(d, lambda: one(d, button).is_enabled())


def message(d) -> str:
    box = one(d, "#message")
    return box.text if box.is_displayed() else ""


def screenshot(d, name: str) -> None:
    """docs/img/NAME.png, the whole page at 1280 px wide (with GENSERVE_WRITE_DOCS=1)."""
    if os.environ.get("GENSERVE_WRITE_DOCS") != "1":
        return
    height = d.execute_script("return document.documentElement.scrollHeight")
    shot = d.execute_cdp_cmd("Page.captureScreenshot", {
        "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1}})
    (DOCS_IMG / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))


# --- the pages over HTTP -----------------------------------------------------------------------

def test_pages_are_served_with_a_self_only_policy(server: Server) -> None:
    for path, kind in (("/", "text/html"), ("/docs", "text/html"),
                       ("/page/app.js", "text/javascript"), ("/page/page.css", "text/css")):
        status, headers, body = server.exchange("GET", path)
        assert status == 200 and headers["content-type"].startswith(kind), (path, headers)
        assert headers["content-security-policy"].startswith("default-src 'self';"), path
        assert headers["x-content-type-options"] == "nosniff" and body, path
        assert b"googletagmanager" not in body and b"http://" not in body.replace(
            b"http://www.w3.org/2000/svg", b""), path
    status, headers, body = server.exchange("HEAD", "/")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, headers, body = server.exchange("POST", "/", b"{}")
    assert status == 405 and headers["allow"] == "GET, HEAD", body
    status, _, body = server.exchange("GET", "/page/nothing.js")
    assert status == 404 and "nothing.js" in json.loads(body)["error"]
    status, _, body = server.exchange("GET", "/page/config.json")  # open, like /models
    config = json.loads(body)
    assert status == 200 and config["auth"] is True and config["max_rows"] == MAX_ROWS
    info = json.loads(server.get("/docs.json")[1])["info"]
    from artifact import genserve_version

    assert info["title"] == "genserve" and info["version"] == genserve_version()
    assert "/log_likelihood" in info["description"] and "BentoML" not in json.dumps(info)


def test_the_pages_config_follows_the_settings() -> None:
    """Without keys the page asks for no token; its limits are the server's (in process)."""
    from service.http.pages import PAGE_CSP, Pages
    from service.settings import load_settings

    settings = load_settings({"GENSERVE_MAX_ROWS": "77", "GENSERVE_MAX_STEPS": "9"})
    pages = Pages(settings, auth=False)
    config = json.loads(pages.find("/page/config.json").body)
    assert config["auth"] is False and (config["max_rows"], config["max_steps"]) == (77, 9)
    assert pages.find("/").csp == PAGE_CSP and pages.find("/page/../pages.py") is None
    assert Pages.serves("/page/x.js") and not Pages.serves("/models")


# --- in the browser ----------------------------------------------------------------------------

def test_page_loads_one_card_per_model_from_this_server_only(driver, server: Server) -> None:
    drain(driver)
    open_page(driver, server, token=None)
    cards = {c.get_attribute("data-model"): c.text for c in css(driver, ".card")}
    assert sorted(cards) == sorted([*DEFAULTS, IMAGE_MODEL])
    models = {m["name"]: m for m in json.loads(server.get("/models")[1])["models"]}
    for name, text in cards.items():
        card = models[name]
        for fact in (card["family"], card["model_type"], card["runtime"], *card["graphs"]):
            assert fact in text, (name, fact)
        if card["defaults"]["solver"]:
            assert f"{card['defaults']['solver']}, {card['defaults']['steps']} steps" in text
        # every version of the model and its state, as /models lists them (#27)
        assert card["versions"], name
        for v in card["versions"]:
            assert f"{v['version']} ({v['state']})" in text, (name, v)
    assert "1 × 8 × 8" in cards[IMAGE_MODEL] and "values 0..16" in cards[IMAGE_MODEL]
    assert "target FPR 1 %" in cards["moons-nsf"]
    assert one(driver, "#token-form").is_displayed()  # keys are on: the token prompt
    screenshot(driver, "page-models")
    urls, console = drain(driver)
    assert console == [], console
    assert f"{server.url}/models" in urls and not foreign(urls, server), urls
    # the API reference: genserve's, drawn by Swagger UI from this server (and its data: icons)
    driver.get(f"{server.url}/docs")
    wait_for(driver, lambda: css(driver, ".info") and "genserve" in one(driver, ".info").text)
    info = wait_for(driver, lambda: one(driver, ".info").text)
    assert "/log_likelihood" in info
    assert len(css(driver, ".opblock")) >= 4  # the three verbs and GET /models
    urls, console = drain(driver)
    assert console == [], console
    assert not foreign(urls, server, allowed=("data:",)), urls


def test_a_wrong_token_shows_the_services_401_message(driver, server: Server) -> None:
    open_page(driver, server, "models/moons-nsf/sample", token="not-the-token")
    drain(driver)
    run_and_wait(driver, "#sample-go")
    status, answer = server.post("/sample", {"model": "moons-nsf", "n": 1},
                                 headers={"Authorization": "Bearer not-the-token"})
    assert status == 401
    assert message(driver) == f"401 {answer['error']}", message(driver)
    assert one(driver, "#token-form").is_displayed()  # asked again
    assert css(driver, "#sample-plot svg") == []
    one(driver, "#token").send_keys(TOKEN)
    one(driver, "#token-form button").click()
    run_and_wait(driver, "#sample-go")
    assert message(driver) == "" and css(driver, "#sample-svg")
    urls, console = drain(driver)
    # the browser reports the refused request itself, and nothing else
    assert [e for e in console if "401" not in e["message"]] == [], console
    assert not foreign(urls, server), urls


def test_sample_draws_n_points_over_the_density(driver, server: Server) -> None:
    open_page(driver, server, "models/moons-nsf/sample")
    n = one(driver, "#sample-n")
    n.clear()
    n.send_keys("123")
    drain(driver)
    run_and_wait(driver, "#sample-go")
    wait_for(driver, lambda: "density" in one(driver, "#density-meta").text)
    assert message(driver) == ""
    assert len(css(driver, "#sample-svg circle.sample")) == 123
    assert int(one(driver, "#sample-svg g.density").get_attribute("data-cells")) == 40 * 40
    meta = one(driver, "#sample-meta").text
    assert meta.startswith("123 samples · seed 0 · exact · NFE 1 · ") and meta.endswith(" ms")
    urls, console = drain(driver)
    # one /sample, then the whole density grid in one /log_likelihood request
    assert [urlsplit(u).path for u in urls] == ["/sample", "/log_likelihood"], urls
    assert console == [], console
    screenshot(driver, "page-sample")


def test_sample_on_an_image_model_draws_an_image_grid(driver, server: Server) -> None:
    open_page(driver, server, f"models/{IMAGE_MODEL}/sample")
    n = one(driver, "#sample-n")
    n.clear()
    n.send_keys("12")
    run_and_wait(driver, "#sample-go")
    assert message(driver) == ""
    canvases = css(driver, "#sample-images canvas")
    assert len(canvases) == 12
    # pixels are the data's 17 levels (0..16) scaled to 0..255, grey
    values = driver.execute_script(
        "const c = arguments[0]; return Array.from("
        "c.getContext('2d').getImageData(0, 0, c.width, c.height).data);", canvases[0])
    pixels = np.asarray(values).reshape(8, 8, 4)
    levels = {round(255 * k / 16) for k in range(17)}
    assert set(np.unique(pixels[..., 0]).tolist()) <= levels
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 3] == 255).all()
    assert drain(driver)[1] == []


def test_sample_on_a_30_d_model_draws_pairwise_scatters(driver, server: Server) -> None:
    open_page(driver, server, "models/breast-cancer-maf/sample")
    n = one(driver, "#sample-n")
    n.clear()
    n.send_keys("50")
    run_and_wait(driver, "#sample-go")
    assert message(driver) == ""
    # the first 4 of 30 dimensions: 4 x 4 panels, scatters off the diagonal, bars on it
    assert len(css(driver, "#sample-svg g.panel")) == 16
    assert len(css(driver, "#sample-svg circle.sample")) == 50 * 12
    assert css(driver, '#sample-svg g.panel[data-row="2"][data-col="2"] rect.bar')
    assert drain(driver)[1] == []


def test_score_flags_a_far_row_and_draws_the_threshold(driver, server: Server) -> None:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    benign = data.data[data.target == 1]  # the model's normal rows
    rows = np.vstack([benign[:40], data.data.max(0) * 20])
    model = "breast-cancer-maf"
    open_page(driver, server, f"models/{model}/score")
    area = one(driver, "#rows")
    area.send_keys("1, 2, 3\n")  # bad input: nothing is sent
    drain(driver)
    run_and_wait(driver, "#score-go")
    assert message(driver).startswith("row 1 has 3 values; model 'breast-cancer-maf' expects 30")
    assert drain(driver)[0] == []
    area.clear()
    driver.execute_script("arguments[0].value = arguments[1];", area,
                          "\n".join(",".join(repr(float(v)) for v in row) for row in rows))
    run_and_wait(driver, "#score-go")
    assert message(driver) == ""
    status, want = server.post("/anomaly_score", {"model": model, "x": rows.tolist()},
                               headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and want["is_anomaly"][-1] is True
    table = [r.text.split() for r in css(driver, "#score-table tbody tr")]
    assert len(table) == len(rows) and table[-1][-1] == "true"
    assert [r[-1] == "true" for r in table] == want["is_anomaly"]
    assert len(css(driver, "#score-table tr.anomaly")) == sum(want["is_anomaly"])
    line = one(driver, "#histogram line.threshold")
    assert float(line.get_attribute("data-threshold")) == pytest.approx(want["threshold"])
    assert sum(int(b.get_attribute("data-count")) for b in css(driver, "#histogram .bar")) == 41
    assert f"{sum(want['is_anomaly'])} flagged" in one(driver, "#score-meta").text
    screenshot(driver, "page-score")
    # the table as CSV, downloaded
    one(driver, "#download").click()
    csv = driver.downloads / f"{model}-scores.csv"
    wait_for(driver, csv.exists, timeout=30)
    lines = csv.read_text().splitlines()
    assert lines[0] == "row,log_likelihood,score,percentile,is_anomaly"
    assert len(lines) == 42 and lines[-1].endswith(",true")
    assert float(lines[-1].split(",")[2]) == pytest.approx(want["scores"][-1])
    assert drain(driver)[1] == []


def test_score_files_in_chunks_under_the_row_limit(driver, server: Server,
                                                   tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = "moons-nsf"
    small = tmp_path / "rows.npy"
    np.save(small, rng.normal(size=(5, 2)))
    big = tmp_path / "rows.csv"
    big.write_text("x0,x1\n" + "\n".join(f"{a:.4f},{b:.4f}"
                                         for a, b in rng.normal(size=(3500, 2))))
    too_big = tmp_path / "too-many.csv"
    too_big.write_text("0.5,0.5\n" * 100_001)
    open_page(driver, server, f"models/{model}/score")
    drain(driver)
    for path, rows in ((small, 5), (big, 3500)):
        one(driver, "#file").send_keys(str(path))
        run_and_wait(driver, "#score-go")
        assert message(driver) == "", message(driver)
        assert f"{rows} rows scored" in one(driver, "#score-meta").text
    urls, console = drain(driver)
    # 5 rows: one request per verb; 3500 rows: 1600 + 1600 + 300, each to both verbs
    assert [urlsplit(u).path for u in urls] == ["/log_likelihood", "/anomaly_score"] * 4
    assert len(css(driver, "#score-table tbody tr")) == 1000  # the CSV holds all 3500
    one(driver, "#file").send_keys(str(too_big))
    run_and_wait(driver, "#score-go")
    assert message(driver).startswith("more than 100000 rows"), message(driver)
    assert drain(driver)[0] == []


def test_the_page_fits_a_phone_width_window(driver, server: Server) -> None:
    size(driver, 390, 844, mobile=True)
    try:
        open_page(driver, server, "models/moons-otcfm/sample")
        run_and_wait(driver, "#sample-go")
        wait_for(driver, lambda: "density" in one(driver, "#density-meta").text)
        assert message(driver) == ""
        assert driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth")
        plot = one(driver, "#sample-svg").rect
        assert 0 <= plot["x"] and plot["x"] + plot["width"] <= 390
        driver.get(f"{server.url}/#/")
        wait_for(driver, lambda: css(driver, ".card"))
        assert driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth")
        assert drain(driver)[1] == []
    finally:
        size(driver, 1280, 800)
