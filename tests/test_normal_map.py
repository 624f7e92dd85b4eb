"""infer.normal_map='subtract': the normal map is the blurred mean map of the held-out normals, each
calibration image is scored against the others' (leave-one-out, inside its score region), and every
path that scores an image (evaluate, the Detector, the exported StableHLO and ONNX programs) subtracts
the same map; 'standardise' also divides by the normals' blurred spread plus its median, everywhere alike."""

import csv
import json
import os

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from ship_support import smoke_test_images

from diff_fastener_jax.data.synthesis import foreground_mask
from diff_fastener_jax.deploy import normal_map
from diff_fastener_jax.errors import UserError


def reference_fit(maps: np.ndarray, k: int, regions=None, standardise=False) -> tuple[np.ndarray, np.ndarray]:
    """float64 reference of `normal_map.fit` with scipy's Gaussian filter (reflected edges): each map
    blurred, then the mean (and the standard deviation plus its median over the map) of the others."""
    n, h, w = maps.shape
    sigma = normal_map.BLUR_SIGMA * np.sqrt(h * w) / 256.0
    blurred = np.stack([gaussian_filter(m, sigma, mode="reflect", truncate=4.0) for m in maps])

    def summary(group):  # (mean, scale) of a stack of blurred maps
        spread = group.std(axis=0)
        return group.mean(axis=0), (spread + np.median(spread) if standardise else 1.0)

    scores = []
    for i in range(n):
        mean, scale = summary(np.delete(blurred, i, axis=0))
        scored = (maps[i] - mean) / scale
        if regions is not None:
            scored = np.where(regions[i], scored, -1e9)
        scores.append(np.sort(scored.ravel())[-k:].mean())
    mean, scale = summary(blurred)
    return (np.stack([mean, scale]) if standardise else mean), np.asarray(scores)


def test_fit_matches_a_float64_leave_one_out_reference():
    maps = np.random.default_rng(0).uniform(0, 1, (5, 24, 40))  # a non-square map: one sigma both ways
    fitted, scores = normal_map.fit(maps.astype(np.float32), k=7)
    ref_map, ref_scores = reference_fit(maps.astype(np.float32).astype(np.float64), 7)
    assert fitted.shape == (24, 40) and fitted.dtype == np.float32 and scores.shape == (5,)
    np.testing.assert_allclose(fitted, ref_map, atol=1e-6)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-9)
    # Against its own map included, every image would score lower: the leave-one-out scores are higher.
    in_sample = [np.sort((m - fitted).ravel())[-7:].mean() for m in maps]
    assert (scores > np.asarray(in_sample)).all()


def test_fit_scores_each_normal_inside_its_score_region():
    rng = np.random.default_rng(1)
    maps = rng.uniform(0, 1, (4, 16, 16)).astype(np.float32)
    regions = rng.uniform(size=(4, 16, 16)) < 0.3  # infer.score_region='foreground'
    _, scores = normal_map.fit(maps, k=5, regions=regions)
    _, ref_scores = reference_fit(maps.astype(np.float64), 5, regions)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-9)
    assert not np.allclose(scores, normal_map.fit(maps, k=5)[1])


def test_standardised_fit_matches_a_float64_leave_one_out_reference():
    """The (2, H, W) [mean, scale] map, and each normal's score against the others' mean and scale."""
    rng = np.random.default_rng(2)
    maps = (rng.uniform(0, 1, (6, 24, 40)) * np.linspace(0.1, 1, 40)).astype(np.float32)  # spread grows in x
    regions = rng.uniform(size=(6, 24, 40)) < 0.5
    fitted, scores = normal_map.fit(maps, k=7, regions=regions, standardise=True)
    ref_map, ref_scores = reference_fit(maps.astype(np.float64), 7, regions, standardise=True)
    assert fitted.shape == (2, 24, 40) and fitted.dtype == np.float32 and scores.shape == (6,)
    np.testing.assert_allclose(fitted, ref_map, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-9, atol=1e-9)
    assert fitted[1][:, -1].mean() > 2 * fitted[1][:, 0].mean()  # the scale follows the spread
    np.testing.assert_allclose(fitted[0], normal_map.fit(maps, k=7)[0], atol=1e-6)  # the mean is 'subtract's map


def test_a_standardised_fit_of_identical_normals_stays_finite():
    fitted, scores = normal_map.fit(np.full((3, 8, 8), 0.25, np.float32), k=2, standardise=True)
    assert fitted[1].min() == pytest.approx(normal_map.MIN_SCALE) and np.isfinite(scores).all()


def test_fit_needs_two_normals_and_three_to_standardise():
    with pytest.raises(UserError, match="'subtract': needs at least 2 held-out normal images, got 1"):
        normal_map.fit(np.zeros((1, 8, 8), np.float32), k=1)
    with pytest.raises(UserError, match="'standardise': needs at least 3 held-out normal images, got 2"):
        normal_map.fit(np.zeros((2, 8, 8), np.float32), k=1, standardise=True)


def test_a_damaged_normal_map_file_is_refused(tmp_path):
    normal_map.save(str(tmp_path), np.zeros((8, 8), np.float32))
    assert normal_map.load(str(tmp_path), (8, 8)).shape == (8, 8)
    assert sorted(os.listdir(tmp_path)) == [normal_map.NORMAL_MAP_FILE]  # no temporary file left
    with pytest.raises(UserError, match="expected a finite float32 array of shape \\(8, 16\\)"):
        normal_map.load(str(tmp_path), (8, 16))
    np.save(tmp_path / normal_map.NORMAL_MAP_FILE, np.full((8, 8), np.nan, np.float32))
    with pytest.raises(UserError, match="finite"):
        normal_map.load(str(tmp_path), (8, 8))
    assert normal_map.load(str(tmp_path / "elsewhere"), (8, 8)) is None


@pytest.mark.parametrize("mode", ["subtract", "standardise"])
def test_a_unified_model_is_refused(mode):
    from helpers import tiny_config

    from diff_fastener_jax.config import ConfigError, validate_config

    config = tiny_config(**{"infer.normal_map": mode, "data.category": "a,b"})
    with pytest.raises(ConfigError, match=f"infer.normal_map: '{mode}' fits one normal map per model"):
        validate_config(config, check_data=False)


def _with_option(run: str, dst, mode: str) -> str:
    """A copy of `run` whose config sets infer.normal_map=`mode` (no normal map fitted yet), with
    the score taken in the Otsu foreground (infer.score_region), and holds more normals out (the smoke
    run holds out one; some of these it trained on, which the mechanics tested here do not mind)."""
    import shutil

    copy = shutil.copytree(run, str(dst))
    path = os.path.join(copy, "config.json")
    saved = json.load(open(path))
    saved["infer"]["normal_map"] = mode
    saved["infer"]["score_region"] = "foreground"
    saved["data"]["val_fraction"] = 0.5
    json.dump(saved, open(path, "w"))
    return copy


@pytest.mark.parametrize("mode", ["subtract", "standardise"])
def test_every_path_applies_the_fitted_normal_map_inside_the_score_region(smoke_run, tmp_path, mode):
    from diff_fastener_jax import Detector
    from diff_fastener_jax.data import datasets
    from diff_fastener_jax.deploy import threshold
    from diff_fastener_jax.deploy.export import export_run, load_stablehlo
    from diff_fastener_jax.evaluation import metrics as M
    from diff_fastener_jax.evaluation.evaluate import evaluate_workdir
    from diff_fastener_jax.inference import NORMAL_MAP_PARAM, top_k_count
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    run = _with_option(smoke_run, tmp_path / "run", mode)
    config = load_run_config(run)
    params, step = load_run_params(run, config)
    assert NORMAL_MAP_PARAM not in params  # the stored calibration predates the option
    with pytest.raises(UserError, match="holds no normal map fitted for step"):
        Detector.load(run)

    # Training's last act, with the option on: normal_map.npy and detector.json.
    record = threshold.calibrate_and_save(config, params, run, step)
    val = [s.path for s in datasets.list_samples(config.data, "val", seed=config.seed) if s.label == 0]
    assert record["threshold"]["normal_map"]["num_images"] == len(val) >= 3
    assert record["threshold"]["normal_map"]["standardised"] == (mode == "standardise")

    # A float64 reference from the model's own maps (the run without the option).
    plain = Detector.load(smoke_run)
    h, w = plain.height, plain.width
    k = top_k_count(config, h, w)
    val_maps, _ = plain.infer(plain.preprocess(val))
    val_regions = np.stack([foreground_mask(x, "otsu") for x in plain.preprocess(val)])
    ref_map, ref_scores = reference_fit(val_maps.astype(np.float64), k, val_regions, mode == "standardise")
    np.testing.assert_allclose(np.load(os.path.join(run, normal_map.NORMAL_MAP_FILE)), ref_map, atol=1e-6)
    expected = M.calibrate_threshold(ref_scores, config.eval.fpr_target)
    assert record["threshold"]["value"] == pytest.approx(expected, abs=1e-6)

    # The Detector on the run: the same map as without the option, the score of (map - normal map)
    # (divided by its scale to standardise).
    paths = smoke_test_images(run, 8)
    det = Detector.load(run)
    maps, scores = det.infer(det.preprocess(paths))
    plain_maps, plain_scores = plain.infer(plain.preprocess(paths))
    np.testing.assert_allclose(maps, plain_maps, atol=1e-6)
    regions = np.stack([foreground_mask(x, "otsu") for x in plain.preprocess(paths)])
    scored = (plain_maps - ref_map[0]) / ref_map[1] if mode == "standardise" else plain_maps - ref_map
    inside = np.where(regions, scored, -1e9).reshape(len(paths), -1)
    subtracted = np.sort(inside, axis=1)[:, -k:].mean(1)
    np.testing.assert_allclose(scores, subtracted, atol=1e-5)
    assert not np.allclose(scores, plain_scores, atol=1e-3)

    # evaluate: the stored threshold and normal map, the same scores.
    result = evaluate_workdir(run, str(tmp_path / "eval"), show_progress=False)
    assert result["threshold_source"].startswith("stored in detector.json")
    assert result["normal_map"]["num_images"] == len(val)
    with open(tmp_path / "eval" / "scores.csv") as f:
        by_path = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
    evaluated = [by_path[os.path.relpath(p, config.data.root)] for p in paths]
    # Standardised scores are map differences divided by scales of about 0.01: float32 rounding of the
    # map grows with them, so the comparisons below allow a relative error as well.
    np.testing.assert_allclose(evaluated, scores, rtol=1e-5, atol=2e-6)

    # Both exported programs carry the normal map: StableHLO in its params, ONNX as a constant.
    folder = str(tmp_path / "export")
    export_run(run, folder, log=lambda *_: None)
    _, exported_scores = load_stablehlo(folder)(det.preprocess(paths))
    np.testing.assert_allclose(np.asarray(exported_scores), scores, rtol=1e-5, atol=2e-6)
    assert Detector.load(folder, runtime="jax").predict(paths).scores == pytest.approx(scores, rel=1e-5, abs=2e-6)
    assert Detector.load(folder, runtime="onnx").predict(paths).scores == pytest.approx(scores, rel=1e-4, abs=1e-4)


def test_training_with_the_option_validates_without_it_and_writes_the_normal_map(demo_root, tmp_path):
    """Validation during training scores with the model's own map (no normal map exists yet); the end of
    training fits one on the held-out normals and the run loads it with its params."""
    from helpers import tiny_config

    from diff_fastener_jax.data import datasets
    from diff_fastener_jax.deploy import threshold
    from diff_fastener_jax.inference import NORMAL_MAP_PARAM
    from diff_fastener_jax.training.loop import train_and_evaluate
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    config = tiny_config(**{"data.root": demo_root, "infer.normal_map": "subtract", "data.val_fraction": 0.5})
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir, quiet=True)  # validates at steps 3 and 6
    normals = [s for s in datasets.list_samples(config.data, "val", seed=config.seed) if s.label == 0]
    assert threshold.read(workdir)["threshold"]["normal_map"]["num_images"] == len(normals) >= 2
    params, step = load_run_params(workdir, load_run_config(workdir))
    assert step == 6 and params[NORMAL_MAP_PARAM].shape == (32, 32)
    np.testing.assert_array_equal(params[NORMAL_MAP_PARAM], np.load(os.path.join(workdir, normal_map.NORMAL_MAP_FILE)))
    # The option turned off by an override: the same checkpoint loads without a normal map.
    plain, _ = load_run_params(workdir, load_run_config(workdir, {"infer.normal_map": "off"}))
    assert NORMAL_MAP_PARAM not in plain


def test_a_run_without_enough_held_out_normals_is_refused_before_it_starts(demo_root, tmp_path):
    from helpers import tiny_config

    from diff_fastener_jax.errors import UserError
    from diff_fastener_jax.training.loop import train_and_evaluate

    config = tiny_config(**{"data.root": demo_root, "infer.normal_map": "subtract", "data.val_fraction": 0.0})
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match="needs at least 2 held-out normal images, got 0"):
        train_and_evaluate(config, str(workdir), quiet=True)
    assert not workdir.exists()
