r"""Evaluate a trained run on its test split and write metrics.json + a self-contained report.html.

  python -m diff_fastener_jax.evaluate --workdir runs/demo [--checkpoint STEP] [--out DIR] \
      [--config.data.root=/other/root ...]

The label threshold is calibrated on the held-out NORMAL validation images (never on the test set) at
`eval.fpr_target`, unless `--config.eval.threshold=X` gives one. Deterministic: every image gets the
model's fixed inference noise (from `infer.seed`), so a score depends on the model and the image alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from diff_fastener_jax import detector, report
from diff_fastener_jax import metrics as M
from diff_fastener_jax.config_utils import parse_cli_overrides
from diff_fastener_jax.data import datasets
from diff_fastener_jax.detector import PIXEL_THRESHOLD, is_anomalous, resolve_threshold
from diff_fastener_jax.inference import (
    prepare_inference,
    run_infer,
    sample_batches,
    score_in_batches,
)
from diff_fastener_jax.run_loading import load_run_config, load_run_params


def evaluate_run(config, params, out_dir: str, *, title: str = "", show_progress: bool = True,
                 calibration_samples=None, test_samples=None, stored_threshold: dict | None = None,
                 recalibrate: bool = False) -> dict:
    """Scores the test split, computes every metric, writes metrics.json and report.html to `out_dir`.

    The label threshold is `stored_threshold` (detector.json's record) unless `recalibrate` or none is
    stored: then it is calibrated on the held-out normals (`detector.resolve_threshold`).
    """
    os.makedirs(out_dir, exist_ok=True)
    size, bs = config.data.image_size, config.infer.batch_size
    infer, params, mesh = prepare_inference(config, params)
    if test_samples is None:
        test_samples = datasets.list_samples(config.data, "test", seed=config.seed)
    labels = np.array([s.label for s in test_samples], np.int32)
    defects = [s.defect for s in test_samples]
    has_masks = any(s.mask_path for s in test_samples)

    # Warm-up: compile once on a full-size batch so images/s measures steady-state inference.
    first = next(sample_batches(test_samples[:1], size, 1))
    run_infer(infer, params, first[0], mesh, pad_to=bs)

    pixel_acc = M.PixelMetricAccumulator(num_bins=config.eval.pixel_bins, aupro_limit=config.eval.aupro_limit)
    per_defect_acc: dict[str, M.PixelMetricAccumulator] = {}

    def on_batch(i0, images, recon, amap, score, masks):
        if not has_masks:
            return
        pixel_acc.update(amap, masks)
        for j in range(images.shape[0]):
            d = defects[i0 + j]
            if d != "good":
                per_defect_acc.setdefault(d, M.PixelMetricAccumulator(
                    num_bins=config.eval.pixel_bins, aupro_limit=config.eval.aupro_limit))
        # Per-defect pixel metrics: that defect's images plus every normal image.
        for d, acc in per_defect_acc.items():
            sel = [j for j in range(images.shape[0]) if defects[i0 + j] in (d, "good")]
            if sel:
                acc.update(amap[sel], masks[sel])

    scores, infer_s = score_in_batches(
        infer, params, sample_batches(test_samples, size, bs, with_masks=True), mesh=mesh,
        total=len(test_samples),
        on_batch=on_batch, show_progress=show_progress, pad_to=bs)

    threshold, threshold_source = resolve_threshold(config, params, infer, mesh, stored_threshold,
                                                    recalibrate=recalibrate, calibration_samples=calibration_samples)

    result = {"num_images": len(test_samples), "num_anomalous": int(labels.sum()),
              "images_per_second": len(test_samples) / max(infer_s, 1e-9), "has_masks": has_masks,
              "threshold_source": threshold_source}
    for part in (M.image_metrics(scores, labels), pixel_acc.compute() if has_masks else {},
                 M.label_metrics(scores, labels, threshold)):
        warnings = result.get("warnings", []) + part.pop("warnings", [])
        result.update(part)
        if warnings:
            result["warnings"] = warnings
    per_defect = {}
    for d in sorted(set(defects) - {"good"}):
        sel = np.array([x in (d, "good") for x in defects])
        entry = {"num_images": int((np.array(defects) == d).sum())}
        entry.update(M.image_metrics(scores[sel], labels[sel]))
        if d in per_defect_acc:
            entry.update(per_defect_acc[d].compute())
        entry.update({k: v for k, v in M.label_metrics(scores[sel], labels[sel], threshold).items()
                      if k in ("precision", "recall", "f1")})
        per_defect[d] = entry
    result["per_defect"] = per_defect

    # Panels: re-run the few selected images (deterministic: the model's fixed noise).
    chosen = report.select_panels(scores, labels, config.eval.num_panels)
    panels = []
    for idx, kind in chosen:
        arrays = datasets.load_arrays([test_samples[idx]], size)
        recon, amap, score = run_infer(infer, params, arrays["image"], mesh, pad_to=bs)
        panels.append({"image": arrays["image"][0], "reconstruction": recon[0],
                       "mask": arrays["mask"][0, ..., 0] if has_masks else None, "anomaly_map": amap[0],
                       "pred_mask": is_anomalous(amap[0], PIXEL_THRESHOLD), "score": float(score[0]),
                       "label": int(labels[idx]),
                       "defect": defects[idx], "path": test_samples[idx].path, "kind": kind})
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(_jsonable(result), f, indent=2)
    with open(os.path.join(out_dir, "scores.csv"), "w") as f:
        f.write("path,defect,label,score\n")
        for s, sc in zip(test_samples, scores):
            f.write(f"{s.path},{s.defect},{s.label},{sc:.6f}\n")
    report.write_report(os.path.join(out_dir, "report.html"), metrics=result, per_defect=per_defect,
                        scores=scores, labels=labels, defects=defects, panels=panels,
                        config_json=config.to_json_best_effort(indent=2), title=title or "Diff-Fastener evaluation",
                        notes=[f"Checkpoint parameters: {'EMA' if config.optim.ema_decay > 0 else 'raw'}; "
                               f"threshold: {threshold_source}."])
    return result


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def stored_threshold_for(workdir: str, step: int, config) -> dict | None:
    """detector.json's threshold record if it was calibrated for checkpoint `step` under this very config
    (no override changed it), else None (evaluate then calibrates)."""
    if not os.path.isfile(os.path.join(workdir, detector.DETECTOR_FILE)):
        return None
    record = detector.read(workdir)
    same = record.get("checkpoint_step") == step and record.get("config_digest") == detector.config_digest(config)
    return record["threshold"] if same else None


def main(argv=None) -> int:
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain and absl-based helpers read flags
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training run folder")
    p.add_argument("--checkpoint", type=int, default=None, help="step to evaluate (default: latest)")
    p.add_argument("--out", default=None, help="output folder (default: <workdir>/eval)")
    p.add_argument("--recalibrate", action="store_true",
                   help="calibrate the threshold again on the held-out normals instead of using detector.json's")
    args, rest = p.parse_known_args(argv)
    overrides = parse_cli_overrides(rest)
    config = load_run_config(args.workdir, overrides)
    params, step = load_run_params(args.workdir, config, args.checkpoint)
    out = args.out or os.path.join(args.workdir, "eval")
    stored = stored_threshold_for(args.workdir, step, config)
    result = evaluate_run(config, params, out, title=f"{os.path.basename(os.path.abspath(args.workdir))} "
                                                    f"@ step {step}",
                          stored_threshold=stored, recalibrate=args.recalibrate)
    keys = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro",
            "threshold", "precision", "recall", "images_per_second", "num_images"]
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=1))
    print(f"wrote {out}/metrics.json and {out}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
