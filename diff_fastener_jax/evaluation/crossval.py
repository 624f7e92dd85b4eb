"""The k-fold protocol over the normal images: one training and evaluation per fold, then mean and spread."""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from diff_fastener_jax.config import ConfigError, validate_config
from diff_fastener_jax.evaluation import report
from diff_fastener_jax.evaluation.evaluate import evaluate_workdir
from diff_fastener_jax.training.loop import train_and_evaluate

SUMMARY_KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_aupro",
    "precision",
    "recall",
    "images_per_second",
)


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
        res = evaluate_workdir(
            fold_dir, os.path.join(fold_dir, "eval"), title=f"fold {k}/{folds}", show_progress=not quiet
        )
        per_fold.append({key: res.get(key) for key in SUMMARY_KEYS} | {"fold": k})
    summary = summarize(per_fold)
    record = {
        "folds": folds,
        "per_fold": per_fold,
        "summary": {k: {"mean": m, "std": s} for k, (m, s) in summary.items()},
    }
    with open(os.path.join(workdir, "crossval.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(workdir, "crossval.csv"), "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["fold", *SUMMARY_KEYS])
        rows.writerows([r["fold"], *("" if r.get(k) is None else r[k] for k in SUMMARY_KEYS)] for r in per_fold)
    report.write_summary_html(os.path.join(workdir, "crossval.html"), f"{folds}-fold cross-validation", summary)
    return record
