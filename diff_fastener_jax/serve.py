r"""An HTTP service for a trained detector (FastAPI + uvicorn).

  python -m diff_fastener_jax.serve --model exported/demo --host 0.0.0.0 --port 8000

  POST /predict   multipart field `file` (repeat it for several images): one file -> one JSON object,
                  several -> a list. Each: score, label (score > threshold), threshold, model_version,
                  milliseconds, width, height; `?heatmap=true` / `?mask=true` add base64 PNGs
                  (heat-map overlay, binary mask) at the image's own size.
  GET  /health    {"status": "ok"} once the model is loaded and compiled
  GET  /metadata  detector.json without the full config, plus the model version

A file that is not an image gets 415 with the decoder's message naming it; a request over
--max_upload_mb gets 413; the service answers 500 (and stays up) on anything unexpected.
"""

from __future__ import annotations

import base64
import io
import logging
import threading
import time

import numpy as np
from absl import app, flags
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image

from diff_fastener_jax import cli, report
from diff_fastener_jax.api import Detector
from diff_fastener_jax.data import datasets
from diff_fastener_jax.errors import UserError

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
                images.append(datasets.decode_bytes(data, f.filename or "upload"))
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
                rgb = datasets.prepare_image(img, img.size[::-1])
                r["heatmap_png"] = _png_b64(report.heat_overlay(rgb, out.anomaly_maps[i], str(file[i].filename)))
            if mask:
                r["mask_png"] = _png_b64(out.masks[i].astype(np.uint8) * 255)
            results.append(r)
        return results[0] if len(results) == 1 else results

    return api


def define_flags() -> None:
    """This command's flags (defined only when it runs: absl flags are process-global)."""
    flags.DEFINE_string("model", None, "an export folder or a training run folder")
    flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    flags.DEFINE_integer("port", 8000, "port to listen on")
    flags.DEFINE_float("max_upload_mb", 20.0, "largest request accepted (MiB)")
    flags.DEFINE_float("threshold", None, "override the stored image-score threshold")


def main(argv):
    import uvicorn

    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not f.model:
        raise app.UsageError("--model is required")
    det = Detector.load(f.model, threshold=f.threshold)
    api = create_app(det, max_upload_bytes=int(f.max_upload_mb * 2**20))
    uvicorn.run(api, host=f.host, port=f.port, log_level="warning")


if __name__ == "__main__":
    cli.run(main, __doc__, define_flags=define_flags, required=("model",))
