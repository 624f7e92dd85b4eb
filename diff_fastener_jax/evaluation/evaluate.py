"""Evaluation of a trained run: scores on the test split, metrics.json, scores.csv and report.html."""

from __future__ import annotations

import os
import sys

import numpy as np

from diff_fastener_jax.config import class_names, validate_config
from diff_fastener_jax.data import datasets
from diff_fastener_jax.deploy import normal_map, threshold
from diff_fastener_jax.deploy.threshold import PIXEL_THRESHOLD, is_anomalous, resolve_threshold
from diff_fastener_jax.evaluation import metrics as M
from diff_fastener_jax.evaluation import outputs, reference, report
from diff_fastener_jax.inference import (
    map_smoothing,
    maps_otsu_foreground,
    model_image_shape,
    place_params,
    prepare_inference,
    run_infer,
    sample_batches,
    score_in_batches,
    score_smoothing,
    smoothing_matrix,
    smooths_own_score_map,
    top_k_count,
)
from diff_fastener_jax.training.run_loading import load_run_config, load_run_params


def make_reference(config, train_samples, with_pixels: bool) -> reference.ReferenceDetectors | None:
    """The `eval.reference` detectors fitted on `train_samples` (training normals only) at the evaluation
    resolution, with the model's top-K and the model's smoothing of the map and of the score; None when
    `eval.reference` is 'none'."""
    which = reference.selected(config.eval.reference)
    if not which:
        return None
    h, w, _ = model_image_shape(config)

    def matrices(sigma_h, sigma_w):  # sigma 0: the identity
        return smoothing_matrix(h, sigma_h), smoothing_matrix(w, sigma_w)

    map_sigmas = map_smoothing(config, h, w)
    ref = reference.ReferenceDetectors(
        which,
        top_k=top_k_count(config, h, w),
        smooth=matrices(*map_sigmas) if map_sigmas[0] > 0 else None,
        score_smooth=matrices(*score_smoothing(config, h, w)) if smooths_own_score_map(config) else None,
        with_pixels=with_pixels,
        aupro_limit=config.eval.aupro_limit,
    )
    ref.fit(images for (images,) in sample_batches(train_samples, config.data.image_size, config.infer.batch_size))
    return ref


def evaluate_run(
    config,
    params,
    out_dir: str,
    *,
    title: str = "",
    show_progress: bool = True,
    calibration_samples=None,
    test_samples=None,
    stored_threshold: dict | None = None,
    recalibrate: bool = False,
    train_samples=None,
) -> dict:
    """Scores the test split, computes every metric, writes metrics.json and report.html to `out_dir`.

    The label threshold is `stored_threshold` (detector.json's record) unless `recalibrate` or none is
    stored: then it is calibrated on the held-out normals (`threshold.resolve_threshold`). The
    reference detectors (`eval.reference`) are fitted on `train_samples` (default: the run's training
    normals) and reported under "reference".
    """
    os.makedirs(out_dir, exist_ok=True)
    size, bs = config.data.image_size, config.infer.batch_size
    infer, params, mesh = prepare_inference(config, params)
    if test_samples is None or train_samples is None or calibration_samples is None:
        splits = datasets.list_splits(config.data, config.seed)  # one pass over the layout for every split
        test_samples = splits["test"] if test_samples is None else test_samples
        train_samples = splits["train"] if train_samples is None else train_samples
        calibration_samples = splits["val"] if calibration_samples is None else calibration_samples
    labels = np.array([s.label for s in test_samples], np.int32)
    defects = [s.defect for s in test_samples]
    categories = [s.category for s in test_samples]
    has_masks = any(s.mask_path for s in test_samples)
    class_ids = datasets.class_id_array(config, test_samples)  # None unless a unified model
    unified = class_ids is not None
    ref = make_reference(config, train_samples, has_masks) if train_samples else None
    # Named before scoring, so that the user sees at once that some test images count twice or were seen.
    copies = [
        [outputs.relative_path(p, config.data.root) for p in g]
        for g in identical_test_images(test_samples, train_samples, calibration_samples)
    ]
    if copies:
        print(f"warning: {identical_images_warning(copies)}", file=sys.stderr)

    # The threshold (and, where infer.normal_map fits one, the normal map the test scores need) first.
    record, threshold_source, fitted = resolve_threshold(
        config, params, infer, mesh, stored_threshold, recalibrate=recalibrate, calibration_samples=calibration_samples
    )
    if fitted is not None:
        params = place_params(normal_map.attach(params, fitted), mesh)
    thresholds = threshold.threshold_for(record, categories if unified else None)  # one, or one per image

    # Warm-up: compile once on a full-size batch so images/s measures steady-state inference.
    first = next(sample_batches(test_samples[:1], size, 1))
    run_infer(infer, params, first[0], mesh, pad_to=bs, class_ids=None if class_ids is None else class_ids[:1])

    def new_evaluation():
        return M.StreamingEvaluation(with_pixels=has_masks, aupro_limit=config.eval.aupro_limit)

    evaluation = new_evaluation()
    by_category = {c: new_evaluation() for c in (class_names(config) if unified else [])}
    steps = np.zeros(len(test_samples), np.int32)  # the denoising step each image started from

    def on_batch(i0, images, out, masks):
        n = images.shape[0]
        steps[i0 : i0 + n] = out.denoise_step
        rows = slice(i0, i0 + n)
        batch_categories = np.asarray(categories[rows])
        evaluation.update(
            out.score, labels[rows], defects[rows], out.anomaly_map if has_masks else None, masks if has_masks else None
        )
        if ref is not None:
            ref.update(images, labels[rows], defects[rows], masks if has_masks else None)
        for c, ev in by_category.items():
            sel = np.flatnonzero(batch_categories == c)
            if sel.size:
                ev.update(
                    out.score[sel],
                    labels[rows][sel],
                    [defects[i0 + j] for j in sel],
                    out.anomaly_map[sel] if has_masks else None,
                    masks[sel] if has_masks else None,
                )

    scores, infer_s = score_in_batches(
        infer,
        params,
        sample_batches(test_samples, size, bs, with_masks=True),
        mesh=mesh,
        total=len(test_samples),
        on_batch=on_batch,
        show_progress=show_progress,
        pad_to=bs,
        class_ids=class_ids,
    )

    result = {
        "num_images": len(test_samples),
        "num_anomalous": int(labels.sum()),
        "images_per_second": len(test_samples) / max(infer_s, 1e-9),
        "has_masks": has_masks,
        "threshold_source": threshold_source,
    }
    result.update(evaluation.compute(thresholds))
    result["threshold"] = float(record["value"])
    if copies:
        result["identical_test_images"] = copies
        result.setdefault("warnings", []).append(identical_images_warning(copies))
    if unified:
        # Every category on its own (its images, its threshold), then their unweighted mean.
        result["threshold_per_category"] = dict(record.get("per_category", {}))
        result["per_category"] = {
            c: ev.compute(threshold.category_threshold(record, c)) for c, ev in by_category.items() if ev.num_images
        }
        keys = ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro", "precision", "recall", "f1")
        result["per_category_mean"] = {
            k: float(np.mean([m[k] for m in result["per_category"].values()]))
            for k in keys
            if all(m.get(k) is not None for m in result["per_category"].values())
        }
    per_defect = result["per_defect"]
    notes = [f"Checkpoint parameters: {'EMA' if config.optim.ema_decay > 0 else 'raw'}; threshold: {threshold_source}."]
    if normal_map.fitted(config):
        fit = record.get("normal_map") or {}
        result["normal_map"] = fit
        spread = ", divided by their spread" if normal_map.standardised(config) else ""
        notes.append(
            f"Image scores: the map minus the normal map, the mean map of {fit.get('num_images', '?')} held-out "
            f"normal images{spread} (infer.normal_map={config.infer.normal_map!r}); the maps shown are the "
            "model's own."
        )
    if maps_otsu_foreground(config):
        notes.append(
            "Maps: zero outside each image's Otsu foreground, where training draws its anomalies "
            "(infer.map_region='foreground'); the pixel metrics read them so, the image scores do not."
        )
    if ref is not None:
        result["reference"] = ref.compute()
        notes += reference.beaten_note(result, result["reference"])
    if config.infer.method == "adaptive":
        names = np.asarray(defects)
        result["denoise_step_mean"] = {d: float(steps[names == d].mean()) for d in sorted(set(defects))}
        notes.append(
            "Adaptive denoising (GLAD): mean start step per defect type: "
            + ", ".join(f"{d} {v:.0f}" for d, v in result["denoise_step_mean"].items())
            + "; each image's step is in scores.csv."
        )

    # Panels: re-run the few selected images (deterministic: the model's fixed noise).
    chosen = report.select_panels(scores, labels, config.eval.num_panels)
    panels = []
    for j0 in range(0, len(chosen), bs):  # the panels' images in full batches: one compiled shape
        part = chosen[j0 : j0 + bs]
        idx = [i for i, _ in part]
        arrays = datasets.load_arrays([test_samples[i] for i in idx], size)
        out = run_infer(
            infer, params, arrays["image"], mesh, pad_to=bs, class_ids=None if class_ids is None else class_ids[idx]
        )
        for r, (i, kind) in enumerate(part):
            panels.append(
                {
                    "image": arrays["image"][r],
                    "reconstruction": out.recon[r],
                    "denoise_step": int(out.denoise_step[r]),
                    "mask": arrays["mask"][r, ..., 0] if has_masks else None,
                    "anomaly_map": out.anomaly_map[r],
                    "pred_mask": is_anomalous(out.anomaly_map[r], PIXEL_THRESHOLD),
                    "score": float(out.score[r]),
                    "label": int(labels[i]),
                    "defect": defects[i],
                    "path": test_samples[i].path,
                    "kind": kind,
                }
            )
    outputs.write_json(os.path.join(out_dir, "metrics.json"), result)
    per_image = np.broadcast_to(np.asarray(thresholds, np.float64), scores.shape)
    with outputs.ScoresWriter(os.path.join(out_dir, "scores.csv")) as rows:
        for s, sc, th, st in zip(test_samples, scores, per_image, steps):
            rows.row(
                outputs.relative_path(s.path, config.data.root),
                s.category,
                s.defect,
                s.label,
                is_anomalous(sc, th),
                sc,
                th,
                st,
            )
    report.write_report(
        os.path.join(out_dir, "report.html"),
        metrics=result,
        per_defect=per_defect,
        scores=scores,
        labels=labels,
        defects=defects,
        panels=panels,
        config_json=config.to_json_best_effort(indent=2),
        title=title or "Diff-Fastener evaluation",
        notes=notes,
    )
    return result


def identical_test_images(test_samples, train_samples, calibration_samples) -> list[list[str]]:
    """Groups of byte-identical files that hold a test image (`datasets.identical_images` over the test
    split, the training normals and the held-out normals)."""
    tested = {s.path for s in test_samples}
    everything = [*test_samples, *train_samples, *calibration_samples]
    return [g for g in datasets.identical_images(everything) if tested.intersection(g)]


def identical_images_warning(groups: list[list[str]]) -> str:
    """One line naming the groups of byte-identical files that hold a test image."""
    shown = "; ".join(" = ".join(g) for g in groups[:3]) + ("; ..." if len(groups) > 3 else "")
    return (
        f"{len(groups)} group(s) of byte-identical files hold test images ({sum(map(len, groups))} files): {shown} "
        "(each test copy counts in every metric; a copy of a training or held-out normal was seen before)"
    )


def evaluate_workdir(
    workdir: str,
    out: str | None = None,
    checkpoint: int | None = None,
    config=None,
    show_progress: bool = True,
    title: str = "",
    recalibrate: bool = False,
) -> dict:
    """Evaluates checkpoint `checkpoint` (default latest) of the run in `workdir` into `out`
    (default <workdir>/eval). Checks the run, the data and every test/validation image before compiling.
    The label threshold is the one stored in detector.json for that checkpoint unless `recalibrate`."""
    if config is None:
        config = load_run_config(workdir)
        validate_config(config)
    splits = datasets.list_splits(config.data, seed=config.seed)
    datasets.verify_images(splits["test"] + splits["val"])
    params, step = load_run_params(workdir, config, checkpoint)
    out = out or os.path.join(workdir, "eval")
    title = title or f"{os.path.basename(os.path.abspath(workdir))} @ step {step}"
    return evaluate_run(
        config,
        params,
        out,
        title=title,
        show_progress=show_progress,
        calibration_samples=splits["val"],
        test_samples=splits["test"],
        stored_threshold=threshold.stored_threshold(workdir, step, config),
        recalibrate=recalibrate,
    )
