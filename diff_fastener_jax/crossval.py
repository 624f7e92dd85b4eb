r"""The paper's k-fold protocol over the normal images: train and evaluate each fold, then summarise.

  python -m diff_fastener_jax.crossval --config configs/<x>.py[:preset] --workdir DIR [--folds K] \
      [--config.KEY=VALUE ...]

Example:
  python -m diff_fastener_jax.crossval --config configs/demo.py --workdir runs/demo_cv --folds 5

Fold k holds out the k-th of `--folds` equal parts of the normal training images: the model trains on
the rest and is evaluated on the held-out normals plus the test split's anomalies. Each fold is an
ordinary run in
`<workdir>/fold_<k>` (resumable); the summary (mean ± std per metric) goes to
`<workdir>/crossval.json` and `<workdir>/crossval.html`, one row per fold to `<workdir>/crossval.csv`.
"""

from __future__ import annotations

from absl import flags

from diff_fastener_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags (defined only when it runs, so importing the module defines none)."""
    cli.define_config("file")
    flags.DEFINE_string("workdir", None, "output folder: one run per fold in <workdir>/fold_<k>, the summary")
    flags.DEFINE_integer("folds", 5, "number of folds (k >= 2)")


def main(argv) -> int:
    # Here, not at the top: without JAX the command ends with cli.run's one error line.
    from diff_fastener_jax.evaluation.crossval import run_crossval

    record = run_crossval(cli.get_config(), FLAGS.workdir, FLAGS.folds)
    for k, v in record["summary"].items():
        print(f"{k:<20} {v['mean']:.4f} ± {v['std']:.4f}")
    return 0


if __name__ == "__main__":
    cli.run(main, __doc__, define_flags=define_flags, required=("config", "workdir"))
