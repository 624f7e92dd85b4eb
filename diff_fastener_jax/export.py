r"""Export a trained run as a self-contained folder: StableHLO, ONNX, OpenVINO, parameters, detector.json.

  python -m diff_fastener_jax.export --workdir runs/demo --out exported/demo [--checkpoint STEP]
  python -m diff_fastener_jax.export --workdir runs/demo --out exported/demo --formats stablehlo,onnx,openvino

The folder holds
  model.stablehlo   `jax.export` serialisation of the whole inference program (both U-Net passes, the
                    segmentation net, the top-K score) with a symbolic batch size; call it with
                    (params, images) -> (anomaly_map (N, H, W), score (N,)) after `jax.export.deserialize`;
                    detector.json's stablehlo.params lists its parameters in order (name, shape, dtype)
  model.onnx        the same program with the parameters embedded: input `images` float32 (B, H, W, 3)
                    in [-1, 1] (+ `class_ids` int32 (B,) for a multi-category model), outputs
                    `anomaly_map` (B, H, W) and `score` (B,) (jax2onnx); B is dynamic unless --onnx_batch
  model.xml/.bin    (--formats ...,openvino) the ONNX model as OpenVINO IR
  params.npz        the (EMA) parameters, keys 'recon/...', 'seg/...'
  detector.json     the input contract, inference settings, threshold (see detector.py)
  config.json       the run's config (to rebuild the networks for `Detector.load`)
The folder appears only once complete (it is written into a hidden sibling, then renamed); a
non-empty --out is refused unless --overwrite, which replaces it whole.
Copy the folder anywhere and load it with `Detector.load(folder)` or serve it with
`python -m diff_fastener_jax.serve --model folder`; no training data is needed.
"""

from __future__ import annotations

import sys

from absl import app, flags

from diff_fastener_jax import cli
from diff_fastener_jax.deploy import detector as api  # noqa


def define_flags() -> None:
    """This command's flags (defined only when it runs: absl flags are process-global and other
    commands define --workdir too)."""
    # Here, not at the top: deploy.export imports JAX, and without it the command ends with
    # cli.run's one error line.
    from diff_fastener_jax.deploy.export import DEFAULT_FORMATS, EXPORT_FORMATS

    flags.DEFINE_string("workdir", None, "training run folder")
    flags.DEFINE_string("out", None, "export folder to write")
    flags.DEFINE_integer(
        "checkpoint", None, "step to export (default: the step selected on validation, else the latest)"
    )
    flags.DEFINE_string(
        "formats", ",".join(DEFAULT_FORMATS), f"programs to write, comma-separated: {', '.join(EXPORT_FORMATS)}"
    )
    flags.DEFINE_boolean("onnx", True, "deprecated: --noonnx is --formats stablehlo")
    flags.DEFINE_integer("onnx_batch", 0, "fix model.onnx's batch size (0: dynamic, any batch)")
    flags.DEFINE_boolean("overwrite", False, "replace a non-empty --out folder whole (refused otherwise)")


def main(argv):
    from diff_fastener_jax.deploy.export import export_run

    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not f.workdir or not f.out:
        raise app.UsageError("--workdir and --out are required")
    if not f.onnx:
        print("warning: --noonnx is deprecated; use --formats stablehlo", file=sys.stderr)
    record = export_run(
        f.workdir,
        f.out,
        checkpoint=f.checkpoint,
        onnx=f.onnx,
        onnx_batch=f.onnx_batch or None,
        formats=f.formats,
        overwrite=f.overwrite,
    )
    thr = record["threshold"]["value"]
    print(f"exported step {record['checkpoint_step']} (threshold {thr if thr is None else round(thr, 6)})")


if __name__ == "__main__":
    cli.run(main, __doc__, define_flags=define_flags, required=("workdir", "out"))
