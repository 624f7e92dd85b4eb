"""The service's limits and error shape, on a stand-in detector (no model, nothing compiled).

The real model behind a real server, under concurrent good and hostile requests, is
test_service_load.py.
"""

import asyncio
import base64
import io
import threading

import numpy as np
import pytest
from helpers import run_cli
from PIL import Image
from ship_support import png_bytes, png_header

from diff_fastener_jax.deploy import service
from diff_fastener_jax.deploy.detector import Prediction
from diff_fastener_jax.deploy.service import InferenceSlot, ServiceLimits, create_app
from diff_fastener_jax.errors import UserError

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from starlette.exceptions import HTTPException  # noqa: E402


class StandInDetector:
    """What create_app uses of a Detector: an image's score is its mean brightness / 255, its map that
    value everywhere. `gate`, when set, holds every predict until it is released."""

    height = width = channels = 3
    threshold, pixel_threshold, categories = 0.5, 0.5, []
    record = {"checkpoint_step": 6, "config_digest": "0" * 64}
    metadata = {"threshold_value": 0.5}

    def __init__(self, gate: threading.Event | None = None, fail: bool = False):
        self.gate, self.fail, self.calls = gate, fail, -1  # create_app's warm-up call is call 0

    def class_ids(self, categories, n):
        if categories:
            raise UserError(f"this model was trained on one category; it takes no category (got {categories!r})")

    def predict(self, images, categories=None):
        self.calls += 1
        if self.gate is not None and self.calls:
            self.gate.wait(30)
        if self.fail and self.calls:
            raise RuntimeError("stand-in failure")
        arrays = [np.asarray(im if isinstance(im, np.ndarray) else im.convert("RGB"), np.float32) for im in images]
        scores = np.asarray([a.mean() / 255.0 for a in arrays], np.float32)
        maps = [np.full(a.shape[:2], s, np.float32) for a, s in zip(arrays, scores)]
        n = len(images)
        return Prediction(
            scores=scores,
            labels=scores > 0.5,
            anomaly_maps=maps,
            masks=[m > 0.5 for m in maps],
            threshold=0.5,
            denoise_steps=np.zeros(n, np.int32),
            thresholds=np.full(n, 0.5),
        )


def client(det=None, **limits):
    app = create_app(det or StandInDetector(), limits=ServiceLimits(**limits))
    return TestClient(app, raise_server_exceptions=False)


def grey(h, w, value=200):
    return png_bytes(np.full((h, w, 3), value, np.uint8))


def assert_error(r, status, *words):
    """The one error shape, with the given status and words in its message."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"status", "message"}, body
    assert body["error"]["status"] == status
    for w in words:
        assert w in body["error"]["message"], body
    return body["error"]["message"]


def test_a_pixel_bomb_is_refused_from_its_header_before_decoding(monkeypatch):
    det = StandInDetector()
    c = client(det, max_pixels=40_000_000)
    decoded = []
    monkeypatch.setattr(service.image_io, "decode_bytes", lambda *a: decoded.append(a) or Image.new("RGB", (1, 1)))
    r = c.post("/predict", files=[("file", ("bomb.png", png_header(13000, 13000), "image/png"))])
    assert_error(r, 413, "bomb.png", "13000 x 13000", "40000000")
    # Past Pillow's own bomb limit too: still a 413, never a decode.
    r = c.post("/predict", files=[("file", ("huge.png", png_header(60000, 60000), "image/png"))])
    assert_error(r, 413, "huge.png")
    assert decoded == [] and det.calls == 0
    monkeypatch.undo()
    # Just under the limit: accepted (a real, small image at the boundary of a tighter limit).
    r = client(max_pixels=20 * 30).post("/predict", files=[("file", ("ok.png", grey(20, 30), "image/png"))])
    assert r.status_code == 200 and r.json()["width"] == 30


def test_too_many_files_wrong_field_not_an_image_and_truncated_images():
    c = client(max_files=2)
    three = [("file", (f"{i}.png", grey(4, 4), "image/png")) for i in range(3)]
    assert_error(c.post("/predict", files=three), 413, "too many files: 3", "limit 2")
    assert_error(c.post("/predict", files=[("image", ("a.png", grey(4, 4), "image/png"))]), 422, "file")
    assert_error(c.post("/predict"), 422, "file")
    assert_error(c.post("/predict", files=[("file", ("notes.txt", b"hello", "text/plain"))]), 415, "notes.txt")
    truncated = grey(16, 16)[:60]
    assert_error(c.post("/predict", files=[("file", ("cut.png", truncated, "image/png"))]), 422, "cut.png")
    assert_error(
        c.post("/predict", files=[("file", ("a.png", grey(4, 4), "image/png"))], params={"heatmap": "maybe"}),
        422,
        "heatmap",
    )
    assert_error(
        c.post("/predict", files=[("file", ("a.png", grey(4, 4), "image/png"))], params={"category": "rail"}),
        422,
        "one category",
    )
    assert_error(c.get("/nowhere"), 404)
    assert_error(c.get("/predict"), 405)
    assert c.get("/health").json()["status"] == "ok"


def test_an_unexpected_failure_is_a_500_in_the_same_shape_and_the_service_stays_up():
    c = client(StandInDetector(fail=True))
    assert_error(c.post("/predict", files=[("file", ("a.png", grey(4, 4), "image/png"))]), 500, "stand-in failure")
    assert c.get("/health").status_code == 200


def test_declared_oversize_body_is_refused():
    c = client(max_body_bytes=10_000)
    r = c.post("/predict", files=[("file", ("big.png", b"\0" * 20_000, "image/png"))])
    assert_error(r, 413, "request too large", "10000")


def test_a_chunked_body_is_cut_off_at_the_limit_while_it_streams():
    """No Content-Length: the middleware counts the chunks as the app reads them and stops the read at
    the one that passes the limit (nothing after it is received, let alone spooled)."""
    limit, chunk = 200_000, 16_384
    app = create_app(StandInDetector(), limits=ServiceLimits(max_body_bytes=limit))
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    received, sent = [0], []

    async def receive():  # an endless upload
        body = head if received[0] == 0 else b"\0" * chunk
        received[0] += len(body)
        return {"type": "http.request", "body": body, "more_body": True}

    async def send(msg):
        sent.append(msg)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
        "headers": [
            (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
            (b"transfer-encoding", b"chunked"),
        ],
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = [m for m in sent if m["type"] == "http.response.start"]
    assert len(start) == 1 and start[0]["status"] == 413
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b'"status":413' in body and b"request too large" in body
    assert limit < received[0] <= limit + chunk


def test_heat_maps_and_masks_are_rendered_at_a_capped_size_inside_the_inference_slot(monkeypatch):
    app = create_app(StandInDetector(), limits=ServiceLimits(heatmap_max_side=64))
    c = TestClient(app)
    inside = []
    overlay = service.heatmaps.heat_overlay
    monkeypatch.setattr(
        service.heatmaps, "heat_overlay", lambda *a: inside.append(app.state.slot.running) or overlay(*a)
    )
    r = c.post(
        "/predict",
        files=[("file", ("wide.png", grey(50, 200), "image/png"))],
        params={"heatmap": "true", "mask": "true"},
    )
    assert r.status_code == 200, r.text
    one = r.json()
    assert (one["width"], one["height"]) == (200, 50)
    assert Image.open(io.BytesIO(base64.b64decode(one["heatmap_png"]))).size == (64, 16)
    assert Image.open(io.BytesIO(base64.b64decode(one["mask_png"]))).size == (64, 16)
    assert inside == [1]
    # An image within the cap keeps its own size.
    r = c.post("/predict", files=[("file", ("small.png", grey(10, 20), "image/png"))], params={"mask": "true"})
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["mask_png"]))).size == (20, 10)


def test_the_queue_is_bounded_and_the_overflow_is_told_to_retry():
    slot = InferenceSlot(max_queue=1, retry_after_s=7)
    release, entered = threading.Event(), threading.Event()

    def hold():
        with slot():
            entered.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert entered.wait(30)
    waiter = threading.Thread(target=lambda: slot().__enter__() and None)
    waiter.start()
    for _ in range(300):
        if slot.waiting == 1:
            break
        threading.Event().wait(0.01)
    assert (slot.running, slot.waiting) == (1, 1)
    with pytest.raises(HTTPException) as refused:
        with slot():
            pass
    assert refused.value.status_code == 503 and refused.value.headers == {"Retry-After": "7"}
    release.set()
    holder.join(30)
    waiter.join(30)
    assert slot.waiting == 0


def test_a_busy_service_answers_503_with_retry_after():
    gate = threading.Event()
    c = client(StandInDetector(gate=gate), max_queue=0)
    first = []
    t = threading.Thread(
        target=lambda: first.append(c.post("/predict", files=[("file", ("a.png", grey(4, 4), "image/png"))]))
    )
    t.start()
    try:
        for _ in range(300):
            if c.app.state.slot.running:
                break
            threading.Event().wait(0.01)
        r = c.post("/predict", files=[("file", ("b.png", grey(4, 4), "image/png"))])
        assert_error(r, 503, "busy", "--max_queue")
        assert r.headers["retry-after"] == "5"
    finally:
        gate.set()
        t.join(30)
    assert first[0].status_code == 200


def test_docs_work_offline():
    c = client()
    for page in ("/docs", "/redoc"):
        r = c.get(page)
        assert r.status_code == 200 and r.json()["openapi"] == "/openapi.json"
        assert "cdn" not in r.text.lower()
    assert "/predict" in c.get("/openapi.json").json()["paths"]


def test_limits_must_be_positive():
    with pytest.raises(UserError, match="--max_files"):
        create_app(StandInDetector(), limits=ServiceLimits(max_files=0))


@pytest.mark.parametrize("port", ["99999", "0"])
def test_serve_refuses_a_port_outside_1_to_65535(port, tmp_path):
    proc = run_cli("serve", "--model", str(tmp_path / "no_model"), "--port", port, timeout=120)
    assert proc.returncode == 2 and "error: --port" in proc.stderr and "1-65535" in proc.stderr, proc.stderr
