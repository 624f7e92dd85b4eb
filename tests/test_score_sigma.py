"""infer.score_sigma: the program returns the map smoothed by `infer.map_sigma` and reads its image score
from the map smoothed by `infer.score_sigma`; the normal map is fitted on the map the score reads, and
the exported ONNX program and the reference detector follow the same split; each score setting
(score_sigma, score_chroma_weight) is a value >= 0 or -1 for the returned map's own."""

import copy

import numpy as np
import pytest
from ship_support import assert_normal_map_fits_the_scored_map, assert_onnx_matches, smoke_test_images

from diff_fastener_jax.config import ConfigError, apply_overrides, validate_config
from diff_fastener_jax.config_schema import SCORE_AS_MAP


def _variant(config, **overrides):
    return apply_overrides(copy.deepcopy(config), {f"infer.{k}": v for k, v in overrides.items()})


def test_the_map_and_the_score_read_their_own_smoothing(smoke_run, tmp_path):
    """map_sigma 24 / score_sigma 0 at 256² (3 px / none on the 32 px smoke images): the returned map is
    the map_sigma=24 program's, the score the unsmoothed program's, in JAX and in model.onnx alike;
    detector.json records both sigmas."""
    from diff_fastener_jax.deploy.detector import Detector
    from diff_fastener_jax.deploy.threshold import detector_record
    from diff_fastener_jax.inference import make_infer_fn, score_sigma_at_256
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    config = load_run_config(smoke_run)
    assert config.infer.score_sigma == SCORE_AS_MAP  # a run saved before the key: the map's own
    params, _ = load_run_params(smoke_run, config)
    images = Detector.load(smoke_run).preprocess(smoke_test_images(smoke_run, 6))  # (6, 32, 32, 3)
    split = _variant(config, map_sigma=24.0, score_sigma=0.0)
    smooth = make_infer_fn(_variant(config, map_sigma=24.0))(params, images)
    raw = make_infer_fn(_variant(config, map_sigma=0.0))(params, images)
    out = make_infer_fn(split)(params, images)
    assert out.anomaly_map.shape == (6, 32, 32) and out.score.shape == (6,)
    np.testing.assert_allclose(np.asarray(out.anomaly_map), np.asarray(smooth.anomaly_map), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.score), np.asarray(raw.score), atol=1e-6)
    assert np.abs(np.asarray(smooth.score) - np.asarray(raw.score)).max() > 1e-3  # the split matters here
    assert score_sigma_at_256(split) == 0.0 and score_sigma_at_256(_variant(config, map_sigma=24.0)) == 24.0

    inference = detector_record(split, {"value": 0.5}, 6)["inference"]
    assert (inference["map_sigma_px"], inference["score_sigma_px"]) == ([3.0, 3.0], [0.0, 0.0])

    assert_onnx_matches(split, params, images, out, str(tmp_path / "model.onnx"))


def test_the_normal_map_is_fitted_on_the_map_the_score_reads(smoke_run):
    """With infer.normal_map='subtract', calibration fits the normal map (and the threshold) on the
    score's map: the same as a run whose one map has the score's smoothing, not the returned map's."""
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    config = load_run_config(smoke_run)
    params, _ = load_run_params(smoke_run, config)
    base = _variant(config, normal_map="subtract", score_region="foreground")
    base.data.val_fraction = 0.5  # at least 2 held-out normals
    split = _variant(base, map_sigma=24.0, score_sigma=8.0)
    assert_normal_map_fits_the_scored_map(split, _variant(base, map_sigma=8.0), _variant(base, map_sigma=24.0), params)


@pytest.mark.parametrize(
    "key,bad,message",
    [
        ("score_sigma", -2.0, r"infer.score_sigma: must be >= 0 \(pixels at 256²\), or -1 for the map's own"),
        ("score_chroma_weight", -0.5, r"infer.score_chroma_weight: must be >= 0, or -1 for the map's own"),
    ],
)
def test_a_score_setting_is_its_own_value_or_the_maps(smoke_run, key, bad, message):
    from diff_fastener_jax.training.run_loading import load_run_config

    config = load_run_config(smoke_run)
    for ok in (SCORE_AS_MAP, 0.0, 4.0):
        validate_config(_variant(config, **{key: ok}), check_data=False)
    with pytest.raises(ConfigError, match=message):
        validate_config(_variant(config, **{key: bad}), check_data=False)
