r"""The paper's k-fold protocol over the normal images: train and evaluate each fold, then summarise.

  python -m diff_fastener_jax.crossval --config configs/<x>.py[:preset] --workdir DIR [--folds K] \
      [--config.KEY=VALUE ...]

Example:
  python -m diff_fastener_jax.crossval --config configs/demo.py --workdir runs/demo_cv --folds 5

Fold k holds out the k-th fifth of the normal training images: the model trains on the rest and is
evaluated on the held-out normals plus the test split's anomalies. Each fold is an ordinary run in
`<workdir>/fold_<k>` (resumable); the summary (mean ± std per metric) goes to
`<workdir>/crossval.json` and `<workdir>/crossval.html`, one row per fold to `<workdir>/crossval.csv`.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np
from absl import flags

from diff_fastener_jax import cli, report
from diff_fastener_jax.config import ConfigError, validate_config
from diff_fastener_jax.evaluate import evaluate_workdir
from diff_fastener_jax.train import train_and_evaluate

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags (defined only when it runs, so importing the module defines none)."""
    cli.define_config("file")
    flags.DEFINE_string("workdir", None, "output folder: one run per fold in <workdir>/fold_<k>, the summary")
    flags.DEFINE_integer("folds", 5, "number of folds (k >= 2)")

SUMMARY_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro",
                "precision", "recall", "images_per_second")


def summarize(per_fold: list[dict]) -> dict[str, tuple[float, float]]:
    """{metric: (mean, std)} over folds, for the metrics every fold reports."""
    out = {}
    for k in SUMMARY_KEYS:
        vals = [f[k] for f in per_fold if k in f and f[k] is not None and np.isfinite(f[k])]
        if vals:
            out[k] = (float(np.mean(vals)), float(np.std(vals)))
    return out


def run_crossval(config, workdir: str, folds: int, *, quiet: bool = False) -> dict:
    """Trains and evaluates every fold; writes crossval.json / crossval.html; returns the summary."""
    if folds < 2:
        raise ConfigError(f"--folds must be >= 2, got {folds}", hint="e.g. --folds 5")
    validate_config(config)  # before any fold writes anything
    per_fold = []
    for k in range(folds):
        cfg = config.copy_and_resolve_references()
        cfg.unlock()
        cfg.data.num_folds = folds
        cfg.data.fold = k
        fold_dir = os.path.join(workdir, f"fold_{k}")
        train_and_evaluate(cfg, fold_dir, quiet=quiet)
        res = evaluate_workdir(fold_dir, os.path.join(fold_dir, "eval"), title=f"fold {k}/{folds}",
                               show_progress=not quiet)
        per_fold.append({key: res.get(key) for key in SUMMARY_KEYS} | {"fold": k})
    summary = summarize(per_fold)
    record = {"folds": folds, "per_fold": per_fold,
              "summary": {k: {"mean": m, "std": s} for k, (m, s) in summary.items()}}
    with open(os.path.join(workdir, "crossval.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(workdir, "crossval.csv"), "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["fold", *SUMMARY_KEYS])
        rows.writerows([r["fold"], *("" if r.get(k) is None else r[k] for k in SUMMARY_KEYS)] for r in per_fold)
    report.write_summary_html(os.path.join(workdir, "crossval.html"), f"{folds}-fold cross-validation", summary)
    return record


def main(argv) -> int:
    record = run_crossval(cli.get_config(), FLAGS.workdir, FLAGS.folds)
    for k, v in record["summary"].items():
        print(f"{k:<20} {v['mean']:.4f} ± {v['std']:.4f}")
    return 0


if __name__ == "__main__":
    cli.run(main, __doc__, define_flags=define_flags, required=("config", "workdir"))
