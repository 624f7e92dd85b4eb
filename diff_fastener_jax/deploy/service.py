"""The HTTP service around a Detector: a FastAPI app with /predict, /health and /info."""

from __future__ import annotations

import base64
import io
import logging
import threading
import time

import numpy as np
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image

from diff_fastener_jax.data import image_io
from diff_fastener_jax.deploy.detector import Detector
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.evaluation import report

log = logging.getLogger("diff_fastener_jax.serve")


def model_version(det: Detector) -> str:
    """'<checkpoint step>-<first 12 hex digits of the config digest>'."""
    return f"{det.record.get('checkpoint_step')}-{str(det.record.get('config_digest', ''))[:12]}"


def _png_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def create_app(det: Detector, *, max_upload_bytes: int = 20 * 2**20):
    """The FastAPI app serving `det` (warmed up: the first request does not pay for compilation)."""
    if det.threshold is None:
        raise UserError("the model has no threshold to label images with",
                        hint="export a run that finished training, or pass --threshold")
    api = FastAPI(title="diff_fastener_jax", version=model_version(det))
    version = model_version(det)
    lock = threading.Lock()  # one inference at a time: the batch is padded to one compiled size anyway
    det.predict([np.zeros((det.height, det.width, 3), np.uint8)])  # compile now, not on the first request

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": message})

    @api.middleware("http")
    async def limit_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_upload_bytes):
            return error(413, f"request too large: {length} bytes (limit {max_upload_bytes})")
        try:
            return await call_next(request)
        except Exception as e:  # noqa: BLE001 - never let one request take the service down
            log.exception("unexpected error")
            return error(500, f"internal error: {type(e).__name__}: {e}")

    @api.get("/health")
    def health():
        return {"status": "ok", "model_version": version}

    @api.get("/metadata")
    def metadata():
        return det.metadata | {"model_version": version}

    @api.post("/predict")
    def predict(file: list[UploadFile] = File(...), heatmap: bool = Query(False), mask: bool = Query(False),
                category: str | None = Query(None)):
        t0 = time.perf_counter()
        images, total = [], 0
        for f in file:
            data = f.file.read(max_upload_bytes + 1)
            total += len(data)
            if total > max_upload_bytes:
                return error(413, f"upload too large (limit {max_upload_bytes} bytes)")
            try:
                images.append(image_io.decode_bytes(data, f.filename or "upload"))
            except UserError as e:
                return error(415, f"{e} (send PNG, JPEG, BMP or TIFF images)")
        try:
            det.class_ids(category, len(images))  # a unified model needs ?category=NAME (one known name)
        except UserError as e:
            return error(422, f"{e}" + (f" ({e.hint})" if e.hint else ""))
        with lock:
            out = det.predict(images, category)
        ms = 1000.0 * (time.perf_counter() - t0)
        results = []
        for i, img in enumerate(images):
            r = {"filename": file[i].filename, "score": float(out.scores[i]), "label": int(out.labels[i]),
                 "threshold": float(out.thresholds[i]), "denoise_step": int(out.denoise_steps[i]),
                 "category": category,
                 "model_version": version, "milliseconds": ms,
                 "width": img.size[0], "height": img.size[1]}
            if heatmap:
                rgb = image_io.prepare_image(img, img.size[::-1])
                r["heatmap_png"] = _png_b64(report.heat_overlay(rgb, out.anomaly_maps[i], str(file[i].filename)))
            if mask:
                r["mask_png"] = _png_b64(out.masks[i].astype(np.uint8) * 255)
            results.append(r)
        return results[0] if len(results) == 1 else results

    return api
