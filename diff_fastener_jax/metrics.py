"""Evaluation metrics (DESIGN.md §8): image, pixel (streaming, bounded memory), AUPRO, label level.

Conventions used throughout:
- Scores are "higher = more anomalous"; labels / masks are 1 for anomalous, 0 for normal.
- Undefined metrics (e.g. AUROC when the labels hold a single class) are returned as NaN, and the
  returned dict then carries a `warnings` list of strings saying why. The key is present ONLY when
  something was undefined, so `dict.update` of several results does not clobber a warning with an
  empty list; callers that merge results should merge `warnings` lists themselves if they care.
- Pixel connectivity for AUPRO regions: 8-connectivity (`scipy.ndimage.label` with a full 3x3
  structure), as in the MVTec AD evaluation code (`structure = np.ones((3, 3))`).
- Label-level decision: an image is predicted anomalous iff `score > threshold` (strict), which is
  the rule `calibrate_threshold` is built for.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from sklearn import metrics as skm

# 8-connectivity: diagonal neighbours belong to the same ground-truth region (MVTec AD convention).
REGION_STRUCTURE = np.ones((3, 3), dtype=int)

# numpy >= 2 renamed trapz to trapezoid; the project allows numpy 1.26.
_trapezoid = getattr(np, "trapezoid", None) or np.trapz

_IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max", "image_tpr_at_5fpr")


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------

def _as_scores_labels(scores, labels, where: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{where}: scores has {s.size} entries but labels has {y.size}")
    if s.size == 0:
        raise ValueError(f"{where}: no scores given")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{where}: scores contain NaN or inf (first bad index {int(np.flatnonzero(~np.isfinite(s))[0])})")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"{where}: labels must be 0 (normal) or 1 (anomalous), got values {np.unique(y)[:10]}")
    return s, y.astype(np.int64)


def _check_maps_masks(maps, masks, where: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(maps)
    m = np.asarray(masks)
    if a.ndim != 3:
        raise ValueError(f"{where}: anomaly maps must be (N, H, W), got shape {a.shape}")
    if m.shape != a.shape:
        raise ValueError(f"{where}: masks shape {m.shape} does not match anomaly maps shape {a.shape}")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{where}: anomaly maps contain NaN or inf")
    # Scores are probabilities: the fixed bin edges cover exactly [0, 1].
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
        raise ValueError(f"{where}: anomaly maps must lie in [0, 1] (got min {a.min():.4g}, max {a.max():.4g})")
    if m.dtype != bool:
        if not np.all((m == 0) | (m == 1)):
            raise ValueError(f"{where}: masks must be binary 0/1, got values {np.unique(m)[:10]}")
        m = m.astype(bool)
    return a, m


# ----------------------------------------------------------------------------------------------
# Image level
# ----------------------------------------------------------------------------------------------

def image_metrics(scores, labels) -> dict:
    """Image-level AUROC, AP, F1-max and TPR at 5% FPR.

    scores: (N,) float, higher = more anomalous; labels: (N,) {0, 1}.
    `image_tpr_at_5fpr` is the largest TPR reachable by a threshold whose FPR is <= 0.05 (no
    interpolation between ROC points). With a single class present every value is NaN and the dict
    gets `warnings: [reason]`.
    """
    s, y = _as_scores_labels(scores, labels, "image_metrics")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "anomalous (1)" if n_pos else "normal (0)"
        out = {k: math.nan for k in _IMAGE_KEYS}
        out["warnings"] = [f"image metrics undefined: all {y.size} labels are {only}; "
                           "need both normal and anomalous images"]
        return out
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return {
        "image_auroc": float(skm.roc_auc_score(y, s)),
        "image_ap": float(skm.average_precision_score(y, s)),
        "image_f1_max": _f1_max(s, y),
        "image_tpr_at_5fpr": float(tpr[fpr <= 0.05].max()),
    }


def _f1_max(s: np.ndarray, y: np.ndarray) -> float:
    precision, recall, _ = skm.precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1.0), 0.0)
    return float(f1.max())


def roc_curve_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the ROC curve (sklearn.metrics.roc_curve). Needs both classes."""
    s, y = _as_scores_labels(scores, labels, "roc_curve_points")
    return skm.roc_curve(y, s)


def pr_curve_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, thresholds) of the precision-recall curve (sklearn). Needs positives."""
    s, y = _as_scores_labels(scores, labels, "pr_curve_points")
    precision, recall, thresholds = skm.precision_recall_curve(y, s)
    return recall, precision, thresholds


# ----------------------------------------------------------------------------------------------
# Label level
# ----------------------------------------------------------------------------------------------

def calibrate_threshold(normal_val_scores, fpr_target: float = 0.01) -> float:
    """Image-score threshold at which at most `fpr_target` of the normal validation scores exceed it.

    Rule: with n sorted scores s_(1) <= ... <= s_(n) and k = floor(fpr_target * n) scores allowed to
    be false alarms, the threshold is s_(n-k), the (n-k)-th smallest score. Under the decision rule
    `anomalous iff score > threshold` at most k scores (fewer with ties at s_(n-k)) are flagged, so
    the calibration FPR is <= fpr_target, and it is the smallest data value with that property. For
    small n the realised FPR can be well below the target (n=50 at 1% gives k=0: the maximum).
    """
    s = np.asarray(normal_val_scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise ValueError("calibrate_threshold: no normal validation scores given")
    if not np.all(np.isfinite(s)):
        raise ValueError("calibrate_threshold: normal validation scores contain NaN or inf")
    if not 0.0 <= fpr_target < 1.0:
        raise ValueError(f"calibrate_threshold: fpr_target (eval.fpr_target) must be in [0, 1), got {fpr_target}")
    n = s.size
    # The epsilon guards floor() against 0.01 * 300 evaluating to 2.9999999999999996.
    k = min(int(math.floor(fpr_target * n + 1e-9)), n - 1)
    return float(np.sort(s)[n - k - 1])


def label_metrics(scores, labels, threshold: float) -> dict:
    """Precision, recall, F1, accuracy and the confusion matrix at `threshold` (anomalous iff score > threshold).

    confusion_matrix = [[tn, fp], [fn, tp]] (rows: true normal / anomalous; columns: predicted).
    Precision is NaN when nothing is predicted anomalous, recall NaN when there are no anomalies,
    F1 = 2tp / (2tp + fp + fn) NaN only when both are absent.
    """
    s, y = _as_scores_labels(scores, labels, "label_metrics")
    pred = s > float(threshold)
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return {
        "threshold": float(threshold),
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan,
        "accuracy": (tp + tn) / y.size,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


# ----------------------------------------------------------------------------------------------
# PRO curve helpers
# ----------------------------------------------------------------------------------------------

def integrate_to_limit(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoid area under (fpr, pro) for fpr in [0, limit], divided by `limit`.

    The points must be ordered by non-decreasing fpr and start at fpr 0. The curve value at exactly
    `limit` is linearly interpolated between the last point at or below the limit and the next one.
    """
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"AUPRO integration limit (eval.aupro_limit) must be in (0, 1], got {limit}")
    fpr = np.asarray(fpr, dtype=np.float64)
    pro = np.asarray(pro, dtype=np.float64)
    n = int(np.searchsorted(fpr, limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:n], pro[:n]
    if n < fpr.size and x[-1] < limit:
        x0, x1, y0, y1 = fpr[n - 1], fpr[n], pro[n - 1], pro[n]
        x = np.append(x, limit)
        y = np.append(y, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(_trapezoid(y, x) / limit)


def pro_curve_exact(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """Exact PRO curve: (fpr, pro), one point per distinct score plus (0, 0), non-decreasing fpr.

    maps (N, H, W) anomaly scores; masks (N, H, W) {0,1}. A pixel is predicted anomalous iff its
    score >= threshold; thresholds run over every distinct score (high to low). FPR is the
    fraction of normal pixels (mask 0, all images) predicted anomalous; PRO is the mean over
    8-connected ground-truth regions of the fraction of the region predicted anomalous. Sorts all
    pixels: memory O(total pixels), meant for small sets and for validating the binned version.
    """
    a, m = _check_maps_masks(maps, masks, "pro_curve_exact")
    normal_scores, region_scores, region_weights = [], [], []
    sizes = []
    for amap, mask in zip(a, m, strict=True):
        lab, n = ndimage.label(mask, structure=REGION_STRUCTURE)
        normal_scores.append(amap[lab == 0])
        if n:
            size = np.bincount(lab.ravel(), minlength=n + 1)
            sel = lab > 0
            region_scores.append(amap[sel])
            region_weights.append(1.0 / size[lab[sel]])
            sizes.append(size[1:])
    n_regions = int(sum(len(z) for z in sizes))
    neg = np.concatenate(normal_scores)
    if neg.size == 0 or n_regions == 0:
        raise ValueError(f"pro_curve_exact: need normal pixels and anomalous regions "
                         f"(got {neg.size} normal pixels, {n_regions} regions)")
    pos = np.concatenate(region_scores)
    # Each normal pixel moves FPR by 1/#normal; each region pixel moves PRO by 1/(#regions * its region size).
    scores = np.concatenate([neg, pos])
    d_fpr = np.concatenate([np.full(neg.size, 1.0 / neg.size), np.zeros(pos.size)])
    d_pro = np.concatenate([np.zeros(neg.size), np.concatenate(region_weights) / n_regions])
    order = np.argsort(-scores, kind="stable")
    scores, fpr, pro = scores[order], np.cumsum(d_fpr[order]), np.cumsum(d_pro[order])
    # One point per distinct score: the last position of each tie group (all tied pixels flip together).
    last = np.append(scores[1:] != scores[:-1], True)
    fpr = np.concatenate([[0.0], fpr[last]])
    pro = np.concatenate([[0.0], pro[last]])
    # Cumulative sums of 1/n drift by ~1e-16; pin the final point to exactly (1, 1).
    fpr[-1], pro[-1] = 1.0, 1.0
    return np.minimum(fpr, 1.0), np.minimum(pro, 1.0)


def aupro_exact(maps, masks, limit: float = 0.3) -> float:
    """Exact (unbinned) normalised area under the PRO curve up to FPR `limit` (see pro_curve_exact)."""
    fpr, pro = pro_curve_exact(maps, masks)
    return integrate_to_limit(fpr, pro, limit)


# ----------------------------------------------------------------------------------------------
# Pixel level, streaming
# ----------------------------------------------------------------------------------------------

class PixelMetricAccumulator:
    """Streaming pixel AUROC / AP / F1-max / AUPRO with memory independent of the test-set size.

    Scores in [0, 1] fall into `num_bins` equal-width bins (bin b = [b/num_bins, (b+1)/num_bins),
    the last bin closed). The state is three length-`num_bins` arrays: counts of anomalous and of
    normal pixels per bin, and, for AUPRO, the sum over ground-truth regions of (region pixels in
    the bin / region size), plus the number of regions. Thresholds sit on bin edges, so every
    binned metric equals the exact metric of the scores quantised to their bin index, and the
    binned curves are points of the exact curves. Error bounds reported by `compute()`:

    - `pixel_auroc_bin_error_bound` = 0.5 * (anomalous-normal pixel pairs sharing a bin) / (P * N):
      pairs in different bins are ordered exactly; a same-bin pair counts 1/2 where the exact
      AUROC counts 0, 1/2 or 1.
    - `pixel_ap_bin_error_bound`: each positive's precision term is evaluated inside its bin,
      where precision is bounded by the counts above the bin plus 1..p_b positives and 0..n_b
      negatives of the bin; the bound sums p_b / P * (max - min) of that range over bins.
    - `pixel_aupro_bin_error_bound`: the exact PRO curve between two consecutive binned points is
      monotone, so it lies in their bounding box; the bound sums the box areas (clipped to the
      integration limit) divided by the limit.
    F1-max is the best over bin-edge thresholds, a lower bound of the exact F1-max.
    """

    def __init__(self, num_bins: int = 10000, aupro_limit: float = 0.3):
        if int(num_bins) < 2:
            raise ValueError(f"PixelMetricAccumulator: num_bins (eval.pixel_bins) must be >= 2, got {num_bins}")
        if not 0.0 < aupro_limit <= 1.0:
            raise ValueError(f"PixelMetricAccumulator: aupro_limit (eval.aupro_limit) must be in (0, 1], got {aupro_limit}")
        self.num_bins = int(num_bins)
        self.aupro_limit = float(aupro_limit)
        self.pos_hist = np.zeros(self.num_bins, np.int64)  # anomalous pixels per bin
        self.neg_hist = np.zeros(self.num_bins, np.int64)  # normal pixels per bin
        self.region_frac_hist = np.zeros(self.num_bins, np.float64)  # sum over regions of count/size
        self.num_regions = 0
        self.num_images = 0

    def _bin(self, scores: np.ndarray) -> np.ndarray:
        # floor(s * nb) is monotone in s, so {bin >= b} is always an upper set of scores (a threshold).
        return np.minimum((scores * self.num_bins).astype(np.int64), self.num_bins - 1)

    def update(self, anomaly_maps, masks) -> None:
        """Adds a batch: anomaly_maps (N, H, W) float in [0, 1]; masks (N, H, W) {0, 1} (or bool)."""
        a, m = _check_maps_masks(anomaly_maps, masks, "PixelMetricAccumulator.update")
        bins = self._bin(a)  # (N, H, W)
        nb = self.num_bins
        self.pos_hist += np.bincount(bins[m], minlength=nb)
        self.neg_hist += np.bincount(bins[~m], minlength=nb)
        for b_img, m_img in zip(bins, m, strict=True):
            if not m_img.any():
                continue
            lab, n = ndimage.label(m_img, structure=REGION_STRUCTURE)
            size = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
            sel = lab > 0
            self.region_frac_hist += np.bincount(b_img[sel], weights=1.0 / size[lab[sel]], minlength=nb)
            self.num_regions += n
        self.num_images += a.shape[0]

    def merge(self, other: PixelMetricAccumulator) -> None:
        """Adds another accumulator's state (e.g. from another host); bins and limit must match."""
        if other.num_bins != self.num_bins or other.aupro_limit != self.aupro_limit:
            raise ValueError("PixelMetricAccumulator.merge: num_bins / aupro_limit differ")
        self.pos_hist += other.pos_hist
        self.neg_hist += other.neg_hist
        self.region_frac_hist += other.region_frac_hist
        self.num_regions += other.num_regions
        self.num_images += other.num_images

    def curves(self) -> dict:
        """Binned curves, ordered by decreasing threshold (from 'nothing flagged' to 'all flagged').

        Returns thresholds (num_bins + 1,) = bin lower edges plus 1 + 1/num_bins for the empty set,
        tp, fp (counts of pixels with bin >= threshold's bin), fpr, tpr, pro (NaN if no regions).
        """
        nb = self.num_bins
        # Reverse cumulative sums with a leading 0 for "threshold above every bin".
        tp = np.concatenate([[0], np.cumsum(self.pos_hist[::-1])])
        fp = np.concatenate([[0], np.cumsum(self.neg_hist[::-1])])
        pro_sum = np.concatenate([[0.0], np.cumsum(self.region_frac_hist[::-1])])
        thresholds = np.arange(nb, -1, -1) / nb
        thresholds[0] = 1.0 + 1.0 / nb
        P, N = tp[-1], fp[-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            tpr = tp / P if P else np.full(tp.shape, np.nan)
            fpr = fp / N if N else np.full(fp.shape, np.nan)
            pro = np.minimum(pro_sum / self.num_regions, 1.0) if self.num_regions else np.full(tp.shape, np.nan)
        if self.num_regions:
            pro[-1] = 1.0  # the float sum of count/size over a region is 1 up to rounding
        return {"thresholds": thresholds, "tp": tp, "fp": fp, "tpr": tpr, "fpr": fpr, "pro": pro}

    def compute(self) -> dict:
        """pixel_auroc, pixel_ap, pixel_f1_max, pixel_aupro (+ their bin error bounds, counts).

        Without both anomalous and normal pixels the metrics are NaN and `warnings` says why.
        """
        P, N = int(self.pos_hist.sum()), int(self.neg_hist.sum())
        out = {"pixel_auroc": math.nan, "pixel_ap": math.nan, "pixel_f1_max": math.nan,
               "pixel_aupro": math.nan, "pixel_auroc_bin_error_bound": math.nan,
               "pixel_ap_bin_error_bound": math.nan, "pixel_aupro_bin_error_bound": math.nan,
               "pixel_num_regions": int(self.num_regions), "pixel_num_bins": self.num_bins}
        if P == 0 or N == 0:
            out["warnings"] = [f"pixel metrics undefined: {P} anomalous and {N} normal pixels seen "
                               f"over {self.num_images} images; need both"]
            return out
        c = self.curves()
        tp, fp, tpr, fpr, pro = c["tp"], c["fp"], c["tpr"], c["fpr"], c["pro"]
        out["pixel_auroc"] = float(_trapezoid(tpr, fpr))
        pos, neg = self.pos_hist.astype(np.float64), self.neg_hist.astype(np.float64)
        out["pixel_auroc_bin_error_bound"] = float(0.5 * np.dot(pos, neg) / (float(P) * float(N)))

        # AP = sum over thresholds of (recall step) * precision, as sklearn.average_precision_score.
        # Index i of tp/fp (i >= 1) covers bins >= nb - i; the step adds the positives of bin nb - i.
        p_b = np.diff(tp).astype(np.float64)  # positives entering at each step
        tp_hi, fp_hi = tp[1:].astype(np.float64), fp[1:].astype(np.float64)
        tp_lo, fp_lo = tp[:-1].astype(np.float64), fp[:-1].astype(np.float64)
        has = p_b > 0
        prec = np.where(has, tp_hi / np.maximum(tp_hi + fp_hi, 1.0), 0.0)
        out["pixel_ap"] = float(np.sum(p_b * prec) / P)
        # Range of the precision a positive of this bin can see in the exact ordering.
        prec_max = np.where(has, tp_hi / np.maximum(tp_hi + fp_lo, 1.0), 0.0)
        prec_min = np.where(has, (tp_lo + 1.0) / np.maximum(tp_lo + 1.0 + fp_hi, 1.0), 0.0)
        out["pixel_ap_bin_error_bound"] = float(np.sum(p_b * (prec_max - prec_min)) / P)

        denom = 2 * tp + (fp + (P - tp))  # 2tp + fp + fn
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
        out["pixel_f1_max"] = float(f1.max())

        if self.num_regions == 0:
            out["warnings"] = ["pixel AUPRO undefined: no ground-truth regions"]
        else:
            limit = self.aupro_limit
            out["pixel_aupro"] = integrate_to_limit(fpr, pro, limit)
            x0, x1 = np.minimum(fpr[:-1], limit), np.minimum(fpr[1:], limit)
            out["pixel_aupro_bin_error_bound"] = float(np.sum((x1 - x0) * np.diff(pro)) / limit)
        return out


def pixel_metrics(maps, masks, *, num_bins: int = 10000, aupro_limit: float = 0.3,
                  batch_size: int = 64) -> dict:
    """Binned pixel metrics of in-memory maps (N, H, W) / masks (N, H, W), fed in chunks."""
    acc = PixelMetricAccumulator(num_bins=num_bins, aupro_limit=aupro_limit)
    for i in range(0, len(maps), batch_size):
        acc.update(maps[i:i + batch_size], masks[i:i + batch_size])
    return acc.compute()


# ----------------------------------------------------------------------------------------------
# Aggregates
# ----------------------------------------------------------------------------------------------

def per_defect_metrics(scores, labels, defects, maps=None, masks=None, *, threshold: float | None = None,
                       num_bins: int = 10000, aupro_limit: float = 0.3) -> dict:
    """Metrics per defect type, each on (that type's images + every normal image).

    scores (N,), labels (N,) {0,1}, defects (N,) names (normal images are those with label 0,
    whatever their name). maps / masks (N, H, W) are optional: without masks the entries carry
    `has_masks: False` and no pixel keys. With `threshold`, label precision/recall/F1 are added.
    Returns {defect: {num_images, has_masks, image_*, [pixel_*], [precision, recall, f1]}}.
    """
    s, y = _as_scores_labels(scores, labels, "per_defect_metrics")
    d = np.asarray([str(x) for x in defects])
    if d.size != s.size:
        raise ValueError(f"per_defect_metrics: defects has {d.size} entries but scores has {s.size}")
    has_masks = maps is not None and masks is not None
    if has_masks and (len(maps) != s.size or len(masks) != s.size):
        raise ValueError(f"per_defect_metrics: maps/masks have {len(maps)}/{len(masks)} entries, scores {s.size}")
    normal = y == 0
    out = {}
    for name in sorted(set(d[y == 1].tolist())):
        sel = ((d == name) & (y == 1)) | normal
        entry = {"num_images": int(np.sum((d == name) & (y == 1))), "has_masks": has_masks}
        entry.update(image_metrics(s[sel], y[sel]))
        if has_masks:
            idx = np.flatnonzero(sel)
            px = pixel_metrics(np.asarray(maps)[idx], np.asarray(masks)[idx], num_bins=num_bins,
                               aupro_limit=aupro_limit)
            _merge_warnings(entry, px)
        if threshold is not None:
            lm = label_metrics(s[sel], y[sel], threshold)
            entry.update({k: lm[k] for k in ("precision", "recall", "f1")})
        out[name] = entry
    return out


def _merge_warnings(dst: dict, src: dict) -> None:
    """dst.update(src), concatenating their `warnings` lists instead of overwriting."""
    warns = list(dst.get("warnings", [])) + list(src.get("warnings", []))
    dst.update(src)
    if warns:
        dst["warnings"] = warns


def compute_all_metrics(scores, labels, *, maps=None, masks=None, threshold: float | None = None,
                        num_bins: int = 10000, aupro_limit: float = 0.3) -> dict:
    """Image metrics, pixel metrics when masks are given (`has_masks` says which) and, with a
    threshold, label metrics: one flat dict (warnings merged)."""
    out = {"has_masks": maps is not None and masks is not None}
    _merge_warnings(out, image_metrics(scores, labels))
    if out["has_masks"]:
        _merge_warnings(out, pixel_metrics(maps, masks, num_bins=num_bins, aupro_limit=aupro_limit))
    if threshold is not None:
        out.update(label_metrics(scores, labels, threshold))
    return out
