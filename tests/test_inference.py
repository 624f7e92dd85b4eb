"""The jitted inference program: fixed per-model noise, top-K score, ablation methods, batched scoring."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import perturbed, tiny_config

from diff_fastener_jax import parallel
from diff_fastener_jax.inference import (
    fixed_noise,
    make_infer_fn,
    run_infer,
    score_in_batches,
    smoothing_matrix,
    top_k_count,
)
from diff_fastener_jax.models import init_params


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def _trained_params(config):
    # Perturbed so the networks produce non-trivial outputs.
    return perturbed(init_params(config, jax.random.key(0)), 3)


@pytest.fixture(scope="module")
def smoke():
    config = tiny_config()
    return config, _trained_params(config), make_infer_fn(config)


def test_infer_deterministic_and_top_k_matches_numpy(smoke):
    config, params, infer = smoke
    images = jnp.asarray(_images(6))
    r1, a1, s1, t1 = infer(params, images)
    r2, a2, s2, _ = infer(params, images)
    np.testing.assert_array_equal(np.asarray(t1), np.full(6, config.diffusion.eval_t_big))
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    assert r1.shape == (6, 32, 32, 3) and a1.shape == (6, 32, 32) and s1.shape == (6,)
    assert float(jnp.min(r1)) >= -1 and float(jnp.max(r1)) <= 1
    k = top_k_count(config, 32, 32)
    assert k == max(1, round(50 * 32 * 32 / 65536))
    flat = np.asarray(a1, np.float64).reshape(6, -1)
    ref = np.sort(flat, axis=1)[:, -k:].mean(axis=1)
    np.testing.assert_allclose(np.asarray(s1), ref, rtol=1e-6)


def test_score_depends_on_model_and_image_alone(smoke):
    """The same image scores the same alone, in a batch, in another order and padded."""
    config, params, infer = smoke
    images = _images(5, seed=1)
    _, a_batch, s_batch, _ = (np.asarray(o) for o in infer(params, images))
    assert np.ptp(s_batch) > 0  # distinct images, distinct scores: the comparison says something
    for i in range(5):
        _, a_one, s_one, _ = (np.asarray(o) for o in infer(params, images[i : i + 1]))
        np.testing.assert_allclose(s_one[0], s_batch[i], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a_one[0], a_batch[i], rtol=1e-5, atol=1e-6)
    order = np.array([3, 0, 4, 1, 2])
    s_perm = infer(params, images[order]).score
    np.testing.assert_allclose(np.asarray(s_perm), s_batch[order], rtol=1e-6, atol=1e-7)
    # Padded to 8 rows by run_infer and split over 4 devices.
    mesh = parallel.make_mesh(jax.devices()[:4])
    s_pad = run_infer(infer, parallel.replicate(params, mesh), images, mesh, pad_to=8).score
    np.testing.assert_allclose(s_pad, s_batch, rtol=1e-6, atol=1e-7)
    # Batched scoring in chunks of 2 gives the same scores in the same order.
    scores, _ = score_in_batches(
        infer, params, [(images[i : i + 2],) for i in range(0, 5, 2)], show_progress=False, pad_to=2
    )
    np.testing.assert_allclose(scores, s_batch, rtol=1e-6, atol=1e-7)


def test_fixed_noise_comes_from_infer_seed():
    a, b = fixed_noise(tiny_config()), fixed_noise(tiny_config(**{"infer.seed": 1}))
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, fixed_noise(tiny_config()))
    assert np.abs(a - b).max() > 1.0
    assert abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05


def test_infer_seed_changes_scores(smoke):
    config, params, infer = smoke
    images = _images(2)
    s0 = np.asarray(infer(params, images)[2])
    s1 = np.asarray(make_infer_fn(tiny_config(**{"infer.seed": 1}))(params, images)[2])
    assert np.abs(s0 - s1).max() > 0


def test_infer_recon_error_map_and_sharded():
    config = tiny_config(**{"infer.map": "recon_error", "infer.map_sigma": 0.0})
    params = _trained_params(config)
    infer = make_infer_fn(config)
    images = _images(8)
    recon, amap, score, _ = infer(params, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(amap), np.abs(images - np.asarray(recon)).mean(-1) / 2, atol=1e-6)
    mesh = parallel.make_mesh(jax.devices()[:4])
    score4 = infer(params, jax.device_put(jnp.asarray(images), parallel.data_sharding(mesh))).score
    np.testing.assert_allclose(np.asarray(score4), np.asarray(score), rtol=1e-5, atol=1e-6)


def test_segmentation_plus_recon_error_map_is_the_mean_of_the_two(smoke):
    config, params, _ = smoke
    images = jnp.asarray(_images(4, seed=3))
    raw = {"infer.map_sigma": 0.0}  # smoothing is linear; unsmoothed maps compare directly
    seg = make_infer_fn(tiny_config(**raw))(params, images)
    blend = make_infer_fn(tiny_config(**raw, **{"infer.map": "segmentation+recon_error"}))(params, images)
    error = np.abs(np.asarray(images) - np.asarray(seg.recon)).mean(-1) / 2
    np.testing.assert_allclose(np.asarray(blend.recon), np.asarray(seg.recon), atol=1e-6)
    np.testing.assert_allclose(np.asarray(blend.anomaly_map), (np.asarray(seg.anomaly_map) + error) / 2, atol=1e-6)
    assert 0.0 <= float(blend.anomaly_map.min()) and float(blend.anomaly_map.max()) <= 1.0
    k = top_k_count(config, 32, 32)
    top = np.sort(np.asarray(blend.anomaly_map).reshape(4, -1), axis=1)[:, -k:].mean(1)
    np.testing.assert_allclose(np.asarray(blend.score), top, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["one_step", "ddim", "ddpm", "adaptive"])
def test_infer_ablation_methods_are_batch_independent(method):
    config = tiny_config(
        **{
            "infer.method": method,
            "infer.ddim_steps": 3,
            "diffusion.eval_t_small": 10,
            "diffusion.eval_t_big": 20,
            "infer.adaptive_t_max": 20,
        }
    )
    params = _trained_params(config)
    infer = make_infer_fn(config)
    images = jnp.asarray(_images(2))
    r1, a1, s1, t1 = infer(params, images)
    r2, _, s2, t2 = infer(params, images[::-1])
    np.testing.assert_array_equal(np.asarray(t2)[::-1], np.asarray(t1))
    assert set(np.asarray(t1).tolist()) <= {20, 10, 0}  # a time on the grid (20, 10, 0)
    assert r1.shape == images.shape and a1.shape == (2, 32, 32)
    np.testing.assert_allclose(np.asarray(s2)[::-1], np.asarray(s1), rtol=1e-6, atol=1e-7)
    assert float(jnp.max(jnp.abs(r1))) <= 1.0


@pytest.mark.parametrize("n,sigma", [(32, 0.7), (64, 4.0), (16, 6.5), (5, 3.0)])  # 6.5 and 3: multiple reflections
def test_smoothing_matrix_is_scipy_gaussian_filter(n, sigma):
    from scipy.ndimage import gaussian_filter1d

    v = np.random.default_rng(n).random((n, 3))
    ref = gaussian_filter1d(v, sigma, axis=0, mode="reflect", truncate=4.0)
    np.testing.assert_allclose(smoothing_matrix(n, sigma) @ v, ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(smoothing_matrix(n, 0.0), np.eye(n))


def test_map_sigma_smooths_the_map_and_scores_the_smoothed_map(smoke):
    """infer.map_sigma (pixels at 256², scaled to the image side) = scipy's Gaussian filter of the raw map."""
    from scipy.ndimage import gaussian_filter

    config, params, _ = smoke
    images = jnp.asarray(_images(4, seed=2))
    raw = make_infer_fn(tiny_config(**{"infer.map_sigma": 0.0}))(params, images).anomaly_map
    raw = np.asarray(raw, np.float64)  # (4, 32, 32)
    sigma = 16.0  # at 256²: 2 px at 32 px
    smoothed = make_infer_fn(tiny_config(**{"infer.map_sigma": sigma}))(params, images)
    ref = gaussian_filter(raw, (0, 2.0, 2.0), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(np.asarray(smoothed.anomaly_map), ref, atol=2e-6)
    k = top_k_count(config, 32, 32)
    np.testing.assert_allclose(np.asarray(smoothed.score), np.sort(ref.reshape(4, -1), 1)[:, -k:].mean(1), atol=2e-6)
    assert np.ptp(ref) < np.ptp(raw)  # it did smooth


def test_negative_map_sigma_is_refused():
    from diff_fastener_jax.config import ConfigError, validate_config

    with pytest.raises(ValueError, match="infer.map_sigma"):
        make_infer_fn(tiny_config(**{"infer.map_sigma": -1.0}))
    with pytest.raises(ConfigError, match="infer.map_sigma"):
        validate_config(tiny_config(**{"infer.map_sigma": -1.0}), check_data=False)


def test_wrong_image_shape_is_refused(smoke):
    _, params, infer = smoke
    with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
        infer(params, jnp.zeros((1, 64, 64, 3)))


def test_unknown_infer_method_is_refused():
    with pytest.raises(ValueError, match="infer.method"):
        make_infer_fn(tiny_config(**{"infer.method": "magic"}))


def test_a_saturated_region_stays_a_probability_after_smoothing():
    """A 24 x 24 block of sigmoid 1.0 in a 64 px map, smoothed with sigma 2 px, sums its weights to
    1 only up to float32 rounding (1.0000001 unclipped); the map stays in [0, 1] and the streaming
    evaluation takes it."""
    from diff_fastener_jax.evaluation.metrics import StreamingEvaluation
    from diff_fastener_jax.inference import smooth_map

    amap = np.zeros((2, 64, 64), np.float32)
    amap[0, 20:44, 20:44] = 1.0
    s = smoothing_matrix(64, 2.0)
    out = np.asarray(jax.jit(lambda a: smooth_map(a, s, s))(amap))  # (2, 64, 64)
    assert out.max() == 1.0 and out.min() >= 0.0
    np.testing.assert_allclose(out[0], s @ amap[0].astype(np.float64) @ s.T, atol=1e-6)
    masks = np.zeros((2, 64, 64), bool)
    masks[0, 20:44, 20:44] = True
    ev = StreamingEvaluation(with_pixels=True)
    ev.update(out.max(axis=(1, 2)), np.array([1, 0]), ["crack", "good"], out, masks)
    assert ev.compute()["pixel_auroc"] > 0.9
