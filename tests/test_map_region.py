"""infer.map_region='foreground': the returned map is zero outside the image's Otsu foreground and then
smoothed (against a float64 reference), in JAX and in model.onnx alike; the image score, its threshold
and its normal map are those of the whole map; detector.json records the region (which region, and bad
values: test_score_region.py)."""

import copy

import numpy as np
import pytest
from ship_support import assert_onnx_matches, smoke_test_images

from diff_fastener_jax.config import apply_overrides


def _variant(config, **overrides):
    return apply_overrides(copy.deepcopy(config), {f"infer.{k}": v for k, v in overrides.items()})


def test_the_map_is_cut_to_the_foreground_then_smoothed(smoke_run, tmp_path):
    """map_sigma 24 at 256² (3 px on the 32 px smoke images): the map is S @ where(fg, raw, 0) @ S.T in
    float64, fg the synthesis rule's Otsu foreground; the score is the whole map's."""
    from diff_fastener_jax.data import synthesis
    from diff_fastener_jax.deploy.detector import Detector
    from diff_fastener_jax.deploy.threshold import detector_record
    from diff_fastener_jax.inference import make_infer_fn, reads_own_score_map, smoothing_matrix
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    config = load_run_config(smoke_run)
    assert config.infer.map_region == "image"  # a run saved before the key: the whole map
    params, _ = load_run_params(smoke_run, config)
    images = Detector.load(smoke_run).preprocess(smoke_test_images(smoke_run, 6))  # (6, 32, 32, 3)
    whole = _variant(config, map_sigma=24.0)
    cut = _variant(whole, map_region="foreground")
    assert reads_own_score_map(cut) and not reads_own_score_map(whole)
    raw = np.asarray(make_infer_fn(_variant(config, map_sigma=0.0))(params, images).anomaly_map, np.float64)
    plain = make_infer_fn(whole)(params, images)
    out = make_infer_fn(cut)(params, images)
    assert out.anomaly_map.shape == (6, 32, 32) and out.score.shape == (6,)

    fg = np.stack([synthesis.foreground_mask(x, "otsu") for x in images])  # (6, 32, 32)
    assert 0.1 < fg.mean() < 0.9  # the smoke images show an object on a background
    s = smoothing_matrix(32, 3.0)
    want = np.clip(s @ np.where(fg, raw, 0.0) @ s.T, 0.0, 1.0)  # (6, 32, 32)
    np.testing.assert_allclose(np.asarray(out.anomaly_map), want, atol=1e-5)
    gone = ~fg & (np.stack([s @ f @ s.T for f in fg.astype(np.float64)]) < 1e-3)  # far from the object
    assert gone.any() and np.abs(np.asarray(out.anomaly_map)[gone]).max() < 1e-3
    assert np.asarray(plain.anomaly_map)[gone].max() > 1e-3  # the whole map marks something there
    np.testing.assert_allclose(np.asarray(out.score), np.asarray(plain.score), atol=1e-6)

    assert detector_record(cut, {"value": 0.5}, 6)["inference"]["map_region"] == "foreground"
    assert_onnx_matches(cut, params, images, out, str(tmp_path / "model.onnx"))


def test_the_threshold_and_normal_map_are_the_whole_maps(smoke_run):
    from diff_fastener_jax.deploy import threshold
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    config = load_run_config(smoke_run)
    params, _ = load_run_params(smoke_run, config)
    whole = _variant(config, normal_map="subtract", map_sigma=8.0)
    whole.data.val_fraction = 0.5  # at least 2 held-out normals
    whole_record, whole_map = threshold.calibrate(whole, params)
    cut_record, cut_map = threshold.calibrate(_variant(whole, map_region="foreground"), params)
    assert cut_map.shape == (32, 32) and cut_record["normal_map"]["num_images"] >= 2
    np.testing.assert_allclose(cut_map, whole_map, atol=1e-6)
    assert cut_record["value"] == pytest.approx(whole_record["value"], abs=1e-6)
