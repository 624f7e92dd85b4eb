r"""Evaluate a trained run on its test split and write metrics.json + a self-contained report.html.

  python -m diff_fastener_jax.evaluate --workdir RUN [--checkpoint STEP] [--out DIR] [--config.KEY=VALUE ...]

Example:
  python -m diff_fastener_jax.evaluate --workdir runs/demo
  python -m diff_fastener_jax.evaluate --workdir runs/demo --config.infer.map=recon_error --out runs/demo/eval_err

Overrides apply on top of the run's saved config.json.
The label threshold is calibrated on the held-out NORMAL validation images (never on the test set) at
`eval.fpr_target`, unless `--config.eval.threshold=X` gives one. Deterministic: every image gets the
model's fixed inference noise (from `infer.seed`), so a score depends on the model and the image alone.
"""

from __future__ import annotations

import json
import os

from absl import flags

from diff_fastener_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags (defined only when it runs, so importing the module defines none)."""
    cli.define_config("run")
    flags.DEFINE_string("workdir", None, "training run folder (holds config.json and checkpoints/)")
    flags.DEFINE_integer(
        "checkpoint", None, "step to evaluate (default: the step selected on validation, else the latest)"
    )
    flags.DEFINE_string("out", None, "output folder (default: <workdir>/eval)")
    flags.DEFINE_boolean(
        "recalibrate", False, "calibrate the threshold again on the held-out normals instead of using detector.json's"
    )


def main(argv) -> int:
    # Here, not at the top: without JAX the command ends with cli.run's one error line.
    from diff_fastener_jax.evaluation.evaluate import evaluate_workdir

    config = cli.get_config(workdir=FLAGS.workdir)
    out = FLAGS.out or os.path.join(FLAGS.workdir, "eval")
    result = evaluate_workdir(FLAGS.workdir, out, FLAGS.checkpoint, config=config, recalibrate=FLAGS.recalibrate)
    keys = [
        "image_auroc",
        "image_ap",
        "image_f1_max",
        "pixel_auroc",
        "pixel_ap",
        "pixel_aupro",
        "threshold",
        "precision",
        "recall",
        "images_per_second",
        "num_images",
    ]
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=1))
    print(f"wrote {out}/metrics.json and {out}/report.html")
    return 0


if __name__ == "__main__":
    cli.run(main, __doc__, define_flags=define_flags, required=("workdir",))
