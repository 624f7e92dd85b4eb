"""Metrics against hand-computed cases, sklearn, and an independent brute-force AUPRO."""

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from diff_fastener_jax.evaluation import metrics as M

# ----------------------------------------------------------------------------------------------
# Image level
# ----------------------------------------------------------------------------------------------


def test_image_metrics_perfect_and_inverted():
    labels = np.array([0, 0, 0, 1, 1])
    perfect = M.image_metrics([0.1, 0.2, 0.3, 0.8, 0.9], labels)
    assert perfect == {"image_auroc": 1.0, "image_ap": 1.0, "image_f1_max": 1.0, "image_tpr_at_5fpr": 1.0}
    inverted = M.image_metrics([0.9, 0.8, 0.7, 0.2, 0.1], labels)
    assert inverted["image_auroc"] == 0.0
    assert inverted["image_tpr_at_5fpr"] == 0.0
    # Flagging everything is the best F1 when the order is inverted: P = 2/5, R = 1.
    assert inverted["image_f1_max"] == pytest.approx(2 * 0.4 / 1.4)


def test_image_metrics_hand_case():
    # Descending: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-).
    out = M.image_metrics([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert out["image_auroc"] == pytest.approx(0.75)
    assert out["image_ap"] == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert out["image_f1_max"] == pytest.approx(0.8)  # top 3: P = 2/3, R = 1
    assert out["image_tpr_at_5fpr"] == pytest.approx(0.5)  # no false alarm allowed: only the 0.8
    assert "warnings" not in out


def test_image_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels
    out = M.image_metrics(scores, labels)
    assert out["image_auroc"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert out["image_ap"] == pytest.approx(skm.average_precision_score(labels, scores))
    fpr, tpr, _ = skm.roc_curve(labels, scores)
    assert out["image_tpr_at_5fpr"] == pytest.approx(tpr[fpr <= 0.05].max())
    # F1-max over every threshold, by brute force.
    best = max(skm.f1_score(labels, scores >= t) for t in np.unique(scores))
    assert out["image_f1_max"] == pytest.approx(best)


def test_image_metrics_single_class_gives_nan_and_warning():
    out = M.image_metrics([0.1, 0.2, 0.3], [0, 0, 0])
    assert all(math.isnan(out[k]) for k in ("image_auroc", "image_ap", "image_f1_max", "image_tpr_at_5fpr"))
    assert "normal" in out["warnings"][0]


def test_image_metrics_bad_input():
    with pytest.raises(ValueError, match="labels must be 0"):
        M.image_metrics([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="entries"):
        M.image_metrics([0.1, 0.2], [0])
    with pytest.raises(ValueError, match="NaN"):
        M.image_metrics([0.1, np.nan], [0, 1])


def test_curve_points():
    fpr, tpr, _ = M.roc_curve_points([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    recall, precision, _ = M.pr_curve_points([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert recall.shape == precision.shape and recall.max() == 1


# ----------------------------------------------------------------------------------------------
# Label level
# ----------------------------------------------------------------------------------------------


def test_calibrate_threshold_gives_stated_fpr():
    rng = np.random.default_rng(1)
    normal = rng.normal(size=1000)
    t = M.calibrate_threshold(normal, 0.01)
    assert np.mean(normal > t) == pytest.approx(0.01)  # 10 of 1000 exceed it, no ties
    assert np.mean(normal > np.nextafter(t, -np.inf)) > 0.01  # and it is the smallest such value
    # With ties the rule stays "at most".
    tied = np.array([0.0] * 90 + [1.0] * 10)
    t = M.calibrate_threshold(tied, 0.05)
    assert np.mean(tied > t) <= 0.05
    # Small sets: 1% of 50 allows no false alarm -> the maximum.
    assert M.calibrate_threshold(np.arange(50.0), 0.01) == 49.0
    assert M.calibrate_threshold(np.arange(300.0), 0.01) == 296.0  # 3 of 300 exceed it
    with pytest.raises(ValueError, match="fpr_target"):
        M.calibrate_threshold([1.0], 1.5)


def test_label_metrics_hand_case():
    scores = [0.1, 0.6, 0.3, 0.9, 0.4, 0.7]
    labels = [0, 0, 0, 1, 1, 1]
    out = M.label_metrics(scores, labels, 0.5)  # predicted: 0.6, 0.9, 0.7
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (2, 1, 2, 1)
    assert out["confusion_matrix"] == [[2, 1], [1, 2]]
    assert out["precision"] == pytest.approx(2 / 3)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(4 / 6)
    # Strict rule: a score equal to the threshold is normal.
    assert M.label_metrics([0.5, 0.5], [0, 1], 0.5)["fp"] == 0
    assert math.isnan(M.label_metrics([0.1, 0.2], [0, 1], 0.9)["precision"])


# ----------------------------------------------------------------------------------------------
# Pixel level
# ----------------------------------------------------------------------------------------------


def _blob_maps(seed, n=5, size=16, quantise=None):
    """n random maps in [0, 1] with a few rectangular / diagonal blobs, scores higher on blobs."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n - 1):  # the last image stays normal
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size - 4, 2)
            h, w = rng.integers(1, 5, 2)
            masks[i, r : r + h, c : c + w] = 1
    masks[0, 12, 12] = masks[0, 13, 13] = 1  # a diagonal pair: one region under 8-connectivity
    maps = np.clip(rng.uniform(0, 0.7, masks.shape) + 0.3 * masks * rng.uniform(0, 1, masks.shape), 0, 1)
    if quantise:
        maps = np.round(maps * quantise) / quantise  # creates ties across normal and anomalous pixels
    return maps, masks


def test_pixel_perfect_and_inverted():
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 2:4, 2:4] = 1
    masks[1, 5:7, 1:3] = 1
    good = masks * 0.9 + 0.05
    acc = M.PixelMetricAccumulator()
    acc.update(good, masks)
    out = acc.compute()
    for k in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"):
        assert out[k] == pytest.approx(1.0), k
    assert out["pixel_num_regions"] == 2 and out["pixel_num_pixels"] == 128
    acc = M.PixelMetricAccumulator()
    acc.update(1.0 - good, masks)
    out = acc.compute()
    assert out["pixel_auroc"] == pytest.approx(0.0)
    assert out["pixel_aupro"] == pytest.approx(0.0)


@pytest.mark.parametrize("quantise", [None, 50, 7])
def test_pixel_metrics_equal_sklearn_exactly(quantise):
    maps, masks = _blob_maps(2, quantise=quantise)
    acc = M.PixelMetricAccumulator()
    acc.update(maps[:3], masks[:3])  # two batches: streaming must equal one pass
    acc.update(maps[3:], masks[3:])
    out = acc.compute()
    y, s = masks.ravel(), maps.astype(np.float32).ravel()
    assert out["pixel_auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert out["pixel_ap"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)
    precision, recall, _ = skm.precision_recall_curve(y, s)
    best = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-300))
    assert out["pixel_f1_max"] == pytest.approx(best, abs=1e-12)


def _saturated_maps(seed, n=24, size=64):
    """Sigmoid outputs of a confident network: most pixels below 1e-4, defects near 1 - 1e-6, so
    equal-width bins lump nearly everything into two bins."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n // 2):
        r, c = rng.integers(4, size - 20, 2)
        masks[i, r : r + rng.integers(3, 16), c : c + rng.integers(3, 16)] = 1
    logits = rng.normal(-11.0, 2.5, masks.shape) + masks * rng.normal(12.0, 6.0, masks.shape)
    return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32), masks


def test_pixel_metrics_exact_on_full_saturated_maps():
    # A binned accumulator (10,000 bins) is off by 0.03 on maps like these; this one is exact.
    maps, masks = _saturated_maps(11)
    acc = M.PixelMetricAccumulator()
    for i in range(0, len(maps), 5):
        acc.update(maps[i : i + 5], masks[i : i + 5])
    out = acc.compute()
    y, s = masks.ravel(), maps.ravel()
    assert out["pixel_auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-9)
    assert out["pixel_ap"] == pytest.approx(skm.average_precision_score(y, s), abs=1e-9)
    # Brute-force AUPRO on a subset small enough to loop over every threshold.
    sub_maps, sub_masks = np.round(maps[::4], 3), masks[::4]
    assert M.aupro_exact(sub_maps, sub_masks, 0.3) == pytest.approx(
        _aupro_brute_force(sub_maps.astype(np.float32), sub_masks, 0.3), abs=1e-9
    )
    assert out["pixel_num_pixels"] == maps.size and acc.num_pixels == (int(y.sum()), int((1 - y).sum()))


def _aupro_brute_force(maps, masks, limit):
    """Independent AUPRO: loop over every distinct score as threshold (score >= t is anomalous)."""
    regions = []  # boolean masks of each 8-connected region, per image
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            regions.append((i, lab == r))
    normal = masks == 0
    points = {(0.0, 0.0)}
    for t in np.unique(maps):
        pred = maps >= t
        fpr = pred[normal].sum() / normal.sum()
        pro = np.mean([pred[i][reg].mean() for i, reg in regions])
        points.add((float(fpr), float(pro)))
    pts = sorted(points)
    # Area of each segment's part inside [0, limit].
    area = 0.0
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:], strict=True):
        if x0 >= limit or x1 == x0:
            continue
        xe = min(x1, limit)
        ye = y0 + (y1 - y0) * (xe - x0) / (x1 - x0)
        area += (xe - x0) * (y0 + ye) / 2
    return area / limit


@pytest.mark.parametrize("seed,quantise", [(4, None), (5, 8), (6, 20)])
def test_aupro_exact_matches_brute_force(seed, quantise):
    maps, masks = _blob_maps(seed, quantise=quantise)
    for limit in (0.3, 0.05, 1.0):
        assert M.aupro_exact(maps, masks, limit) == pytest.approx(_aupro_brute_force(maps, masks, limit), abs=1e-10)


def test_aupro_regions_are_8_connected():
    masks = np.zeros((1, 6, 6), np.uint8)
    masks[0, 1, 1] = masks[0, 2, 2] = 1  # diagonal neighbours: one region
    acc = M.PixelMetricAccumulator()
    acc.update(np.zeros((1, 6, 6)), masks)
    assert acc.num_regions == 1


def test_pixel_accumulator_merge_equals_single_pass():
    maps, masks = _blob_maps(8)
    a, b, whole = (M.PixelMetricAccumulator() for _ in range(3))
    a.update(maps[:2], masks[:2])
    b.update(maps[2:], masks[2:])
    whole.update(maps, masks)
    a.merge(b)
    assert a.compute() == pytest.approx(whole.compute())


def test_pixel_accumulator_degenerate_and_bad_input():
    acc = M.PixelMetricAccumulator()
    acc.update(np.full((1, 4, 4), 0.2), np.zeros((1, 4, 4)))
    out = acc.compute()
    assert math.isnan(out["pixel_auroc"]) and out["warnings"]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        acc.update(np.full((1, 4, 4), 1.5), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="shape"):
        acc.update(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
    with pytest.raises(ValueError, match="binary"):
        acc.update(np.zeros((1, 4, 4)), np.full((1, 4, 4), 0.5))


def test_integrate_to_limit_interpolates():
    # PRO = FPR line: area to 0.3 is 0.045, normalised 0.15, although no point sits at 0.3.
    assert M.integrate_to_limit([0.0, 0.2, 0.6, 1.0], [0.0, 0.2, 0.6, 1.0], 0.3) == pytest.approx(0.15)


# ----------------------------------------------------------------------------------------------
# Aggregates
# ----------------------------------------------------------------------------------------------


def test_per_defect_metrics_and_no_masks():
    maps, masks = _blob_maps(9, n=6)
    labels = masks.reshape(6, -1).max(1)  # images 0..4 anomalous, 5 normal
    scores = maps.reshape(6, -1).max(1)
    defects = ["crack", "crack", "scratch", "scratch", "scratch", "good"]
    out = M.per_defect_metrics(scores, labels, defects, maps, masks, threshold=0.5)
    assert sorted(out) == ["crack", "scratch"]
    assert out["crack"]["num_images"] == 2 and out["scratch"]["num_images"] == 3
    sel = np.array([0, 1, 5])
    assert out["crack"]["image_auroc"] == pytest.approx(skm.roc_auc_score(labels[sel], scores[sel]))
    ref = M.pixel_metrics(maps[sel], masks[sel])
    assert out["crack"]["pixel_aupro"] == pytest.approx(ref["pixel_aupro"])
    assert out["crack"]["has_masks"] and "recall" in out["crack"]

    no_masks = M.per_defect_metrics(scores, labels, defects)
    assert no_masks["crack"]["has_masks"] is False
    assert all(v is None for k, v in no_masks["crack"].items() if k.startswith("pixel_"))
    allm = M.compute_all_metrics(scores, labels, threshold=0.5)
    assert allm["has_masks"] is False and "image_auroc" in allm
    # a split without pixel labels: null pixel metrics (not NaN, not missing) and one line saying so
    assert [allm[k] for k in ("pixel_auroc", "pixel_ap", "pixel_aupro")] == [None, None, None]
    assert allm["pixel_metrics_note"] == M.NO_PIXEL_LABELS_NOTE


def _direct_per_defect(scores, labels, defects, maps, masks, name):
    """Reference: one defect's images + every normal image, metrics straight from sklearn / brute force."""
    sel = np.array([(y == 1 and d == name) or y == 0 for y, d in zip(labels, defects, strict=True)])
    y_px, s_px = masks[sel].ravel(), maps[sel].astype(np.float32).ravel()
    return {
        "num_normal": int((labels[sel] == 0).sum()),
        "image_auroc": skm.roc_auc_score(labels[sel], scores[sel]),
        "pixel_auroc": skm.roc_auc_score(y_px, s_px),
        "pixel_aupro": _aupro_brute_force(maps[sel].astype(np.float32), masks[sel], 0.3),
    }


def test_streaming_per_defect_includes_every_normal_image_whatever_the_order():
    # Sorted test folders: 'good' comes before defects named after it (missing_clip), so the normal
    # images arrive in batches before that defect first appears.
    rng = np.random.default_rng(12)
    maps, masks = _blob_maps(13, n=10, quantise=40)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 1])
    masks[labels == 0] = 0
    for i in np.flatnonzero(labels == 1):
        masks[i, 3:6, 3:6] = 1
    defects = ["good"] * 4 + ["broken", "broken", "missing", "good", "missing", "missing"]
    scores = rng.uniform(size=10)
    ev = M.StreamingEvaluation(with_pixels=True)
    for i in range(0, 10, 3):  # batches of 3: 'missing' first appears in the third batch
        ev.update(scores[i : i + 3], labels[i : i + 3], defects[i : i + 3], maps[i : i + 3], masks[i : i + 3])
    out = ev.compute(threshold=0.5)
    assert sorted(out["per_defect"]) == ["broken", "missing"]
    for name in ("broken", "missing"):
        ref = _direct_per_defect(scores, labels, defects, maps, masks, name)
        got = out["per_defect"][name]
        assert got["num_images"] == (2 if name == "broken" else 3)
        n_pixels = (ref["num_normal"] + got["num_images"]) * maps[0].size
        assert got["pixel_num_pixels"] == n_pixels  # every normal image's pixels are in
        for k in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            assert got[k] == pytest.approx(ref[k], abs=1e-9), (name, k)
    whole = M.pixel_metrics(maps, masks)
    for k in ("pixel_auroc", "pixel_ap", "pixel_aupro"):
        assert out[k] == pytest.approx(whole[k], abs=1e-12)
    assert out["num_images"] == 10 and out["num_anomalous"] == 5 and "recall" in out
