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

import jax
import ml_collections
import numpy as np

from diff_fastener_jax import __version__
from diff_fastener_jax.config import class_names
from diff_fastener_jax.data import datasets
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.evaluation import metrics as M
from diff_fastener_jax.inference import (
    map_smoothing,
    model_image_shape,
    prepare_inference,
    sample_batches,
    score_in_batches,
    top_k_count,
)

DETECTOR_FILE = "detector.json"
FORMAT = "diff_fastener_jax.deploy.threshold"
FORMAT_VERSION = 1
# Pixel decision on the anomaly map (a segmentation probability): the same `>` rule as the image score.
PIXEL_THRESHOLD = 0.5


def is_anomalous(score, threshold: float) -> np.ndarray:
    """THE decision rule, used everywhere: an image is anomalous iff its score is strictly above the
    threshold (`metrics.calibrate_threshold` picks thresholds for exactly this rule). -> bool array."""
    return np.asarray(score) > threshold


def config_digest(config: ml_collections.ConfigDict) -> str:
    """sha256 of the config's canonical JSON (sorted keys): two runs with equal digests had equal configs."""
    canon = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def versions() -> dict:
    import flax

    return {"diff_fastener_jax": __version__, "jax": jax.__version__, "flax": flax.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def calibrate(config: ml_collections.ConfigDict, params, *, calibration_samples=None, infer=None,
              mesh=None) -> dict:
    """The threshold record for `params`: `eval.threshold` if >= 0, else the score exceeded by
    `eval.fpr_target` of the held-out NORMAL validation images (never the test set).

    Returns {"value": float | None, "source": str, "fpr_target", "num_images", "rule"}; value is None
    (with the reason as source) when there are no held-out normal images to calibrate on. A unified
    multi-category model also gets "per_category": {name: value}, each calibrated on that category's own
    held-out normals (`threshold_for` picks an image's).
    """
    record = {"rule": "score > threshold", "fpr_target": float(config.eval.fpr_target), "num_images": 0}
    if config.eval.threshold >= 0:
        return record | {"value": float(config.eval.threshold), "source": "config eval.threshold"}
    if calibration_samples is None:
        calibration_samples = datasets.list_samples(config.data, "val", seed=config.seed)
    calib = [s for s in calibration_samples if s.label == 0]
    if not calib:
        return record | {"value": None, "source": "not calibrated: no held-out normal validation images "
                                                   "(data.val_fraction is 0)"}
    if infer is None:
        infer, params, mesh = prepare_inference(config, params)
    bs = config.infer.batch_size
    scores, _ = score_in_batches(infer, params, sample_batches(calib, config.data.image_size, bs), mesh=mesh,
                                 total=len(calib), show_progress=False, pad_to=bs,
                                 class_ids=datasets.class_id_array(config, calib))
    value = float(M.calibrate_threshold(scores, config.eval.fpr_target))
    record |= {"value": value, "num_images": len(calib),
               "source": f"{config.eval.fpr_target:.1%} FPR on {len(calib)} held-out normal images"}
    if class_names(config):
        cats = np.asarray([s.category for s in calib])
        record["per_category"] = {name: float(M.calibrate_threshold(scores[cats == name], config.eval.fpr_target))
                                  for name in class_names(config) if (cats == name).any()}
    return record


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


def resolve_threshold(config, params, infer, mesh, stored: dict | None = None, *, recalibrate: bool = False,
                      calibration_samples=None) -> tuple[dict, str]:
    """(threshold record, where it came from) for evaluation: `eval.threshold` if >= 0, else the stored
    calibration unless `recalibrate` (or nothing usable is stored), else a fresh calibration. The
    record's "value" is set; "per_category" too for unified models (see `calibrate`)."""
    if config.eval.threshold < 0 and not recalibrate and stored and stored.get("value") is not None:
        return stored, f"stored in {DETECTOR_FILE}: {stored['source']}"
    record = calibrate(config, params, calibration_samples=calibration_samples, infer=infer, mesh=mesh)
    if record["value"] is None:
        raise UserError(f"cannot calibrate a threshold: {record['source']}",
                        hint="set one with --config.eval.threshold=X")
    return record, record["source"]


def detector_record(config: ml_collections.ConfigDict, threshold: dict, step: int | None,
                    selection: dict | None = None) -> dict:
    """The contents of detector.json for a model trained with `config` (see the module docstring);
    `selection`: how `step` was chosen (`selection.Selection.record`)."""
    h, w, c = model_image_shape(config)
    d = config.diffusion
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "input": {"height": h, "width": w, "channels": c, "layout": "NHWC", "dtype": "float32",
                  "value_range": [-1.0, 1.0],
                  "normalisation": "8-bit RGB u -> u * 2/255 - 1; 16-bit images are scaled to 8 bit first "
                                   "(v / 65535 * 255, rounded); grey and palette images become RGB",
                  "resize": "bilinear (PIL), to height x width"},
        "inference": {"method": config.infer.method, "anomaly_map": config.infer.map,
                      "t_small": int(d.eval_t_small), "t_big": int(d.eval_t_big), "guidance_w": float(d.guidance_w),
                      "ddim_steps": int(config.infer.ddim_steps), "noise_seed": int(config.infer.seed),
                      "noise": "fixed per model: drawn once from noise_seed for the model's image shape",
                      "map_sigma_px": list(map_smoothing(config, h, w)),
                      "top_k": top_k_count(config, h, w), "score": "mean of the top_k anomaly-map values"},
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
        raise UserError(f"{folder}: no {DETECTOR_FILE}",
                        hint="train the run to its end (training writes it) or export it with "
                             "python -m diff_fastener_jax.export")
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from e
    if record.get("format") != FORMAT or record.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path}: not a detector record this version reads "
                        f"(format {record.get('format')!r} v{record.get('format_version')})")
    return record


def stored_threshold(workdir: str, step: int, config: ml_collections.ConfigDict) -> dict | None:
    """detector.json's threshold record if it was calibrated for checkpoint `step` under this very config
    (no override changed the scoring), else None: the caller then calibrates afresh."""
    if not os.path.isfile(os.path.join(workdir, DETECTOR_FILE)):
        return None
    record = read(workdir)
    same = record.get("checkpoint_step") == step and record.get("config_digest") == config_digest(config)
    return record["threshold"] if same else None


def host_params(params):
    """Parameters as host numpy arrays, whatever devices (or hosts) hold the replicated arrays."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            x = x.addressable_data(0)
        return np.asarray(x)

    return jax.tree_util.tree_map(one, params)


def calibrate_and_save(config: ml_collections.ConfigDict, params, workdir: str, step: int,
                       selection: dict | None = None) -> dict:
    """Calibrates the threshold for the kept `params` (EMA when on) of checkpoint `step` and writes
    <workdir>/detector.json.

    Called once at the end of training; only process 0 writes. Returns the record.
    """
    record = detector_record(config, calibrate(config, host_params(params)), step, selection)
    if jax.process_index() == 0:
        write(os.path.join(workdir, DETECTOR_FILE), record)
    return record
