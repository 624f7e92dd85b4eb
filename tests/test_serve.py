"""The HTTP service end to end: a real uvicorn server on a free port, called with httpx."""

import base64
import io
import os

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image
from ship_support import running_service, smoke_export, smoke_test_images

from diff_fastener_jax import Detector

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def server(tmp_path_factory, smoke_run):
    """(base url, export folder, smoke run) of a server started in a subprocess; stopped afterwards."""
    folder = smoke_export(tmp_path_factory, smoke_run)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    with running_service(folder, log_path, "--max_upload_mb", "0.05", env=env) as (url, _):
        yield url, folder, smoke_run


def _post(url, files, **params):
    return httpx.post(url + "/predict", files=files, params=params, timeout=120.0)


def test_service_end_to_end(server):
    url, folder, run = server
    det = Detector.load(folder)
    a, b = smoke_test_images(run, 2)
    ref = det.predict([a, b])
    meta = httpx.get(url + "/metadata", timeout=10).json()
    assert meta["threshold_value"] == pytest.approx(det.threshold) and meta["input"]["height"] == 32
    # One file -> one object, with the optional PNGs at the image's size.
    r = _post(url, [("file", ("a.png", open(a, "rb"), "image/png"))], heatmap="true", mask="true")
    assert r.status_code == 200, r.text
    one = r.json()
    assert one["score"] == pytest.approx(float(ref.scores[0]), abs=1e-5)
    assert one["label"] == int(ref.labels[0]) and one["threshold"] == pytest.approx(det.threshold)
    assert one["model_version"] == meta["model_version"] and one["milliseconds"] > 0
    heat = Image.open(io.BytesIO(base64.b64decode(one["heatmap_png"])))
    assert heat.size == (32, 32) and heat.mode == "RGB"
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(one["mask_png"]))))
    np.testing.assert_array_equal(mask > 0, ref.masks[0])
    # Several files -> a list in the same order.
    r = _post(url, [("file", ("a.png", open(a, "rb"), "image/png")), ("file", ("b.png", open(b, "rb"), "image/png"))])
    both = r.json()
    assert isinstance(both, list) and [x["filename"] for x in both] == ["a.png", "b.png"]
    np.testing.assert_allclose([x["score"] for x in both], ref.scores, atol=1e-5)


def test_service_refuses_bad_input_and_stays_up(server):
    url, _, _ = server
    r = _post(url, [("file", ("notes.txt", b"hello, not an image", "text/plain"))])
    assert r.status_code == 415 and "notes.txt" in r.json()["error"]["message"]
    r = _post(url, [("file", ("big.png", b"\0" * 100_000, "image/png"))])  # over the 0.05 MiB limit
    assert r.status_code == 413 and "too large" in r.json()["error"]["message"]
    r = httpx.post(url + "/predict", timeout=30.0)  # no file at all
    assert r.status_code == 422 and r.json()["error"]["status"] == 422
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
