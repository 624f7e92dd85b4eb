"""The inspection page (GET /): its files and headers through a TestClient (fast), and the page itself in
headless Chromium against the trained smoke model served on a free port (slow; skipped only when no
Chromium is installed)."""

import base64
import contextlib
import csv
import fnmatch
import os
import re
import shutil
import threading
import time

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image
from ship_support import free_port, png_bytes, smoke_export, smoke_test_images

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from diff_fastener_jax.deploy.webpage import (  # noqa: E402
    ASSET_PREFIX,
    PAGE_FILES,
    STATIC_FOLDER,
    add_inspection_page,
    read_page_file,
)

# Where the Debian packages `chromium` and `chromium-driver` put them (also looked up on PATH).
CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMEDRIVER_NAME = "chromedriver"
PIXEL_LIMIT = 2048  # the served model's max_pixels: the 32 x 32 test images pass, a 64 x 64 one does not
WAIT_S = 120  # for one answer from the served model on a loaded 2-core machine


def page_client() -> TestClient:
    api = FastAPI()
    add_inspection_page(api)
    return TestClient(api)


def test_page_and_assets_are_served_with_their_media_types():
    client = page_client()
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.content == read_page_file("index.html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    expected = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
    for name, media_type in expected.items():
        r = client.get(ASSET_PREFIX + name)
        assert r.status_code == 200 and r.headers["content-type"] == media_type, name
        assert r.content == read_page_file(name)
    assert client.get(ASSET_PREFIX + "index.html").status_code == 404
    assert client.get(ASSET_PREFIX + "missing.js").status_code == 404


def test_page_loads_nothing_from_another_host():
    html = read_page_file("index.html").decode()
    for name in PAGE_FILES:
        text = read_page_file(name).decode()
        assert not re.findall(r"[a-z][a-z0-9+.-]*://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), name
    css = read_page_file("style.css").decode()
    assert "@import" not in css and "url(" not in css and "@font-face" not in css
    # Every file the page refers to is one this module serves, by a relative path.
    referenced = [u for u in re.findall(r'(?:src|href)="([^"]+)"', html) if not u.startswith("data:")]
    assert sorted(referenced) == sorted(ASSET_PREFIX.lstrip("/") + n for n in PAGE_FILES if n != "index.html")
    client = page_client()
    assert all(client.get("/" + path).status_code == 200 for path in referenced)


def test_page_files_ship_in_the_package():
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["diff_fastener_jax.deploy"]
    folder = os.path.join(ROOT, "diff_fastener_jax", "deploy", STATIC_FOLDER)
    on_disk = sorted(os.listdir(folder))
    assert on_disk == sorted(PAGE_FILES)  # a file added to static/ is also added to PAGE_FILES
    for name in on_disk:
        assert any(fnmatch.fnmatch(f"{STATIC_FOLDER}/{name}", p) for p in patterns), name


class StandInDetector:
    """The little create_app uses of a Detector when it builds the app (nothing is compiled)."""

    height = width = channels = 3
    threshold, pixel_threshold, categories = 0.5, 0.5, []
    record = {"checkpoint_step": 6, "config_digest": "0" * 64}
    metadata = {"threshold_value": 0.5, "categories": []}

    def predict(self, images, categories=None):
        return None


def test_the_service_serves_the_page_beside_its_api():
    from diff_fastener_jax.deploy.service import create_app

    client = TestClient(create_app(StandInDetector()))
    assert client.get("/").content == read_page_file("index.html")
    assert client.get(ASSET_PREFIX + "app.js").status_code == 200
    assert client.get("/health").json()["status"] == "ok"


# ----------------------------------------------------------------------------------------------
# In a real browser
# ----------------------------------------------------------------------------------------------


def find_chromium() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) executables, or None where one is missing."""
    browser = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
    return browser, shutil.which(CHROMEDRIVER_NAME)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """(headless Chromium driven by Selenium, its download folder); skips when no Chromium is installed."""
    binary, driver_path = find_chromium()
    if not (binary and driver_path):
        pytest.skip(
            "no Chromium found: the browser test needs `chromium` and `chromedriver` on PATH "
            "(Debian: apt-get install chromium chromium-driver)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = binary  # with the driver's path below, Selenium Manager fetches nothing
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1100",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(arg)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver, downloads
    finally:
        driver.quit()


@contextlib.contextmanager
def serving(api):
    """The base URL of `api` served by uvicorn on a free 127.0.0.1 port, in a thread of this process."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(api, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail("the service did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory, smoke_run):
    """(base url, Detector, smoke run): the exported smoke model behind create_app (in this process, so
    the test compares with the very same Detector)."""
    from diff_fastener_jax import Detector
    from diff_fastener_jax.deploy.service import ServiceLimits, create_app

    det = Detector.load(smoke_export(tmp_path_factory, smoke_run))
    with serving(create_app(det, limits=ServiceLimits(max_pixels=PIXEL_LIMIT))) as url:
        yield url, det, smoke_run


def artefact_dir(tmp_path) -> str:
    """$DFJ_ARTIFACTS when set (CI keeps it), else this test's temp folder."""
    folder = os.environ.get("DFJ_ARTIFACTS") or str(tmp_path)
    os.makedirs(folder, exist_ok=True)
    return folder


def significant_digits(text: str) -> int:
    mantissa = text.lower().split("e")[0].lstrip("-").replace(".", "")
    return len(mantissa.lstrip("0"))


def assert_shows(shown: str, value: float, what: str) -> None:
    """`shown` is `value` rounded to the digits shown (at least 3 of them)."""
    digits = significant_digits(shown)
    assert digits >= 3, f"{what}: {shown!r} shows too few digits"
    assert float(shown) == float(f"{value:.{digits}g}"), f"{what}: shown {shown}, predict gives {value}"


def test_inspection_page_in_a_browser(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, det, run = served
    driver, downloads = browser
    # Copies named '<defect type>_<name>': the demo's file names repeat across its defect folders.
    images = smoke_test_images(run)
    normal, defect = (
        next(p for p in images if (os.path.basename(os.path.dirname(p)) == "good") == want) for want in (True, False)
    )
    normal, defect = (str(shutil.copy(p, tmp_path / "_".join(p.split(os.sep)[-2:]))) for p in (normal, defect))
    refs = {p: det.predict([p]) for p in (normal, defect)}  # one image per request, like the page sends

    driver.get(url + "/")
    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda d: d.find_element(By.ID, "model-version").text not in ("", "loading…"))
    assert not driver.find_element(By.ID, "category-field").is_displayed()  # a one-category model
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)  # the file picker is the first stop
    assert driver.switch_to.active_element.get_attribute("id") == "file-input"
    assert_shows(driver.find_element(By.ID, "model-threshold").text, det.threshold, "model threshold")

    # Two images picked at once: one card and one table row each, in the order given.
    driver.find_element(By.ID, "file-input").send_keys(f"{normal}\n{defect}")
    done = "#cards .card.normal, #cards .card.anomalous"
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, done)) == 2)
    cards = {
        c.find_element(By.CSS_SELECTOR, ".card-title").text: c for c in driver.find_elements(By.CSS_SELECTOR, done)
    }
    for path, ref in refs.items():
        card = cards[os.path.basename(path)]
        anomalous = bool(ref.labels[0])
        assert card.find_element(By.CSS_SELECTOR, ".verdict").text == ("Anomalous" if anomalous else "Normal")
        assert_shows(card.find_element(By.CSS_SELECTOR, ".score").text, float(ref.scores[0]), path)
        assert_shows(card.find_element(By.CSS_SELECTOR, ".threshold").text, float(ref.thresholds[0]), path)
        heatmap = card.find_element(By.CSS_SELECTOR, "img.heatmap")
        wait.until(lambda d, img=heatmap: d.execute_script("return arguments[0].complete", img))
        width = driver.execute_script("return arguments[0].naturalWidth", heatmap)
        assert width == Image.open(path).size[0] and heatmap.is_displayed()
        assert os.path.basename(path) in heatmap.get_attribute("alt")
    # No script error, nothing the page's Content-Security-Policy had to block.
    problems = [e for e in driver.get_log("browser") if e["source"] in ("javascript", "security")]
    assert not problems, problems
    rows = driver.find_elements(By.CSS_SELECTOR, "#results-body tr")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == [
        os.path.basename(normal),
        os.path.basename(defect),
    ]

    # A text file and an image over the pixel limit: a readable message on the page, not JSON.
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, not an image")
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(np.zeros((64, 64, 3), np.uint8)))
    driver.find_element(By.ID, "file-input").send_keys(f"{notes}\n{big}")
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cards .card.failed")) == 2)
    errors = {
        c.find_element(By.CSS_SELECTOR, ".card-title").text: c.find_element(By.CSS_SELECTOR, ".error-message").text
        for c in driver.find_elements(By.CSS_SELECTOR, "#cards .card.failed")
    }
    for name, words in (("notes.txt", "not an image"), ("big.png", "over the limit")):
        message = errors[name]
        assert words in message and name in message, message
        assert not message.lstrip().startswith("{") and '"error"' not in message and '"detail"' not in message
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
    driver.set_window_size(
        1280,
        driver.execute_script(  # the whole page: its height plus the window's frame
            "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight"
        ),
    )
    screenshot = os.path.join(artefact_dir(tmp_path), "inspection_page.png")
    assert driver.save_screenshot(screenshot) and Image.open(screenshot).size[0] > 0

    # The CSV, built in the browser: every row so far, the scores at full precision.
    driver.find_element(By.ID, "download-csv").click()
    path = downloads / "inspection_results.csv"
    wait.until(lambda d: path.exists() and path.stat().st_size > 0)
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["filename"] for r in table] == [
        os.path.basename(normal),
        os.path.basename(defect),
        "notes.txt",
        "big.png",
    ]
    for row, ref in zip(table, refs.values()):
        assert float(row["score"]) == pytest.approx(float(ref.scores[0]), rel=1e-6)
        assert row["verdict"] == ("anomalous" if ref.labels[0] else "normal")
    assert [r["verdict"] for r in table[2:]] == ["error", "error"] and "notes.txt" in table[2]["message"]


def stand_in_service(heatmap_png: bytes):
    """(app, requests): the page in front of a stand-in /metadata (a two-category model) and /predict
    whose answer depends on the uploaded file's name: each error shape a service may use, a proxy's
    HTML error page, or a result. `requests` collects (file name, query parameters) of every /predict."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse, JSONResponse

    api, requests = FastAPI(), []
    add_inspection_page(api)

    @api.get("/metadata")
    def metadata():
        return {
            "model_version": "stand-in",
            "threshold_value": 0.5,
            "categories": ["bottle", "metal_plate"],
            "threshold": {"value": 0.5, "per_category": {"bottle": 0.25, "metal_plate": 0.75}},
            "input": {"height": 32, "width": 32},
            "limits": {"max_body_bytes": 4096},
        }

    @api.post("/predict")
    async def predict(request: Request):
        name = (await request.form())["file"].filename
        requests.append((name, dict(request.query_params)))
        answers = {
            "detail": (422, {"detail": [{"loc": ["query", "category"], "msg": "Field required"}]}),
            "error_string": (415, {"error": "an error as a string"}),
            "error_object": (413, {"error": {"status": 413, "message": "an error as an object"}}),
        }
        stem = name.rsplit(".", 1)[0]
        if stem in answers:
            status, body = answers[stem]
            return JSONResponse(body, status_code=status)
        if stem == "proxy":
            return HTMLResponse("<html><body><h1>Bad gateway</h1></body></html>", status_code=502)
        return {
            "filename": name,
            "score": 0.8125,
            "label": 1,
            "threshold": 0.75,
            "denoise_step": 0,
            "category": request.query_params.get("category"),
            "model_version": "stand-in",
            "milliseconds": 1.0,
            "width": 4,
            "height": 4,
            "heatmap_png": base64.b64encode(heatmap_png).decode("ascii"),
        }

    return api, requests


def test_page_reads_every_error_shape_and_takes_dropped_files(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver, _ = browser
    png = png_bytes(np.full((4, 4, 3), 200, np.uint8))
    api, requests = stand_in_service(png)
    with serving(api) as url:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "category-field").is_displayed())
        select = Select(driver.find_element(By.ID, "category"))
        assert [o.get_attribute("value") for o in select.options] == ["bottle", "metal_plate"]
        select.select_by_value("metal_plate")

        uploads = {
            "detail.png": "category: Field required",
            "error_string.png": "an error as a string",
            "error_object.png": "an error as an object",
            "proxy.png": "HTTP 502",
            "huge.png": "over the service's upload limit",
        }
        for name in uploads:
            (tmp_path / name).write_bytes(png + (b"\0" * 5000 if name == "huge.png" else b""))
        driver.find_element(By.ID, "file-input").send_keys("\n".join(str(tmp_path / n) for n in uploads))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#cards .card.failed")) == len(uploads))
        for card in driver.find_elements(By.CSS_SELECTOR, "#cards .card.failed"):
            name = card.find_element(By.CSS_SELECTOR, ".card-title").text
            message = card.find_element(By.CSS_SELECTOR, ".error-message").text
            assert uploads[name] in message and "{" not in message, (name, message)
        # The file over the upload limit in /metadata is refused here, never sent.
        assert sorted(requests) == sorted(
            (n, {"heatmap": "true", "category": "metal_plate"}) for n in uploads if n != "huge.png"
        )

        # A file dropped on the drop zone is inspected like a picked one.
        driver.execute_script(
            """
            const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
            const files = new DataTransfer();
            files.items.add(new File([bytes], "dropped.png", {type: "image/png"}));
            document.getElementById("drop-zone").dispatchEvent(
                new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
        """,
            base64.b64encode(png).decode("ascii"),
        )
        card = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cards .card.anomalous"))[0]
        assert card.find_element(By.CSS_SELECTOR, ".card-title").text == "dropped.png"
        assert card.find_element(By.CSS_SELECTOR, ".score").text == "0.8125"
        assert card.find_element(By.CSS_SELECTOR, ".threshold").text == "0.7500"
        assert requests[-1] == ("dropped.png", {"heatmap": "true", "category": "metal_plate"})
        rows = driver.find_elements(By.CSS_SELECTOR, "#results-body tr")
        assert len(rows) == len(uploads) + 1 and "metal_plate" in rows[-1].text
