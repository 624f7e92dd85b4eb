r"""An HTTP service for a trained detector (FastAPI + uvicorn).

  python -m diff_fastener_jax.serve --model exported/demo --host 0.0.0.0 --port 8000

  POST /predict   multipart field `file` (repeat it for several images): one file -> one JSON object,
                  several -> a list. Each: score, label (score > threshold), threshold, model_version,
                  milliseconds, width, height; `?heatmap=true` / `?mask=true` add base64 PNGs
                  (heat-map overlay, binary mask) at the image's size, the longest side at most --heatmap_max_side.
  GET  /health    {"status": "ok"} once the model is loaded and compiled
  GET  /metadata  detector.json without the full config, plus the model version

  GET  /docs      where the API is described (/openapi.json; no CDN is needed)

Limits (docs/deployment.md, "Service limits"): a body over --max_upload_mb is refused (413) while it
streams in; an image over --max_pixels (read from its header, before decoding) gets 413, more than
--max_files files 413, a file that is not an image 415, a truncated one 422; one request is scored at
a time and at most --max_queue wait, the rest get 503 with Retry-After. Every error answer is
{"error": {"status": N, "message": "..."}}; anything unexpected is a 500 and the service stays up.
"""

from __future__ import annotations

from absl import app, flags

from diff_fastener_jax import cli
from diff_fastener_jax.deploy.detector import Detector
from diff_fastener_jax.deploy.runtimes import RUNTIME_FLAG_HELP, RUNTIMES
from diff_fastener_jax.deploy.service import ServiceLimits, create_app
from diff_fastener_jax.errors import UserError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def define_flags() -> None:
    """This command's flags (defined only when it runs: absl flags are process-global)."""
    flags.DEFINE_string("model", None, "an export folder or a training run folder")
    flags.DEFINE_string("host", "127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    flags.DEFINE_integer("port", 8000, "port to listen on (1-65535)")
    defaults = ServiceLimits()
    flags.DEFINE_float("max_upload_mb", defaults.max_body_bytes / 2**20, "largest request body accepted (MiB)")
    flags.DEFINE_integer("max_pixels", defaults.max_pixels, "largest image accepted (width x height pixels)")
    flags.DEFINE_integer("max_files", defaults.max_files, "most images in one request")
    flags.DEFINE_integer("max_queue", defaults.max_queue, "most requests waiting for the model; more get 503")
    flags.DEFINE_integer(
        "heatmap_max_side",
        defaults.heatmap_max_side,
        "heat-map and mask PNGs are rendered with their longest side at most this",
    )
    flags.DEFINE_enum("log_level", "info", list(LOG_LEVELS), "uvicorn's log level (info: one access line per request)")
    flags.DEFINE_float("threshold", None, "override the stored image-score threshold")
    flags.DEFINE_enum(
        "runtime",
        "auto",
        list(RUNTIMES),
        RUNTIME_FLAG_HELP,
    )


def main(argv):
    import uvicorn

    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not f.model:
        raise app.UsageError("--model is required")
    if not 1 <= f.port <= 65535:
        raise UserError(f"--port {f.port}: a TCP port is 1-65535")
    if not f.max_upload_mb > 0:
        raise UserError(f"--max_upload_mb {f.max_upload_mb}: must be > 0")
    limits = ServiceLimits(
        max_body_bytes=int(f.max_upload_mb * 2**20),
        max_pixels=f.max_pixels,
        max_files=f.max_files,
        max_queue=f.max_queue,
        heatmap_max_side=f.heatmap_max_side,
    )
    limits.check()  # every limit before the model is loaded
    det = Detector.load(f.model, threshold=f.threshold, runtime=f.runtime)
    api = create_app(det, limits=limits)
    print(
        f"serving {f.model} at http://{f.host}:{f.port} (threshold {det.threshold:.6f}, "
        f"model version {api.version}; API at /openapi.json)",
        flush=True,
    )
    uvicorn.run(api, host=f.host, port=f.port, log_level=f.log_level, access_log=True)


if __name__ == "__main__":
    cli.run(main, __doc__, define_flags=define_flags, required=("model",))
