"""The stored detector: one decision rule, the calibrated threshold and `detector.json`.

`detector.json` holds everything needed to apply a trained model without its training data: the input
contract (size, channels, normalisation, resize), the inference settings (method, t_s/t_b/w, top-K,
noise seed), the threshold and how it was calibrated, versions, a digest of the run's config and the
config itself (to rebuild the networks). Training writes it at its end (`calibrate_and_save`), calibrated
with the final (EMA) parameters on the held-out NORMAL validation images; `evaluate` re-calibrates only
when asked; `export` copies it next to the exported programs.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys

import ml_collections
import numpy as np

from diff_fastener_jax.config import class_names
from diff_fastener_jax.config_schema import ADDED_KEY_DEFAULTS
from diff_fastener_jax.data import datasets
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.evaluation import metrics as M
from diff_fastener_jax.version import __version__

# JAX and the inference program are imported by the functions that calibrate or describe a model, so
# that reading and applying a detector record (Detector with runtime "onnx"/"openvino") needs no JAX.

DETECTOR_FILE = "detector.json"
# The record's format name, written into every detector.json and checked on reading: a file-format
# identifier, not this module's path, so it stays the same wherever the code that writes it lives.
FORMAT = "diff_fastener_jax.detector"
FORMAT_VERSION = 1
# Pixel decision on the anomaly map (a segmentation probability): the same `>` rule as the image score.
PIXEL_THRESHOLD = 0.5
# Fewer held-out normal images than this make a calibrated threshold unreliable: with n images the
# smallest false-positive rate the calibration can tell apart from 0 is 1/n.
MIN_CALIBRATION_NORMALS = 20
# How detector.json's "score" text names each fitted normal map (infer.normal_map)
NORMAL_MAP_SCORE_TEXT = {
    "subtract": ", minus the normal map",
    "standardise": ", minus the normal map's mean and divided by its scale",
}


def is_anomalous(score, threshold: float) -> np.ndarray:
    """THE decision rule, used everywhere: an image is anomalous iff its score is strictly above the
    threshold (`metrics.calibrate_threshold` picks thresholds for exactly this rule). -> bool array."""
    return np.asarray(score) > threshold


def config_digest(config: ml_collections.ConfigDict) -> str:
    """sha256 of the config's canonical JSON (sorted keys): two runs with equal digests had equal configs.
    A key of ADDED_KEY_DEFAULTS at its listed value is left out, so a run saved before the key existed
    keeps its digest."""
    tree = json.loads(config.to_json_best_effort())
    for dotted, value in ADDED_KEY_DEFAULTS.items():
        *path, leaf = dotted.split(".")
        section = tree
        for part in path:
            section = section.get(part, {})
        if leaf in section and section[leaf] == value:
            del section[leaf]
    canon = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def versions() -> dict:
    import flax
    import jax

    return {
        "diff_fastener_jax": __version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def calibrate(
    config: ml_collections.ConfigDict, params, *, calibration_samples=None, infer=None, mesh=None
) -> tuple[dict, np.ndarray | None]:
    """(threshold record, normal map) for `params`. The threshold is `eval.threshold` if >= 0, else the
    score exceeded by `eval.fpr_target` of the held-out NORMAL validation images (never the test set).
    The normal map is fitted on the same images when `infer.normal_map` is 'subtract' or 'standardise'
    (else None; `normal_map.fit`: each image is then scored against the other images' normal map).

    The record is {"value": float | None, "source": str, "fpr_target", "num_images", "rule",
    "calibration"} (+ "normal_map": how it was fitted); value is None (with the reason as source) when
    there are no held-out normal images to calibrate on. "calibration" says how far the value can be
    trusted (`calibration_facts`); below MIN_CALIBRATION_NORMALS images one `warning:` line on stderr
    says so. A unified multi-category model also gets "per_category": {name: value}, each calibrated on
    that category's own held-out normals (`threshold_for` picks an image's). `infer`, when given, is
    the program built for `config` (and `mesh` its mesh); it is rebuilt for the normal map's fit when
    the score reads another map than the program returns (`inference.reads_own_score_map`).
    """
    from diff_fastener_jax.deploy import normal_map

    record = {"rule": "score > threshold", "fpr_target": float(config.eval.fpr_target), "num_images": 0}
    fits_normal_map = normal_map.fitted(config)
    if config.eval.threshold >= 0 and not fits_normal_map:
        return record | {"value": float(config.eval.threshold), "source": "config eval.threshold"}, None
    if calibration_samples is None:
        calibration_samples = datasets.list_samples(config.data, "val", seed=config.seed)
    calib = [s for s in calibration_samples if s.label == 0]
    given = config.eval.threshold >= 0
    if not given:
        record["calibration"] = calibration_facts(len(calib))
    if not calib and not fits_normal_map:
        return record | {
            "value": None,
            "source": "not calibrated: no held-out normal validation images (data.val_fraction is 0)",
        }, None
    import jax

    from diff_fastener_jax.data.synthesis import foreground_mask  # the program's region rule (tested equal)
    from diff_fastener_jax.inference import (
        model_image_shape,
        prepare_inference,
        sample_batches,
        score_in_batches,
        scored_map_config,
        scores_otsu_foreground,
        top_k_count,
    )

    if fits_normal_map:
        normal_map.check_count(len(calib), config.infer.normal_map)
    if not given and not record["calibration"]["reliable"] and jax.process_index() == 0:
        print(
            f"warning: the threshold is calibrated on only {len(calib)} held-out normal image(s) (fewer than "
            f"{MIN_CALIBRATION_NORMALS}): the smallest false-positive rate it can resolve is 1/{len(calib)} = "
            f"{1 / len(calib):.3g} (eval.fpr_target {config.eval.fpr_target:g}); raise data.val_fraction or "
            "add normal training images",
            file=sys.stderr,
            flush=True,
        )
    h, w, _ = model_image_shape(config)
    if fits_normal_map:  # a neutral normal map: the program's scores and maps are the model's own
        params = normal_map.attach(params or {}, normal_map.neutral(config, h, w))
    # the normal map's fit needs the maps the score is read from (`scored_map_config`); the scores agree
    program_config = scored_map_config(config) if fits_normal_map else config
    if infer is None or program_config is not config:
        infer, params, mesh = prepare_inference(program_config, params)
    maps, regions = [], []
    foreground_only = scores_otsu_foreground(config)

    def keep_maps(i0, images, out):  # what the normal map's fit needs: the maps and the score regions
        maps.append(out.anomaly_map)
        if foreground_only:
            regions.append(np.stack([foreground_mask(x, "otsu") for x in images]))

    bs = config.infer.batch_size
    scores, _ = score_in_batches(
        infer,
        params,
        sample_batches(calib, config.data.image_size, bs),
        mesh=mesh,
        total=len(calib),
        on_batch=keep_maps if fits_normal_map else None,
        show_progress=False,
        pad_to=bs,
        class_ids=datasets.class_id_array(config, calib),
    )
    fitted = None
    if fits_normal_map:
        fitted, scores = normal_map.fit(
            np.concatenate(maps),
            top_k_count(config, h, w),
            np.concatenate(regions) if regions else None,
            standardise=normal_map.standardised(config),
        )
        record["normal_map"] = {
            "num_images": len(calib),
            "blur_sigma_px": normal_map.blur_sigma(h, w),
            "standardised": normal_map.standardised(config),
            "file": normal_map.NORMAL_MAP_FILE,
            "scores": "each held-out normal scored against the normal map of the others (leave-one-out)",
        }
    if given:
        return record | {"value": float(config.eval.threshold), "source": "config eval.threshold"}, fitted
    value = float(M.calibrate_threshold(scores, config.eval.fpr_target))
    record |= {
        "value": value,
        "num_images": len(calib),
        "dtype": compute_dtype_name(config),
        "source": f"{config.eval.fpr_target:.1%} FPR on {len(calib)} held-out normal images",
    }
    if class_names(config):
        cats = np.asarray([s.category for s in calib])
        record["per_category"] = {
            name: float(M.calibrate_threshold(scores[cats == name], config.eval.fpr_target))
            for name in class_names(config)
            if (cats == name).any()
        }
        record["calibration"]["per_category"] = {
            name: calibration_facts(int((cats == name).sum())) for name in record["per_category"]
        }
    return record, fitted


def compute_dtype_name(config: ml_collections.ConfigDict) -> str:
    """The dtype this process computes the model in: `model.dtype`, with 'auto' resolved for its backend."""
    from diff_fastener_jax.models import resolve_dtype_name

    return resolve_dtype_name(config.model.dtype)


def check_threshold_dtype(record: dict, config: ml_collections.ConfigDict, where: str) -> None:
    """Refuses a stored threshold calibrated on scores computed in another dtype than this process
    computes them in (bfloat16 scores on a GPU, float32 on a CPU, for model.dtype='auto'): the same
    threshold would label different scores. A record without "dtype" was calibrated in the config's own
    model.dtype; where that is 'auto' the record predates dtype tracking and the dtype it was calibrated
    in is unknown: it is accepted with one warning line, so runs and exports written by older versions
    keep loading. A given value (eval.threshold, no calibration) is not checked."""
    if record.get("value") is None or not record.get("num_images"):
        return
    calibrated = record.get("dtype") or str(config.model.dtype)
    current = compute_dtype_name(config)
    if calibrated == "auto":
        print(
            f"warning: {where}: the threshold record does not say which dtype its scores were computed in "
            f"(written by an older version); assuming {current}, this machine's",
            file=sys.stderr,
            flush=True,
        )
        return
    if calibrated != current:
        raise UserError(
            f"{where}: the threshold was calibrated on scores computed in {calibrated}, but this "
            f"machine computes them in {current} (model.dtype={config.model.dtype!r})",
            hint="recalibrate on this machine (evaluate --recalibrate), give the threshold "
            f"yourself (predict/serve --threshold X), or run where the model computes in {calibrated}",
        )


def calibration_facts(num_normals: int) -> dict:
    """How much a threshold calibrated on `num_normals` held-out normal images can resolve:
    {"num_normals", "min_resolvable_fpr": 1/n (None for n = 0), "reliable": n >= MIN_CALIBRATION_NORMALS}."""
    n = int(num_normals)
    return {"num_normals": n, "min_resolvable_fpr": 1.0 / n if n else None, "reliable": n >= MIN_CALIBRATION_NORMALS}


def category_threshold(record: dict, category: str, default: float | None = None) -> float:
    """`category`'s own calibrated threshold (unified models), else `default` (the record's value)."""
    fallback = record["value"] if default is None else default
    return float((record.get("per_category") or {}).get(category, fallback))


def threshold_for(record: dict, categories, default: float | None = None) -> np.ndarray | float:
    """The threshold of each image: its category's own (unified models) where one was calibrated, else
    `default` (the record's single value). `categories`: a name per image (None for one-category models)."""
    if categories is None or not record.get("per_category"):
        return float(record["value"] if default is None else default)
    return np.asarray([category_threshold(record, c, default) for c in categories], np.float64)


def resolve_threshold(
    config, params, infer, mesh, stored: dict | None = None, *, recalibrate: bool = False, calibration_samples=None
) -> tuple[dict, str, np.ndarray | None]:
    """(threshold record, where it came from, normal map) for evaluation: `eval.threshold` if >= 0, else
    the stored calibration unless `recalibrate` (or nothing usable is stored), else a fresh calibration.
    The record's "value" is set; "per_category" too for unified models (see `calibrate`). The normal map
    is the freshly fitted one when this calibrated with a fitted `infer.normal_map`, else None (the
    params keep the one they carry); params without one are always calibrated afresh."""
    from diff_fastener_jax.deploy import normal_map

    usable = stored and stored.get("value") is not None and not normal_map.missing(config, params)
    if config.eval.threshold < 0 and not recalibrate and usable:
        check_threshold_dtype(stored, config, f"the threshold stored in {DETECTOR_FILE}")
        return stored, f"stored in {DETECTOR_FILE}: {stored['source']}", None
    record, fitted = calibrate(config, params, calibration_samples=calibration_samples, infer=infer, mesh=mesh)
    if record["value"] is None:
        raise UserError(
            f"cannot calibrate a threshold: {record['source']}", hint="set one with --config.eval.threshold=X"
        )
    return record, record["source"], fitted


def detector_record(
    config: ml_collections.ConfigDict, threshold: dict, step: int | None, selection: dict | None = None
) -> dict:
    """The contents of detector.json for a model trained with `config` (see the module docstring);
    `selection`: how `step` was chosen (`selection.Selection.record`)."""
    from diff_fastener_jax.inference import (
        map_smoothing,
        model_image_shape,
        score_chroma_weight,
        score_smoothing,
        scores_otsu_foreground,
        tiling_record,
        top_k_count,
        weighs_own_score_error,
    )

    h, w, c = model_image_shape(config)
    d = config.diffusion
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "input": {
            "height": h,
            "width": w,
            "channels": c,
            "layout": "NHWC",
            "dtype": "float32",
            "value_range": [-1.0, 1.0],
            "normalisation": "8-bit RGB u -> u * 2/255 - 1; 16-bit images are scaled to 8 bit first "
            "(v / 65535 * 255, rounded); grey and palette images become RGB",
            "resize": "bilinear (PIL), to height x width",
        },
        "inference": {
            "method": config.infer.method,
            "anomaly_map": config.infer.map,
            "map_region": config.infer.map_region,
            "chroma_weight": float(config.infer.chroma_weight),
            "score_chroma_weight": score_chroma_weight(config),
            "dtype": compute_dtype_name(config),
            "t_small": int(d.eval_t_small),
            "t_big": int(d.eval_t_big),
            "guidance_w": float(d.guidance_w),
            "ddim_steps": int(config.infer.ddim_steps),
            "noise_seed": int(config.infer.seed),
            "noise": "fixed per model: drawn once from noise_seed for the network's input shape",
            **tiling_record(config),
            "map_sigma_px": list(map_smoothing(config, h, w)),
            "score_sigma_px": list(score_smoothing(config, h, w)),
            "top_k": top_k_count(config, h, w),
            "score": "mean of the top_k values of the anomaly map smoothed by score_sigma_px"
            + (", its error weighted by score_chroma_weight" if weighs_own_score_error(config) else "")
            + NORMAL_MAP_SCORE_TEXT.get(config.infer.normal_map, "")
            + (", inside the image's Otsu foreground" if scores_otsu_foreground(config) else ""),
            "score_region": config.infer.score_region,
        },
        "threshold": threshold,
        "pixel_threshold": PIXEL_THRESHOLD,
        "params": "ema" if config.optim.ema_decay > 0 else "raw",
        "checkpoint_step": step,
        **({"selection": selection} if selection else {}),
        "versions": versions(),
        "config_digest": config_digest(config),
        "config": json.loads(config.to_json_best_effort()),
    }


def write(path: str, record: dict) -> None:
    """Writes a detector record atomically (a crash never leaves half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, path)


def read(folder: str) -> dict:
    """The detector record in `folder`; UserError when it is missing or not one."""
    path = os.path.join(folder, DETECTOR_FILE)
    if not os.path.isfile(path):
        raise UserError(
            f"{folder}: no {DETECTOR_FILE}",
            hint="train the run to its end (training writes it) or export it with python -m diff_fastener_jax.export",
        )
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from e
    if record.get("format") != FORMAT or record.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(
            f"{path}: not a detector record this version reads "
            f"(format {record.get('format')!r} v{record.get('format_version')})"
        )
    return record


def stored_threshold(workdir: str, step: int, config: ml_collections.ConfigDict) -> dict | None:
    """detector.json's threshold record if it was calibrated for checkpoint `step` under this very config
    (no override changed the scoring), else None: the caller then calibrates afresh."""
    if not os.path.isfile(os.path.join(workdir, DETECTOR_FILE)):
        return None
    record = read(workdir)
    same = record.get("checkpoint_step") == step and record.get("config_digest") == config_digest(config)
    return record["threshold"] if same else None


def stored_normal_map(workdir: str, step: int, config: ml_collections.ConfigDict) -> np.ndarray | None:
    """The run's normal map (normal_map.npy) when `infer.normal_map` fits one and it was fitted with
    the stored threshold of checkpoint `step` under this very config (`stored_threshold`), else None."""
    from diff_fastener_jax.deploy import normal_map
    from diff_fastener_jax.inference import model_image_shape

    if not normal_map.fitted(config):
        return None
    stored = stored_threshold(workdir, step, config)
    if not stored or "normal_map" not in stored:
        return None
    return normal_map.load(workdir, normal_map.array_shape(config, *model_image_shape(config)[:2]))


def host_params(params):
    """Parameters as host numpy arrays, whatever devices (or hosts) hold the replicated arrays."""
    import jax

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(x)

    return jax.tree_util.tree_map(one, params)


def calibrate_and_save(
    config: ml_collections.ConfigDict, params, workdir: str, step: int, selection: dict | None = None
) -> dict:
    """Calibrates the threshold for the kept `params` (EMA when on) of checkpoint `step` and writes
    <workdir>/detector.json (and normal_map.npy where `infer.normal_map` fits one).

    Called once at the end of training; only process 0 writes. Returns the record.
    """
    import jax

    from diff_fastener_jax.deploy import normal_map

    calibration, fitted = calibrate(config, host_params(params))
    record = detector_record(config, calibration, step, selection)
    if jax.process_index() == 0:
        if fitted is not None:  # first: detector.json names it
            normal_map.save(workdir, fitted)
        write(os.path.join(workdir, DETECTOR_FILE), record)
    return record
