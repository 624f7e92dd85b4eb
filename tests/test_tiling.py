"""Tiled full-image scoring: tile plans, stitching weights, and the tiled program against per-tile runs."""

import jax
import numpy as np
import pytest
from helpers import perturbed, tiny_config

from diff_fastener_jax import tiling
from diff_fastener_jax.inference import make_infer_fn, top_k_count, uses_tiles
from diff_fastener_jax.models import init_params


@pytest.mark.parametrize("length,tile,stride", [(64, 32, 16), (70, 32, 16), (96, 32, 32), (100, 64, 24), (32, 32, 16)])
def test_stitching_weights_sum_to_one_and_stay_inside_their_tiles(length, tile, stride):
    plan = tiling.axis_plan(length, tile, stride)
    assert plan.origins[0] == 0 and plan.origins[-1] == length - tile  # the tiles cover the whole side
    np.testing.assert_allclose(plan.weight.sum(1), 1.0, atol=1e-12)
    assert (plan.weight >= 0).all()
    plan_w = tiling.axis_plan(48, 32, 16)
    w = tiling.stitch_weights(plan, plan_w)  # (Ty, Tx, H, W)
    np.testing.assert_allclose(w.sum((0, 1)), 1.0, atol=1e-12)
    for t, o in enumerate(plan.origins):  # a tile weighs nothing outside itself
        outside = np.ones(length, bool)
        outside[o : o + tile] = False
        assert not w[t][:, outside].any()


def test_hann_windows_at_half_stride_sum_to_one_without_normalising():
    window = tiling.hann_window(32)
    np.testing.assert_allclose(window[:16] + window[16:], 1.0, atol=1e-12)
    assert window.min() > 0  # an edge pixel covered by one tile keeps that tile's value


def test_extract_then_stitch_gives_the_image_back():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 48, 80, 3)).astype(np.float32)
    plan_h, plan_w = tiling.axis_plan(48, 32, 16), tiling.axis_plan(80, 32, 24)
    tiles = np.asarray(tiling.extract_tiles(images, plan_h, plan_w, 32))
    assert tiles.shape == (2 * 2 * 3, 32, 32, 3)
    # row-major tiles, image after image: tile (image 1, row 1, column 2) starts at (16, 48)
    np.testing.assert_array_equal(tiles[3 + 2 * 3 + 2], images[1, 16:48, 48:80])
    np.testing.assert_allclose(np.asarray(tiling.stitch_tiles(tiles, plan_h, plan_w)), images, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(tiling.stitch_tiles(tiles[..., 0], plan_h, plan_w)), images[..., 0], atol=1e-6
    )


@pytest.mark.parametrize("length,tile,stride", [(16, 32, 16), (64, 32, 0), (64, 32, 33)])
def test_bad_tilings_are_refused(length, tile, stride):
    with pytest.raises(ValueError, match="tiling"):
        tiling.axis_plan(length, tile, stride)


def _patch_config(image_size, stride, tiling_mode="tiles"):
    """The smoke model trained on 32 px patches, scored at `image_size` (H, W)."""
    config = tiny_config(**{"infer.tile_stride": stride, "infer.tiling": tiling_mode, "infer.map_sigma": 0.0})
    with config.ignore_type():  # an (H, W) evaluation resolution where the schema's default is one int
        config.data.image_size = tuple(image_size)
    config.data.patch_size = 32
    return config


@pytest.fixture(scope="module")
def patch_params():
    return perturbed(init_params(tiny_config(), jax.random.key(0)), 3)


def test_tiled_map_is_the_stitched_tile_maps_at_the_image_shape(patch_params):
    """A 32 x 64 image, 32 px tiles: where one tile covers a pixel, the stitched map is that tile's map
    from the untiled program; the map has the image's shape; the score is the top-K of the full map.
    Unsmoothed maps: smoothing acts on the stitched map, so a tile's own smoothed map differs at its edges."""
    images = np.random.default_rng(1).uniform(-1, 1, (2, 32, 64, 3)).astype(np.float32)
    halves = np.concatenate([images[:, :, :32], images[:, :, 32:]])  # (4, 32, 32, 3): left, then right
    single = make_infer_fn(tiny_config(**{"infer.map_sigma": 0.0}))(patch_params, halves)
    left, right = np.asarray(single.anomaly_map[:2]), np.asarray(single.anomaly_map[2:])

    abutting = _patch_config((32, 64), 32)
    assert uses_tiles(abutting)
    out = make_infer_fn(abutting)(patch_params, images)
    amap = np.asarray(out.anomaly_map)
    assert amap.shape == (2, 32, 64) and out.recon.shape == (2, 32, 64, 3)
    np.testing.assert_allclose(amap, np.concatenate([left, right], axis=2), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(out.recon),
        np.concatenate([np.asarray(single.recon[:2]), np.asarray(single.recon[2:])], axis=2),
        atol=1e-6,
    )
    k = top_k_count(abutting, 32, 64)
    assert k == round(50 * 32 * 64 / 65536)
    ref = np.sort(amap.reshape(2, -1).astype(np.float64), 1)[:, -k:].mean(1)
    np.testing.assert_allclose(np.asarray(out.score), ref, rtol=1e-5)

    overlapping = make_infer_fn(_patch_config((32, 64), 16))(patch_params, images)  # tiles at 0, 16, 32
    amap = np.asarray(overlapping.anomaly_map)
    np.testing.assert_allclose(amap[:, :, :16], left[:, :, :16], atol=1e-6)  # tile 0 alone covers these
    np.testing.assert_allclose(amap[:, :, 48:], right[:, :, 16:], atol=1e-6)  # tile 2 alone
    assert not np.allclose(amap[:, :, 16:48], np.concatenate([left, right], 2)[:, :, 16:48], atol=1e-4)


def test_whole_image_pass_gives_a_map_of_the_image_shape(patch_params):
    images = np.random.default_rng(2).uniform(-1, 1, (1, 32, 64, 3)).astype(np.float32)
    out = make_infer_fn(_patch_config((32, 64), 0, "whole"))(patch_params, images)
    assert out.anomaly_map.shape == (1, 32, 64) and np.isfinite(np.asarray(out.score)).all()


def test_detector_scores_a_non_square_image_as_evaluate_does(patch_params, demo_root, tmp_path):
    """evaluate (tiled, 32 x 64, with the reference detectors) and the Detector API give each test image
    the same score: one program, whatever path the image takes."""
    import csv

    from diff_fastener_jax.data import datasets
    from diff_fastener_jax.deploy.detector import Detector
    from diff_fastener_jax.deploy.threshold import detector_record
    from diff_fastener_jax.evaluation.evaluate import evaluate_run

    config = _patch_config((32, 64), 16)
    config.data.root = demo_root
    splits = datasets.list_splits(config.data, seed=config.seed)
    test = splits["test"][:8]  # one batch (infer.batch_size 8): one compiled shape
    threshold = {"value": 0.5, "source": "given"}
    result = evaluate_run(
        config,
        patch_params,
        str(tmp_path / "eval"),
        show_progress=False,
        test_samples=test,
        stored_threshold=threshold,
        train_samples=splits["train"],
    )
    with open(tmp_path / "eval" / "scores.csv") as f:
        eval_scores = [float(r["score"]) for r in csv.DictReader(f)]  # one row per test image, in order
    assert len(eval_scores) == 8
    ref = result["reference"]
    assert set(ref) == {"global_stats", "pixel_gaussian"} and 0 <= ref["global_stats"]["image_auroc"] <= 1
    assert "Reference detectors" in (tmp_path / "eval" / "report.html").read_text()

    det = Detector(config, patch_params, detector_record(config, threshold, 0))
    assert (det.height, det.width) == (32, 64)
    assert det.record["inference"]["tiles"] == [1, 3] and det.record["inference"]["tile_stride"] == 16
    pred = det.predict([s.path for s in test])
    np.testing.assert_allclose(pred.scores, eval_scores, atol=2e-6)
