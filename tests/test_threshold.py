"""The calibrated threshold says how far it can be trusted: how many held-out normals it used and the
smallest false-positive rate that many can resolve (a stand-in scorer: nothing is compiled)."""

import json

import numpy as np
import pytest
from helpers import tiny_config
from PIL import Image

from diff_fastener_jax.data.datasets import Sample
from diff_fastener_jax.deploy import threshold as D


def normals(tmp_path, n: int) -> list[Sample]:
    """n tiny normal images of increasing brightness (the stand-in scorer's score) and one anomaly."""
    samples = []
    for i in range(n + 1):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(path)
        samples.append(Sample(str(path), label=int(i == n), defect="good" if i < n else "crack"))
    return samples


def brightness_infer(params, images):
    """InferOutputs-shaped stand-in: the map is the image's brightness in [0, 1]."""
    amap = (np.asarray(images).mean(axis=-1) + 1.0) / 2.0  # (N, H, W)
    return images, amap, amap.mean(axis=(1, 2)), np.zeros(images.shape[0], np.int32)


@pytest.mark.parametrize("n, reliable", [(2, False), (25, True)])
def test_calibration_records_its_count_and_warns_below_the_minimum(tmp_path, capsys, n, reliable):
    config = tiny_config(**{"data.image_size": 8})
    record, _ = D.calibrate(config, None, calibration_samples=normals(tmp_path, n), infer=brightness_infer)
    assert record["num_images"] == n and record["value"] is not None
    assert record["calibration"] == {
        "num_normals": n,
        "min_resolvable_fpr": pytest.approx(1.0 / n),
        "reliable": reliable,
    }
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    if reliable:
        assert warnings == []
    else:
        assert len(warnings) == 1 and f"only {n} held-out normal" in warnings[0] and "1/2 = 0.5" in warnings[0]
        assert "data.val_fraction" in warnings[0]
    # detector.json carries it (strict JSON).
    written = tmp_path / "detector.json"
    D.write(str(written), D.detector_record(config, record, 6))
    assert json.load(open(written))["threshold"]["calibration"]["num_normals"] == n


def test_no_normals_is_recorded_as_unreliable(tmp_path):
    config = tiny_config(**{"data.image_size": 8})
    record, _ = D.calibrate(config, None, calibration_samples=normals(tmp_path, 0), infer=brightness_infer)
    assert record["value"] is None
    assert record["calibration"] == {"num_normals": 0, "min_resolvable_fpr": None, "reliable": False}


def test_a_threshold_is_refused_under_another_compute_dtype(tmp_path, capsys):
    """Scores computed in bfloat16 (a GPU's 'auto') and in float32 (a CPU's) differ: a threshold
    calibrated on one is refused for the other, in evaluate, export and the Detector alike."""
    from diff_fastener_jax.deploy.detector import Detector
    from diff_fastener_jax.errors import UserError

    config = tiny_config(**{"data.image_size": 8, "model.dtype": "float32"})
    record, _ = D.calibrate(config, None, calibration_samples=normals(tmp_path, 2), infer=brightness_infer)
    assert record["dtype"] == "float32"
    D.check_threshold_dtype(record, config, "here")  # the same dtype: accepted
    gpu = record | {"dtype": "bfloat16"}
    with pytest.raises(UserError, match="calibrated on scores computed in bfloat16.*computes them in float32"):
        D.check_threshold_dtype(gpu, config, "here")
    with pytest.raises(UserError, match="bfloat16"):
        D.resolve_threshold(config, None, None, None, gpu)
    with pytest.raises(UserError, match="bfloat16"):
        Detector(config, None, D.detector_record(config, gpu, 6))
    # A record written by an older version (config 'auto', no resolved dtype): accepted, with a warning.
    legacy = {k: v for k, v in record.items() if k != "dtype"}
    D.check_threshold_dtype(legacy, tiny_config(**{"model.dtype": "auto"}), "here")
    assert "does not say which dtype" in capsys.readouterr().err
    # A threshold given by the user is not a calibration: never refused.
    D.check_threshold_dtype({"value": 0.3, "num_images": 0}, config, "here")


def test_training_resolves_auto_dtype_before_anything_is_saved():
    from diff_fastener_jax.models import resolve_dtype_name
    from diff_fastener_jax.training.loop import resolve_auto_dtype

    resolved = resolve_auto_dtype(tiny_config(**{"model.dtype": "auto"}))
    assert resolved.model.dtype == resolve_dtype_name("auto") != "auto"
    assert resolve_auto_dtype(tiny_config(**{"model.dtype": "bfloat16"})).model.dtype == "bfloat16"


def test_the_smoke_run_records_its_concrete_dtype(smoke_run):
    saved = json.load(open(f"{smoke_run}/config.json"))["model"]["dtype"]
    record = json.load(open(f"{smoke_run}/detector.json"))
    assert saved in ("float32", "bfloat16")
    assert record["inference"]["dtype"] == record["threshold"]["dtype"] == saved
    assert record["threshold"]["calibration"]["num_normals"] == record["threshold"]["num_images"]


def test_a_key_added_at_its_old_behaviour_keeps_a_saved_runs_digest():
    """A run saved before a key of ADDED_KEY_DEFAULTS existed loads with the key at its listed value; its
    digest (and so its stored threshold and normal map) is unchanged, while another value changes it."""
    import ml_collections

    from diff_fastener_jax.config_schema import ADDED_KEY_DEFAULTS, SCORE_AS_MAP

    assert ADDED_KEY_DEFAULTS == {
        "infer.score_sigma": SCORE_AS_MAP,
        "infer.chroma_weight": 0.0,
        "infer.score_chroma_weight": SCORE_AS_MAP,
        "infer.map_region": "image",
    }
    other_values = {
        "infer.score_sigma": 4.0,
        "infer.chroma_weight": 2.0,
        "infer.score_chroma_weight": 2.0,
        "infer.map_region": "foreground",
    }
    config = tiny_config()
    saved_before = config.to_dict()
    for dotted, value in ADDED_KEY_DEFAULTS.items():
        del saved_before["infer"][dotted.split(".")[1]]
        assert config.infer[dotted.split(".")[1]] == value  # the base config's default is the old behaviour
    assert D.config_digest(config) == D.config_digest(ml_collections.ConfigDict(saved_before))
    for dotted, value in other_values.items():
        changed = ml_collections.ConfigDict(config.to_dict())
        changed.infer[dotted.split(".")[1]] = value
        assert D.config_digest(changed) != D.config_digest(ml_collections.ConfigDict(saved_before)), dotted
    config.infer.map_sigma = 3.0  # any other change still changes the digest
    assert D.config_digest(config) != D.config_digest(ml_collections.ConfigDict(saved_before))
