r"""Export a trained run as a self-contained folder: StableHLO, ONNX, parameters and detector.json.

  python -m diff_fastener_jax.export --workdir runs/demo --out exported/demo [--checkpoint STEP]

The folder holds
  model.stablehlo   `jax.export` serialisation of the whole inference program (both U-Net passes, the
                    segmentation net, the top-K score) with a symbolic batch size; call it with
                    (params, images) -> (anomaly_map (N, H, W), score (N,)) after `jax.export.deserialize`
  model.onnx        the same program with the parameters embedded: input `images` float32 (B, H, W, 3)
                    in [-1, 1], outputs `anomaly_map` (B, H, W) and `score` (B,) (jax2onnx); B is fixed
                    (--onnx_batch, default 1): jax2onnx 0.17.1 cannot convert the bilinear upsampling
                    with a symbolic batch, so pad short batches (`onnx_predict` does)
  params.npz        the (EMA) parameters, keys 'recon/...', 'seg/...'
  detector.json     the input contract, inference settings, threshold (see detector.py)
  config.json       the run's config (to rebuild the networks for `Detector.load`)
Copy the folder anywhere and load it with `Detector.load(folder)` or serve it with
`python -m diff_fastener_jax.serve --model folder`; no training data is needed.
"""

from __future__ import annotations

from absl import app, flags

from diff_fastener_jax import cli
from diff_fastener_jax.deploy import detector as api  # noqa
from diff_fastener_jax.deploy.export import export_run


def define_flags() -> None:
    """This command's flags (defined only when it runs: absl flags are process-global and other
    commands define --workdir too)."""
    flags.DEFINE_string("workdir", None, "training run folder")
    flags.DEFINE_string("out", None, "export folder to write")
    flags.DEFINE_integer("checkpoint", None, "step to export (default: the step selected on validation, else the latest)")
    flags.DEFINE_boolean("onnx", True, "also write model.onnx (jax2onnx)")
    flags.DEFINE_integer("onnx_batch", 1, "the fixed batch size of model.onnx")


def main(argv):
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not f.workdir or not f.out:
        raise app.UsageError("--workdir and --out are required")
    record = export_run(f.workdir, f.out, checkpoint=f.checkpoint, onnx=f.onnx, onnx_batch=f.onnx_batch)
    thr = record["threshold"]["value"]
    print(f"exported step {record['checkpoint_step']} (threshold {thr if thr is None else round(thr, 6)})")


if __name__ == "__main__":
    cli.run(main, __doc__, define_flags=define_flags, required=("workdir", "out"))
