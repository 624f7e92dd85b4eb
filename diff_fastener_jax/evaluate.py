r"""Evaluate a trained run on its test split and write metrics.json + a self-contained report.html.

  python -m diff_fastener_jax.evaluate --workdir runs/demo [--checkpoint STEP] [--out DIR] \
      [--config.data.root=/other/root ...]

The label threshold is calibrated on the held-out NORMAL validation images (never on the test set) at
`eval.fpr_target`, unless `--config.eval.threshold=X` gives one. Deterministic: the inference noise of
each image is seeded by `infer.seed` and the image's position in the split.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

from diff_fastener_jax import metrics as M
from diff_fastener_jax import report
from diff_fastener_jax.config_utils import parse_cli_overrides
from diff_fastener_jax.data import datasets
from diff_fastener_jax.inference import prepare_inference, run_infer, score_in_batches
from diff_fastener_jax.run_loading import load_run_config, load_run_params


def sample_batches(samples, size: int, batch_size: int, with_masks: bool = False):
    """Yields (images (b, H, W, 3) in [-1, 1], indices (b,)) [+ masks (b, H, W)] per chunk of samples."""
    for i0 in range(0, len(samples), batch_size):
        chunk = samples[i0:i0 + batch_size]
        arrays = datasets.load_arrays(chunk, size)
        idx = np.arange(i0, i0 + len(chunk))
        if with_masks:
            yield arrays["image"], idx, arrays["mask"][..., 0]
        else:
            yield arrays["image"], idx


def calibrated_threshold(config, params, infer, key, mesh, calibration_samples=None) -> tuple[float, str]:
    """(image-score threshold, where it came from): `eval.threshold` if >= 0, else the score exceeded by
    `eval.fpr_target` of the held-out NORMAL validation images (never the test set)."""
    if config.eval.threshold >= 0:
        return float(config.eval.threshold), "config eval.threshold"
    if calibration_samples is None:
        calibration_samples = datasets.list_samples(config.data, "val", seed=config.seed)
    calib = [s for s in calibration_samples if s.label == 0]
    if not calib:
        raise ValueError("no held-out normal validation images to calibrate the threshold on "
                         "(data.val_fraction is 0): set --config.eval.threshold=X")
    bs = config.infer.batch_size
    # Validation images get their own noise stream (fold_in 1) so indices never collide with test ones.
    calib_scores, _ = score_in_batches(
        infer, params, sample_batches(calib, config.data.image_size, bs), jax.random.fold_in(key, 1),
        mesh=mesh, total=len(calib), show_progress=False, pad_to=bs)
    threshold = float(M.calibrate_threshold(calib_scores, config.eval.fpr_target))
    return threshold, f"{config.eval.fpr_target:.1%} FPR on {len(calib)} held-out normal images"


def evaluate_run(config, params, out_dir: str, *, title: str = "", show_progress: bool = True,
                 calibration_samples=None, test_samples=None) -> dict:
    """Scores the test split, computes every metric, writes metrics.json and report.html to `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    size, bs = config.data.image_size, config.infer.batch_size
    infer, params, key, mesh = prepare_inference(config, params)
    if test_samples is None:
        test_samples = datasets.list_samples(config.data, "test", seed=config.seed)
    labels = np.array([s.label for s in test_samples], np.int32)
    defects = [s.defect for s in test_samples]
    has_masks = any(s.mask_path for s in test_samples)

    # Warm-up: compile once on a full-size batch so images/s measures steady-state inference.
    first = next(sample_batches(test_samples[:1], size, 1))
    run_infer(infer, params, first[0], first[1], key, mesh, pad_to=bs)

    evaluation = M.StreamingEvaluation(with_pixels=has_masks, aupro_limit=config.eval.aupro_limit)

    def on_batch(i0, images, recon, amap, score, masks):
        n = images.shape[0]
        evaluation.update(score, labels[i0:i0 + n], defects[i0:i0 + n], amap if has_masks else None,
                          masks if has_masks else None)

    scores, infer_s = score_in_batches(
        infer, params, sample_batches(test_samples, size, bs, with_masks=True), key, mesh=mesh,
        total=len(test_samples),
        on_batch=on_batch, show_progress=show_progress, pad_to=bs)

    threshold, threshold_source = calibrated_threshold(config, params, infer, key, mesh, calibration_samples)

    result = {"num_images": len(test_samples), "num_anomalous": int(labels.sum()),
              "images_per_second": len(test_samples) / max(infer_s, 1e-9), "has_masks": has_masks,
              "threshold_source": threshold_source}
    result.update(evaluation.compute(threshold))
    per_defect = result["per_defect"]

    # Panels: re-run the few selected images (deterministic: same indices, same noise).
    chosen = report.select_panels(scores, labels, config.eval.num_panels)
    panels = []
    for idx, kind in chosen:
        arrays = datasets.load_arrays([test_samples[idx]], size)
        recon, amap, score = run_infer(infer, params, arrays["image"], np.array([idx]), key, mesh, pad_to=bs)
        panels.append({"image": arrays["image"][0], "reconstruction": recon[0],
                       "mask": arrays["mask"][0, ..., 0] if has_masks else None, "anomaly_map": amap[0],
                       "pred_mask": amap[0] >= 0.5, "score": float(score[0]), "label": int(labels[idx]),
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


def main(argv=None) -> int:
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain and absl-based helpers read flags
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training run folder")
    p.add_argument("--checkpoint", type=int, default=None, help="step to evaluate (default: latest)")
    p.add_argument("--out", default=None, help="output folder (default: <workdir>/eval)")
    args, rest = p.parse_known_args(argv)
    overrides = parse_cli_overrides(rest)
    config = load_run_config(args.workdir, overrides)
    params, step = load_run_params(args.workdir, config, args.checkpoint)
    out = args.out or os.path.join(args.workdir, "eval")
    result = evaluate_run(config, params, out, title=f"{os.path.basename(os.path.abspath(args.workdir))} "
                                                    f"@ step {step}")
    keys = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_aupro",
            "threshold", "precision", "recall", "images_per_second", "num_images"]
    print(json.dumps({k: result[k] for k in keys if k in result}, indent=1))
    print(f"wrote {out}/metrics.json and {out}/report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
