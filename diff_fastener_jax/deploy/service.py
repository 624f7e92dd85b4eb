"""The HTTP service around a Detector: a FastAPI app with /predict, /health and /metadata.

Nothing a client sends can take it down or exhaust the host: every request body is counted as it
arrives and refused (413) once it passes the limit; an image's size is read from its header and
refused before it is decoded; one request at a time decodes, scores and renders (heat maps at a
capped size), at most `max_queue` wait for it and the rest are told to come back (503, Retry-After).
Every 4xx/5xx answer has one shape: {"error": {"status": 413, "message": "..."}}.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import logging
import threading
import time
import warnings

import numpy as np
from fastapi import FastAPI, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.exceptions import HTTPException

from diff_fastener_jax.data import image_io
from diff_fastener_jax.deploy import heatmap as heatmaps
from diff_fastener_jax.deploy import threshold as D
from diff_fastener_jax.deploy.detector import Detector, resize_map
from diff_fastener_jax.deploy.webpage import add_inspection_page
from diff_fastener_jax.errors import UserError

log = logging.getLogger("diff_fastener_jax.serve")


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask of the service (the serve command's flags of the same names)."""

    max_body_bytes: int = 20 * 2**20  # a request body, counted as it streams in (chunked ones too)
    max_pixels: int = 40_000_000  # one image's width x height, read from its header before decoding
    max_files: int = 16  # images in one request
    max_queue: int = 8  # requests waiting for the inference slot; more get 503
    heatmap_max_side: int = 1024  # heat-map and mask PNGs are rendered with their longest side at most this
    retry_after_s: int = 5  # the Retry-After of a 503

    def check(self) -> None:
        """UserError naming the first limit that is not a positive number (max_queue may be 0)."""
        for field in dataclasses.fields(self):
            value, least = getattr(self, field.name), 0 if field.name == "max_queue" else 1
            if not isinstance(value, int) or value < least:
                flag = "max_upload_mb" if field.name == "max_body_bytes" else field.name
                raise UserError(f"--{flag}: must be >= {least}, got {value}")


def error_body(status: int, message: str) -> dict:
    """THE error shape of every 4xx/5xx answer."""
    return {"error": {"status": int(status), "message": str(message)}}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(status, message), headers=headers)


class BodyTooLarge(Exception):
    """Raised inside the app's read of a request body once it passes the limit."""


class BodyLimit:
    """ASGI middleware: a request body larger than `max_bytes` gets 413 as soon as the limit is passed.

    A declared Content-Length over the limit is refused before anything is read; otherwise the bytes are
    counted as they arrive (chunked uploads have no length), and the read stops at the chunk that
    passes the limit, so nothing past it is ever buffered or spooled to disk. Whatever the app would
    have answered to the aborted read is replaced by the 413.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    def message(self, size: str) -> str:
        return f"request too large: {size} (limit {self.max_bytes} bytes; serve --max_upload_mb)"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await error_response(413, self.message(f"{length.decode('latin-1')} bytes"))(scope, receive, send)
        received, over, started = 0, False, False

        async def counted_receive():
            nonlocal received, over
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise BodyTooLarge(received)
            return msg

        async def guarded_send(msg):
            nonlocal started
            if over:
                return  # the app's answer to the aborted read: replaced by the 413 below
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            pass
        if over and not started:
            await error_response(413, self.message(f"more than {self.max_bytes} bytes"))(scope, receive, send)


class InferenceSlot:
    """One request at a time decodes, scores and renders; at most `max_queue` wait for their turn and
    any more get 503 with Retry-After straight away (so waiting requests, and the memory their uploads
    hold, stay bounded)."""

    def __init__(self, max_queue: int, retry_after_s: int):
        self.max_queue, self.retry_after_s = max_queue, retry_after_s
        self._slot = threading.Lock()
        self._count = threading.Lock()  # guards the two counters
        self.waiting, self.running = 0, 0

    @contextlib.contextmanager
    def __call__(self):
        with self._count:
            if self.running and self.waiting >= self.max_queue:
                raise HTTPException(
                    503,
                    f"busy: {self.waiting} request(s) already waiting (serve --max_queue "
                    f"{self.max_queue}); retry in {self.retry_after_s} s",
                    headers={"Retry-After": str(self.retry_after_s)},
                )
            self.waiting += 1
        self._slot.acquire()
        with self._count:
            self.waiting, self.running = self.waiting - 1, 1
        try:
            yield
        finally:
            with self._count:
                self.running = 0
            self._slot.release()


def model_version(det: Detector) -> str:
    """'<checkpoint step>-<first 12 hex digits of the config digest>'."""
    return f"{det.record.get('checkpoint_step')}-{str(det.record.get('config_digest', ''))[:12]}"


def _png_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def check_header(upload, name: str, max_pixels: int) -> None:
    """Reads only the image header of an upload (bytes, or a seekable file, rewound afterwards): 415 if
    it is no image, 413 if it has more than `max_pixels` pixels (a few KB of PNG can declare gigabytes
    of pixels)."""
    source = io.BytesIO(upload) if isinstance(upload, bytes) else upload
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)  # lazy: the header only, until .load()
            width, height = img.size
    except Image.DecompressionBombError as e:
        raise HTTPException(413, f"{name}: {e} (limit {max_pixels} pixels; serve --max_pixels)") from e
    except Image.UnidentifiedImageError as e:  # PIL's message names the in-memory buffer: say it plainly
        raise HTTPException(415, f"{name} is not an image this service reads; send PNG, JPEG, BMP, TIFF or WebP") from e
    except Exception as e:  # noqa: BLE001 - PIL raises SyntaxError, ValueError, ... on a damaged header
        raise HTTPException(
            415,
            f"{name} is not an image this service reads ({type(e).__name__}: {e}); send PNG, JPEG, BMP, TIFF or WebP",
        ) from e
    finally:
        source.seek(0)
    if width * height > max_pixels:
        raise HTTPException(
            413,
            f"{name}: {width} x {height} = {width * height} pixels, over the limit of "
            f"{max_pixels} pixels per image (serve --max_pixels)",
        )


def display_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(height, width) scaled down (aspect kept, at least 1) so that the longest side is <= max_side."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(height * scale)), max(1, round(width * scale))


def add_error_handlers(api: FastAPI) -> None:
    """Every error answer in the one shape: HTTP errors (ours, 404, 405), request validation (422) and
    anything unexpected (500: logged, and the service stays up)."""

    @api.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error_response(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query"))
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        hint = " (send images as multipart/form-data field 'file', repeated for several)"
        return error_response(422, "; ".join(parts) + (hint if any("file" in p for p in parts) else ""))

    @api.exception_handler(Exception)
    async def internal_error(request, exc: Exception):
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def add_offline_docs(api: FastAPI) -> None:
    """/docs and /redoc without a CDN: FastAPI's pages load their scripts from one, and no installed
    package ships them, so these point at the machine-readable description instead."""

    def docs():
        return {
            "message": "this service describes its API at /openapi.json (OpenAPI 3); load it into any OpenAPI viewer",
            "openapi": "/openapi.json",
        }

    api.get("/docs", include_in_schema=False)(docs)
    api.get("/redoc", include_in_schema=False)(docs)


def create_app(det: Detector, *, limits: ServiceLimits | None = None) -> FastAPI:
    """The FastAPI app serving `det` (warmed up: the first request does not pay for compilation)."""
    limits = limits or ServiceLimits()
    limits.check()
    if det.threshold is None:
        raise UserError(
            "the model has no threshold to label images with",
            hint="export a run that finished training, or pass --threshold",
        )
    version = model_version(det)
    api = FastAPI(title="diff_fastener_jax", version=version, docs_url=None, redoc_url=None)
    api.state.limits = limits
    api.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    add_error_handlers(api)
    add_offline_docs(api)
    add_inspection_page(api)  # GET /: the inspection page for a browser
    slot = api.state.slot = InferenceSlot(limits.max_queue, limits.retry_after_s)
    det.predict([np.zeros((det.height, det.width, 3), np.uint8)])  # compile now, not on the first request

    @api.get("/health")
    def health():
        return {"status": "ok", "model_version": version}

    @api.get("/metadata")
    def metadata():
        return det.metadata | {"model_version": version, "limits": dataclasses.asdict(limits)}

    @api.post("/predict")
    def predict(
        file: list[UploadFile] = File(...),
        heatmap: bool = Query(False),
        mask: bool = Query(False),
        category: str | None = Query(None),
    ):
        t0 = time.perf_counter()
        if len(file) > limits.max_files:
            raise HTTPException(
                413, f"too many files: {len(file)} (limit {limits.max_files} per request; serve --max_files)"
            )
        names = [f.filename or f"file {i}" for i, f in enumerate(file)]
        for name, f in zip(names, file):  # the uploads stay spooled (on disk past 1 MiB) while they wait
            check_header(f.file, name, limits.max_pixels)
        try:
            det.class_ids(category, len(file))  # a unified model needs ?category=NAME (one known name)
        except UserError as e:
            raise HTTPException(422, f"{e}" + (f" ({e.hint})" if e.hint else "")) from e
        with slot():  # reading, decoding, scoring and rendering: one request at a time, memory bounded
            images = []
            for name, f in zip(names, file):
                try:
                    images.append(image_io.decode_bytes(f.file.read(), name))
                except UserError as e:  # a known format whose data is truncated or corrupt
                    raise HTTPException(422, str(e)) from e
            out = det.predict(images, category)
            ms = 1000.0 * (time.perf_counter() - t0)
            results = []
            for i, img in enumerate(images):
                r = {
                    "filename": names[i],
                    "score": float(out.scores[i]),
                    "label": int(out.labels[i]),
                    "threshold": float(out.thresholds[i]),
                    "denoise_step": int(out.denoise_steps[i]),
                    "category": category,
                    "model_version": version,
                    "milliseconds": ms,
                    "width": img.size[0],
                    "height": img.size[1],
                }
                if heatmap or mask:
                    h, w = display_size(img.size[0], img.size[1], limits.heatmap_max_side)
                    amap = resize_map(out.anomaly_maps[i], h, w)
                if heatmap:
                    r["heatmap_png"] = _png_b64(
                        heatmaps.heat_overlay(image_io.prepare_image(img, (h, w)), amap, names[i])
                    )
                if mask:
                    r["mask_png"] = _png_b64(D.is_anomalous(amap, det.pixel_threshold).astype(np.uint8) * 255)
                results.append(r)
        return results[0] if len(results) == 1 else results

    return api
