"""Reference detectors: fitted on normals only, known answers on a tiny synthetic split."""

import numpy as np
import pytest

from diff_fastener_jax.evaluation import reference


def _split(seed=0, n_train=12, n_test=8, size=16):
    """Normals: one fixed pattern plus small noise. Anomalies: a normal with a bright 3 x 3 square at a
    random place (a pixel-level change that barely moves the image mean)."""
    rng = np.random.default_rng(seed)
    pattern = rng.uniform(-0.5, 0.5, (size, size, 3))
    normal = lambda n: pattern + 0.01 * rng.standard_normal((n, size, size, 3))  # noqa: E731
    train = normal(n_train)
    test = normal(n_test)
    labels = np.array([0, 1] * (n_test // 2))
    masks = np.zeros((n_test, size, size))
    for i in np.flatnonzero(labels):
        r, c = rng.integers(0, size - 3, 2)
        test[i, r : r + 3, c : c + 3] = 0.95
        masks[i, r : r + 3, c : c + 3] = 1
    return train, test, labels, masks


def test_pixel_gaussian_finds_the_planted_squares_and_global_stats_report_each_statistic():
    train, test, labels, masks = _split()
    ref = reference.ReferenceDetectors(("global_stats", "pixel_gaussian"), top_k=4, with_pixels=True)
    ref.fit([train[:5], train[5:]])  # batches of normals: the fit streams
    np.testing.assert_allclose(ref.pixel_mean, train.mean(0), atol=1e-12)
    np.testing.assert_allclose(ref.stat_mean, reference.global_statistics(train).mean(0), atol=1e-12)
    ref.update(test[:4], labels[:4], ["good", "square"] * 2, masks[:4])
    ref.update(test[4:], labels[4:], ["good", "square"] * 2, masks[4:])
    out = ref.compute()
    gauss = out["pixel_gaussian"]
    assert gauss["image_auroc"] == 1.0 and gauss["pixel_auroc"] > 0.99 and gauss["pixel_aupro"] > 0.9
    stats = out["global_stats"]
    assert set(stats["per_statistic"]) == set(reference.GLOBAL_STATISTICS)
    assert stats["image_auroc"] == max(stats["per_statistic"].values())
    # the brightest percentile sees nine saturated pixels out of 256: a planted bright square is found
    assert stats["per_statistic"]["bright_p99"] == 1.0 and stats["statistic"] in ("bright_p99", "std", "mean")


def test_fit_uses_normals_only_and_scores_two_sided():
    """The same normals, test images darker or brighter than them by the same amount: the same scores."""
    rng = np.random.default_rng(3)
    train = rng.normal(0, 0.05, (10, 8, 8, 3))
    ref = reference.ReferenceDetectors(("global_stats",), top_k=1, with_pixels=False)
    ref.fit([train])
    centre = np.full((1, 8, 8, 3), ref.stat_mean[0])  # flat images at the normals' mean grey level
    dark, bright = centre - 0.3, centre + 0.3
    ref.update(np.concatenate([dark, bright, train[:1]]), [1, 1, 0], ["dark", "bright", "good"])
    z = np.abs(reference.global_statistics(np.concatenate([dark, bright]))[:, 0] - ref.stat_mean[0])
    assert z[0] == pytest.approx(z[1])
    assert ref.compute()["global_stats"]["per_statistic"]["mean"] == 1.0


def test_reference_needs_a_fit_and_known_names():
    ref = reference.ReferenceDetectors(("pixel_gaussian",), top_k=1, with_pixels=False)
    with pytest.raises(RuntimeError, match="fit"):
        ref.update(np.zeros((1, 4, 4, 3)), [0], ["good"])
    with pytest.raises(ValueError, match="at least 2"):
        ref.fit([np.zeros((1, 4, 4, 3))])
    with pytest.raises(ValueError, match="eval.reference"):
        reference.selected("magic")
    assert reference.selected("all") == ("global_stats", "pixel_gaussian") and reference.selected("none") == ()


def test_beaten_note_names_the_detector_the_model_does_not_beat():
    ref = {
        "global_stats": {"image_auroc": 0.8, "statistic": "mean"},
        "pixel_gaussian": {"image_auroc": 0.6, "pixel_auroc": None},
    }
    lines = reference.beaten_note({"image_auroc": 0.7, "pixel_auroc": None}, ref)
    assert lines == [
        "The model does not beat the reference detector global_stats (mean) on image_auroc: 0.7000 against 0.8000."
    ]


def test_pixel_gaussian_map_is_the_smoothed_squashed_z_score():
    from scipy.ndimage import gaussian_filter

    from diff_fastener_jax.inference import smoothing_matrix

    rng = np.random.default_rng(0)
    ref = reference.ReferenceDetectors(
        ("pixel_gaussian",), top_k=3, with_pixels=False, smooth=(smoothing_matrix(20, 2.0), smoothing_matrix(30, 2.0))
    )
    ref.fit([rng.normal(size=(5, 20, 30, 3))])
    x = rng.normal(size=(2, 20, 30, 3))
    z = np.sqrt((((x - ref.pixel_mean) / ref.pixel_std) ** 2).mean(-1))  # float64 reference
    z = gaussian_filter(z, (0, 2.0, 2.0), mode="reflect", truncate=4.0)
    np.testing.assert_allclose(ref.maps(x)[0], z / (1 + z), atol=1e-12)


def test_pixel_gaussian_scores_the_map_smoothed_like_the_models_score():
    """With `score_smooth` (the model's infer.score_sigma) the image score is the top-K mean of the map
    smoothed by it; the pixel map keeps `smooth` (infer.map_sigma)."""
    from scipy.ndimage import gaussian_filter

    from diff_fastener_jax.inference import smoothing_matrix

    rng = np.random.default_rng(1)
    ref = reference.ReferenceDetectors(
        ("pixel_gaussian",),
        top_k=3,
        with_pixels=True,
        smooth=(smoothing_matrix(20, 3.0), smoothing_matrix(30, 3.0)),
        score_smooth=(smoothing_matrix(20, 0.0), smoothing_matrix(30, 0.0)),  # the identity: unsmoothed
    )
    ref.fit([rng.normal(size=(5, 20, 30, 3))])
    x = rng.normal(size=(2, 20, 30, 3))
    z = np.sqrt((((x - ref.pixel_mean) / ref.pixel_std) ** 2).mean(-1))  # float64 reference, (2, 20, 30)
    wide = gaussian_filter(z, (0, 3.0, 3.0), mode="reflect", truncate=4.0)
    returned, scored = ref.maps(x)
    np.testing.assert_allclose(returned, wide / (1 + wide), atol=1e-12)
    np.testing.assert_allclose(scored, z / (1 + z), atol=1e-12)
    ref.update(x, [0, 1], ["good", "bad"], np.zeros((2, 20, 30), np.uint8))
    want = np.sort((z / (1 + z)).reshape(2, -1), axis=1)[:, -3:].mean(1)
    np.testing.assert_allclose(ref._gaussian._scores, want, atol=1e-12)
