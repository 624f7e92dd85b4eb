"""infer.score_region='foreground': the program's Otsu foreground equals the synthesis rule's, and the
image score is the top-K of the map inside it, in JAX and in the exported ONNX program alike; both
region settings follow data.foreground (infer.map_region's map: test_map_region.py)."""

import numpy as np
import pytest
from ship_support import smoke_test_images

from diff_fastener_jax.data import synthesis
from diff_fastener_jax.foreground import otsu_foreground


def _scenes() -> np.ndarray:
    """(6, 40, 56, 3) 8-bit scenes in [-1, 1]: a bright object on dark, a dark object on bright, a
    two-tone object, noise, a uniform image and an object under 1% of the image (both: whole image)."""
    rng = np.random.default_rng(0)
    scenes = np.full((6, 40, 56, 3), 40, np.uint8)
    scenes[0, 8:30, 10:40] = 200
    scenes[1] = 210
    scenes[1, 5:20, 20:50] = 30
    scenes[2, 6:34, 6:50] = 150
    scenes[2, 12:20, 14:30] = 230
    scenes[3] = rng.integers(0, 256, (40, 56, 3))
    scenes[4] = 128
    scenes[5, 20, 20] = 250  # 1 px of 2240
    noisy = scenes.astype(np.int64) + rng.integers(-6, 7, scenes.shape) * (np.arange(6) < 3)[:, None, None, None]
    return np.clip(noisy, 0, 255).astype(np.float32) * (2.0 / 255.0) - 1.0


def test_the_program_foreground_equals_the_synthesis_rule():
    import jax

    images = _scenes()
    got = np.asarray(jax.jit(otsu_foreground)(images))
    want = np.stack([synthesis.foreground_mask(x, "otsu") for x in images])
    assert got.shape == (6, 40, 56) and got.dtype == bool
    np.testing.assert_array_equal(got, want)
    assert got[0, 8:30, 10:40].all() and not got[0, :8].any()  # the bright object
    assert got[1, 5:20, 20:50].all() and not got[1, 25:].any()  # the dark object on a bright ground
    assert got[4].all() and got[5].all()  # nothing usable: the whole image


def test_the_foreground_score_is_the_top_k_inside_the_foreground(smoke_run, tmp_path):
    """The map is the model's own; the score is the top-K mean of it inside the Otsu foreground (-1
    outside), in the jitted program and in model.onnx under ONNX Runtime."""
    import onnxruntime as ort

    from diff_fastener_jax.config import apply_overrides
    from diff_fastener_jax.deploy.detector import Detector
    from diff_fastener_jax.deploy.export import export_onnx
    from diff_fastener_jax.inference import make_infer_fn, top_k_count
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    config = load_run_config(smoke_run)
    params, _ = load_run_params(smoke_run, config)
    images = Detector.load(smoke_run).preprocess(smoke_test_images(smoke_run, 6))  # (6, 32, 32, 3)
    region = apply_overrides(config, {"infer.score_region": "foreground"})
    plain = make_infer_fn(config)(params, images)
    out = make_infer_fn(region)(params, images)
    np.testing.assert_allclose(np.asarray(out.anomaly_map), np.asarray(plain.anomaly_map), atol=1e-6)
    fg = np.stack([synthesis.foreground_mask(x, "otsu") for x in images])
    assert 0 < fg.mean() < 1  # the smoke images have an object and a background
    k = top_k_count(config, 32, 32)
    inside = np.where(fg, np.asarray(plain.anomaly_map), -1.0).reshape(6, -1)
    np.testing.assert_allclose(np.asarray(out.score), np.sort(inside, axis=1)[:, -k:].mean(1), atol=1e-6)

    path = str(tmp_path / "model.onnx")
    export_onnx(region, params, path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = session.run(None, {session.get_inputs()[0].name: images})
    np.testing.assert_allclose(onnx_score, np.asarray(out.score), atol=1e-4)


@pytest.mark.parametrize(
    "key,uses_otsu", [("score_region", "scores_otsu_foreground"), ("map_region", "maps_otsu_foreground")]
)
def test_the_region_follows_data_foreground_and_unknown_regions_are_refused(key, uses_otsu):
    """infer.score_region and infer.map_region: 'foreground' is the Otsu object where training draws its
    anomalies on the object ('otsu'), the whole image on a surface ('full'); other values are refused."""
    from helpers import tiny_config

    from diff_fastener_jax import inference
    from diff_fastener_jax.config import ConfigError, validate_config

    otsu = getattr(inference, uses_otsu)
    assert otsu(tiny_config(**{f"infer.{key}": "foreground"}))
    # Textures: training draws anomalies everywhere, so the whole image is the foreground.
    assert not otsu(tiny_config(**{f"infer.{key}": "foreground", "data.foreground": "full"}))
    assert not otsu(tiny_config())
    with pytest.raises(ConfigError, match=f"infer.{key}: 'object' is not one of image, foreground"):
        validate_config(tiny_config(**{f"infer.{key}": "object"}), check_data=False)
