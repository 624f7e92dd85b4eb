"""detector.json, the stored threshold, the one decision rule, and the Detector API."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from ship_support import smoke_test_images

from diff_fastener_jax import Detector
from diff_fastener_jax.data import datasets, image_io
from diff_fastener_jax.deploy import threshold
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.evaluation import metrics as M
from diff_fastener_jax.inference import make_infer_fn
from diff_fastener_jax.training.run_loading import load_run_config, load_run_params


@pytest.fixture(scope="module")
def run(smoke_run):
    return smoke_run


@pytest.fixture(scope="module")
def det(run):
    return Detector.load(run)


def test_decision_rule_is_strict():
    np.testing.assert_array_equal(threshold.is_anomalous([0.2, 0.5, 0.50001], 0.5), [False, False, True])


def test_detector_json_holds_the_contract_and_a_calibrated_threshold(run):
    with open(os.path.join(run, "detector.json")) as f:
        rec = json.load(f)
    config = load_run_config(run)
    assert rec["input"]["height"] == rec["input"]["width"] == 32 and rec["input"]["channels"] == 3
    assert rec["input"]["value_range"] == [-1.0, 1.0] and "bilinear" in rec["input"]["resize"]
    inf = rec["inference"]
    assert (inf["method"], inf["t_small"], inf["t_big"], inf["noise_seed"]) == ("norm_guided", 200, 400, 0)
    assert inf["top_k"] == max(1, round(50 * 32 * 32 / 65536))
    assert rec["checkpoint_step"] == config.train.num_steps
    assert rec["config_digest"] == threshold.config_digest(config) and len(rec["config_digest"]) == 64
    assert rec["versions"]["jax"] and rec["threshold"]["rule"] == "score > threshold"
    # Reference: score the held-out normals with the final (EMA or raw) params; the threshold is the
    # calibration of exactly those scores.
    params, _ = load_run_params(run, config)
    val = [s for s in datasets.list_samples(config.data, "val", seed=config.seed) if s.label == 0]
    assert rec["threshold"]["num_images"] == len(val) > 0
    scores = np.asarray(make_infer_fn(config)(params, datasets.load_arrays(val, 32)["image"])[2])
    assert rec["threshold"]["value"] == pytest.approx(M.calibrate_threshold(scores, config.eval.fpr_target), rel=1e-6)


def test_detector_predict_matches_the_evaluation_path(run, det):
    config = load_run_config(run)
    params, _ = load_run_params(run, config)
    paths = smoke_test_images(run, 5)
    ref_maps, ref_scores = (
        np.asarray(o)
        for o in make_infer_fn(config)(
            params, datasets.load_arrays([datasets.Sample(p, 0, "good") for p in paths], 32)["image"]
        )[1:3]
    )
    out = det.predict(paths)
    np.testing.assert_allclose(out.scores, ref_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.labels, ref_scores > det.threshold)
    # The demo images are stored at the model size: maps come back unchanged.
    np.testing.assert_allclose(out.anomaly_maps[0], ref_maps[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.masks[0], out.anomaly_maps[0] > 0.5)
    # One image alone scores as it did in the batch (fixed per-model noise).
    assert det.predict(paths[3]).scores[0] == pytest.approx(out.scores[3], rel=1e-5, abs=1e-6)


def test_maps_come_back_at_each_inputs_size(det, tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (20, 33), dtype=np.uint8)
    out = det.predict([a, b])
    assert out.anomaly_maps[0].shape == out.masks[0].shape == (50, 70)
    assert out.anomaly_maps[1].shape == (20, 33) and out.masks[1].dtype == bool
    assert out.scores.shape == (2,) and out.labels.dtype == bool


def test_preprocess_reads_16_bit_and_grey_like_training(det, run, tmp_path):
    rng = np.random.default_rng(1)
    grey8 = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    p8, p16 = str(tmp_path / "g8.png"), str(tmp_path / "g16.png")
    Image.fromarray(grey8).save(p8)
    Image.fromarray(grey8.astype(np.uint16) * 257).save(p16)  # the same picture in 16 bit
    x8, x16 = det.preprocess([p8, p16])
    assert x8.dtype == np.float32 and x8.shape == (32, 32, 3)
    np.testing.assert_allclose(x16, x8, atol=1e-6)  # not saturated: 16-bit mid-grey stays mid-grey
    np.testing.assert_allclose(x8[..., 0], grey8 / 127.5 - 1.0, atol=1e-6)
    # An in-memory uint16 RGB array is scaled the same way.
    rgb16 = np.repeat(grey8[..., None].astype(np.uint16) * 257, 3, axis=-1)
    np.testing.assert_allclose(det.preprocess(rgb16)[0], x8, atol=1e-6)
    # A training image reads identically through the API and the dataset loader.
    path = smoke_test_images(run, 1)[0]
    np.testing.assert_array_equal(det.preprocess(path)[0], image_io.image_to_float(image_io.load_image(path, 32)))


def test_bad_inputs_are_user_errors(det, run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(UserError, match="bad.png"):
        det.predict([str(bad)])
    with pytest.raises(UserError, match="float64"):
        det.predict(np.zeros((8, 8), np.float64))
    with pytest.raises(UserError, match="neither an export folder"):
        Detector.load(str(tmp_path))


def test_evaluate_uses_the_stored_threshold_unless_asked(run, tmp_path):
    from diff_fastener_jax.evaluation.evaluate import evaluate_run

    config = load_run_config(run)
    params, _ = load_run_params(run, config)
    res = evaluate_run(
        config, params, str(tmp_path / "a"), show_progress=False, stored_threshold={"value": 0.123, "source": "test"}
    )
    assert res["threshold"] == pytest.approx(0.123) and "detector.json" in res["threshold_source"]
    res = evaluate_run(
        config,
        params,
        str(tmp_path / "b"),
        show_progress=False,
        stored_threshold={"value": 0.123, "source": "test"},
        recalibrate=True,
    )
    assert res["threshold"] == pytest.approx(threshold.read(run)["threshold"]["value"], rel=1e-6)


def test_evaluate_cli_takes_the_stored_threshold_only_for_its_step_and_config(run):
    from diff_fastener_jax.config import apply_overrides

    config = load_run_config(run)
    step = threshold.read(run)["checkpoint_step"]
    assert threshold.stored_threshold(run, step, config) == threshold.read(run)["threshold"]
    assert threshold.stored_threshold(run, step - 3, config) is None  # another checkpoint
    assert threshold.stored_threshold(run, step, apply_overrides(config, {"infer.map": "recon_error"})) is None
