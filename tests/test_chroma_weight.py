"""infer.chroma_weight, the reconstruction error's extra weight on a change of hue: the error against a
float64 reference, a brightness change and a grey image unaffected, the program's map and score in JAX
and in model.onnx alike, detector.json's record, bad values refused; infer.score_chroma_weight, the
weight of the map the image score alone reads, tiled and whole, with the normal map fitted on that map."""

import copy

import numpy as np
import pytest
from helpers import perturbed, tiny_config
from ship_support import assert_normal_map_fits_the_scored_map, assert_onnx_matches, smoke_test_images

from diff_fastener_jax.config import ConfigError, apply_overrides, validate_config
from diff_fastener_jax.config_schema import SCORE_AS_MAP


def _variant(config, **overrides):
    return apply_overrides(copy.deepcopy(config), {f"infer.{k}": v for k, v in overrides.items()})


def _error_float64(images, recon, weight):
    """The reconstruction error in float64: channels' mean |d| + weight * |d - mean(d)|, / 2, in [0, 1]."""
    d = np.asarray(images, np.float64) - np.asarray(recon, np.float64)  # (N, H, W, C)
    chroma = d - d.mean(-1, keepdims=True)
    return np.clip((np.abs(d).mean(-1) + weight * np.sqrt((chroma**2).sum(-1))) / 2.0, 0.0, 1.0)


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_the_error_matches_a_float64_reference(weight):
    from diff_fastener_jax.inference import reconstruction_error

    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 5, 7, 3)).astype(np.float32)
    recon = rng.uniform(-1, 1, (2, 5, 7, 3)).astype(np.float32)
    error = np.asarray(reconstruction_error(images, recon, weight))
    assert error.shape == (2, 5, 7) and error.dtype == np.float32
    np.testing.assert_allclose(error, _error_float64(images, recon, weight), atol=2e-6)
    if weight == 2.0:
        assert error.max() == 1.0  # clipped: a strong change of hue would exceed 1


def test_the_chroma_term_adds_to_a_change_of_hue_only():
    """A brightness change (all channels alike) scores the plain error at any weight; a hue change of
    the same mean |d| scores higher with the weight; grey (one-channel) images are untouched."""
    from diff_fastener_jax.inference import reconstruction_error

    x = np.zeros((1, 1, 2, 3), np.float32)
    recon = np.array([[[[0.3, 0.3, 0.3], [0.3, -0.3, 0.3]]]], np.float32)  # brighter | hue shift
    plain = np.asarray(reconstruction_error(x, recon, 0.0))[0, 0]
    weighted = np.asarray(reconstruction_error(x, recon, 1.0))[0, 0]
    np.testing.assert_allclose(plain, [0.15, 0.15], atol=1e-7)  # equal mean |d|
    assert weighted[0] == pytest.approx(0.15, abs=1e-6)
    assert weighted[1] == pytest.approx(0.15 + np.sqrt(6 * 0.2**2) / 2, abs=1e-6)  # |(−.2, .4, −.2)| = .49
    grey_x, grey_recon = np.zeros((1, 3, 3, 1), np.float32), np.full((1, 3, 3, 1), 0.4, np.float32)
    np.testing.assert_allclose(
        np.asarray(reconstruction_error(grey_x, grey_recon, 3.0)), np.full((1, 3, 3), 0.2), atol=1e-7
    )


def test_the_program_maps_the_weighted_error_in_jax_and_onnx(smoke_run, tmp_path):
    """infer.map='recon_error' with chroma_weight 2, unsmoothed: the returned map is the weighted error of the
    images and the program's own reconstruction, above the plain error's; model.onnx gives the same map
    and scores; detector.json records the weight."""
    from diff_fastener_jax.deploy.detector import Detector
    from diff_fastener_jax.deploy.threshold import detector_record
    from diff_fastener_jax.inference import make_infer_fn
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    config = load_run_config(smoke_run)
    assert config.infer.chroma_weight == 0.0
    params, _ = load_run_params(smoke_run, config)
    images = Detector.load(smoke_run).preprocess(smoke_test_images(smoke_run, 6))  # (6, 32, 32, 3)
    weighted = _variant(config, map="recon_error", map_sigma=0.0, chroma_weight=2.0)  # the raw map
    out = make_infer_fn(weighted)(params, images)
    plain = make_infer_fn(_variant(config, map="recon_error", map_sigma=0.0))(params, images)
    assert out.anomaly_map.shape == (6, 32, 32) and out.score.shape == (6,)
    np.testing.assert_allclose(np.asarray(plain.recon), np.asarray(out.recon), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out.anomaly_map), _error_float64(images, np.asarray(out.recon), 2.0), atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(plain.anomaly_map), _error_float64(images, np.asarray(out.recon), 0.0), atol=1e-5
    )
    assert np.asarray(out.score - plain.score).min() > 1e-3  # the reconstructions change the hue somewhere

    assert detector_record(weighted, {"value": 0.5}, 6)["inference"]["chroma_weight"] == 2.0

    assert_onnx_matches(weighted, params, images, out, str(tmp_path / "model.onnx"))


def test_a_negative_chroma_weight_is_refused(smoke_run):
    from diff_fastener_jax.training.run_loading import load_run_config

    config = load_run_config(smoke_run)
    for ok in (0.0, 0.5, 2.0):
        validate_config(_variant(config, chroma_weight=ok), check_data=False)
    with pytest.raises(ConfigError, match=r"infer.chroma_weight: must be >= 0, got -1.0"):
        validate_config(_variant(config, chroma_weight=-1.0), check_data=False)


@pytest.mark.parametrize("tiling", ["tiles", "whole"])
def test_the_score_reads_its_own_weight_and_the_map_stays_plain(tiling):
    """map 'segmentation+recon_error', chroma_weight 0, score_chroma_weight 2, on a 32 x 64 image of a
    model trained on 32 px patches (3 overlapping tiles, or one whole-image pass): the returned map is
    the unweighted program's, the score the program's whose one map is weighted."""
    import jax

    from diff_fastener_jax.inference import make_infer_fn, reads_own_score_map
    from diff_fastener_jax.models import init_params

    params = perturbed(init_params(tiny_config(), jax.random.key(0)), 3)
    config = tiny_config(**{"infer.tiling": tiling, "infer.tile_stride": 16, "infer.map": "segmentation+recon_error"})
    with config.ignore_type():  # an (H, W) evaluation resolution where the schema's default is one int
        config.data.image_size = (32, 64)
    config.data.patch_size = 32
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 64, 3)).astype(np.float32)
    split = _variant(config, score_chroma_weight=2.0)
    assert reads_own_score_map(split) and not reads_own_score_map(_variant(config, score_chroma_weight=0.0))
    out = make_infer_fn(split)(params, images)
    plain = make_infer_fn(config)(params, images)
    weighted = make_infer_fn(_variant(config, chroma_weight=2.0))(params, images)
    assert out.anomaly_map.shape == (2, 32, 64) and out.score.shape == (2,)
    np.testing.assert_allclose(np.asarray(out.anomaly_map), np.asarray(plain.anomaly_map), atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.score), np.asarray(weighted.score), atol=1e-6)
    assert np.asarray(weighted.score - plain.score).min() > 1e-3  # the weight matters here


def test_a_score_weight_is_inert_without_the_error(smoke_run):
    """With the segmentation map alone there is no error to weight: one map, the same program."""
    from diff_fastener_jax.inference import reads_own_score_map, scored_map_config
    from diff_fastener_jax.training.run_loading import load_run_config

    config = _variant(load_run_config(smoke_run), map="segmentation", score_chroma_weight=2.0)
    assert not reads_own_score_map(config) and scored_map_config(config) is config


def test_the_split_weight_in_onnx_detector_json_and_the_normal_map(smoke_run, tmp_path):
    """The smoke model with score_chroma_weight 2 over the plain map: model.onnx returns the same map and
    scores; detector.json records both weights; calibration fits the normal map (and the threshold) on
    the weighted map the score reads, not on the plain one the program returns."""
    from diff_fastener_jax.deploy import threshold
    from diff_fastener_jax.deploy.detector import Detector
    from diff_fastener_jax.inference import make_infer_fn
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    config = load_run_config(smoke_run)
    assert config.infer.score_chroma_weight == SCORE_AS_MAP  # a run saved before the key: the map's own
    params, _ = load_run_params(smoke_run, config)
    images = Detector.load(smoke_run).preprocess(smoke_test_images(smoke_run, 6))  # (6, 32, 32, 3)
    split = _variant(config, map="segmentation+recon_error", score_chroma_weight=2.0)
    out = make_infer_fn(split)(params, images)
    assert_onnx_matches(split, params, images, out, str(tmp_path / "model.onnx"))

    inference = threshold.detector_record(split, {"value": 0.5}, 6)["inference"]
    assert (inference["chroma_weight"], inference["score_chroma_weight"]) == (0.0, 2.0)
    assert "weighted by score_chroma_weight" in inference["score"]

    base = _variant(split, normal_map="subtract", score_region="foreground")
    base.data.val_fraction = 0.5  # at least 2 held-out normals
    same, returned = _variant(base, chroma_weight=2.0), _variant(base, score_chroma_weight=0.0)
    assert_normal_map_fits_the_scored_map(base, same, returned, params)
