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

from absl import app, flags

from diff_fastener_jax import cli
from diff_fastener_jax.deploy.detector import Detector
from diff_fastener_jax.deploy.service import create_app


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
