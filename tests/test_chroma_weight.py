"""infer.chroma_weight, the reconstruction error's extra weight on a change of hue: the error against a
float64 reference, a brightness change and a grey image unaffected, the program's map and score in JAX
and in model.onnx alike, detector.json's record, bad values refused."""

import copy

import numpy as np
import pytest
from ship_support import assert_onnx_matches, smoke_test_images

from diff_fastener_jax.config import ConfigError, apply_overrides, validate_config


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
