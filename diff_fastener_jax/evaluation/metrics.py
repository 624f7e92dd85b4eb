"""Evaluation metrics (the protocol of Diff-Fastener and DiffusionAD): image, exact streaming pixel
metrics and AUPRO, label level, and
the one streaming evaluation (overall + per defect) that `evaluate` and training-time validation share.

Conventions used throughout:
- Scores are "higher = more anomalous"; labels / masks are 1 for anomalous, 0 for normal.
- Undefined metrics (e.g. AUROC when the labels hold a single class) are returned as NaN, and the
  returned dict then carries a `warnings` list of strings saying why. Pixel metrics of a split that
  has no pixel labels at all are None (null in metrics.json), with `pixel_metrics_note` saying so. The key is present ONLY when
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


def _sklearn_metrics():
    """sklearn.metrics, imported on first use: sklearn and scipy.stats take about 1 s to import, which
    every command (train, evaluate, predict, serve, even --help) paid at start-up before."""
    from sklearn import metrics

    return metrics


def _ndimage():
    """scipy.ndimage, imported on first use (see `_sklearn_metrics`)."""
    from scipy import ndimage

    return ndimage


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
        raise ValueError(
            f"{where}: scores contain NaN or inf (first bad index {int(np.flatnonzero(~np.isfinite(s))[0])})"
        )
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
    # Scores are probabilities (segmentation sigmoid or a halved [-1, 1] difference).
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
        out["warnings"] = [
            f"image metrics undefined: all {y.size} labels are {only}; need both normal and anomalous images"
        ]
        return out
    skm = _sklearn_metrics()
    fpr, tpr, _ = skm.roc_curve(y, s, drop_intermediate=False)
    return {
        "image_auroc": float(skm.roc_auc_score(y, s)),
        "image_ap": float(skm.average_precision_score(y, s)),
        "image_f1_max": _f1_max(s, y),
        "image_tpr_at_5fpr": float(tpr[fpr <= 0.05].max()),
    }


def _f1_max(s: np.ndarray, y: np.ndarray) -> float:
    precision, recall, _ = _sklearn_metrics().precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1.0), 0.0)
    return float(f1.max())


def roc_curve_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the ROC curve (sklearn.metrics.roc_curve). Needs both classes."""
    s, y = _as_scores_labels(scores, labels, "roc_curve_points")
    return _sklearn_metrics().roc_curve(y, s)


def pr_curve_points(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(recall, precision, thresholds) of the precision-recall curve (sklearn). Needs positives."""
    s, y = _as_scores_labels(scores, labels, "pr_curve_points")
    precision, recall, thresholds = _sklearn_metrics().precision_recall_curve(y, s)
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


def label_metrics(scores, labels, threshold) -> dict:
    """Precision, recall, F1, accuracy and the confusion matrix at `threshold` (anomalous iff score > threshold).

    `threshold` is one value or one per image (a unified model's per-category thresholds); the record's
    "threshold" is then None.

    confusion_matrix = [[tn, fp], [fn, tp]] (rows: true normal / anomalous; columns: predicted).
    Precision is NaN when nothing is predicted anomalous, recall NaN when there are no anomalies,
    F1 = 2tp / (2tp + fp + fn) NaN only when both are absent.
    """
    s, y = _as_scores_labels(scores, labels, "label_metrics")
    thr = np.asarray(threshold, np.float64)
    pred = s > (thr.reshape(-1) if thr.ndim else float(thr))
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    tn = int(np.sum(~pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    return {
        "threshold": None if thr.ndim else float(thr),
        "precision": tp / (tp + fp) if tp + fp else math.nan,
        "recall": tp / (tp + fn) if tp + fn else math.nan,
        "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else math.nan,
        "accuracy": (tp + tn) / y.size,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
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


def aupro_exact(maps, masks, limit: float = 0.3) -> float:
    """Exact normalised area under the PRO curve up to FPR `limit` of in-memory maps / masks (N, H, W).

    Raises ValueError when there are no normal pixels or no ground-truth regions."""
    out = pixel_metrics(maps, masks, aupro_limit=limit)
    if math.isnan(out["pixel_aupro"]):
        raise ValueError(f"aupro_exact: need normal pixels and ground-truth regions ({'; '.join(out['warnings'])})")
    return out["pixel_aupro"]


# ----------------------------------------------------------------------------------------------
# Pixel level, streaming and exact
# ----------------------------------------------------------------------------------------------

_PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
NO_PIXEL_LABELS_NOTE = "no pixel labels in this split (image labels only): pixel metrics are null"


def no_pixel_metrics() -> dict:
    """The pixel entries of a split without pixel labels: every pixel metric None, and the one-line note."""
    return {**{k: None for k in _PIXEL_KEYS}, "pixel_metrics_note": NO_PIXEL_LABELS_NOTE}


class PixelMetricAccumulator:
    """Exact streaming pixel AUROC / AP / F1-max / AUPRO over every pixel seen.

    The state is the pixel scores themselves, held as float32 (the networks' output type, so nothing
    is rounded): 4 bytes per normal pixel and 12 per ground-truth pixel (its score and its AUPRO
    weight 1 / region size, float64), e.g. about 270 MB for 1000 images at 256². `compute()` sorts once and walks
    every distinct score as a threshold (anomalous iff score >= threshold), so the results equal
    sklearn's `roc_auc_score` / `average_precision_score` and the exact PRO curve on the same pixels.
    Regions are 8-connected per image (REGION_STRUCTURE).
    """

    def __init__(self, aupro_limit: float = 0.3):
        if not 0.0 < aupro_limit <= 1.0:
            raise ValueError(
                f"PixelMetricAccumulator: aupro_limit (eval.aupro_limit) must be in (0, 1], got {aupro_limit}"
            )
        self.aupro_limit = float(aupro_limit)
        self._neg: list[np.ndarray] = []  # float32 scores of normal pixels
        self._pos: list[np.ndarray] = []  # float32 scores of ground-truth pixels
        self._weight: list[np.ndarray] = []  # float64 1 / (size of the pixel's region)
        self.num_regions = 0
        self.num_images = 0

    def update(self, anomaly_maps, masks) -> None:
        """Adds a batch: anomaly_maps (N, H, W) float in [0, 1]; masks (N, H, W) {0, 1} (or bool)."""
        a, m = _check_maps_masks(anomaly_maps, masks, "PixelMetricAccumulator.update")
        a = a.astype(np.float32)
        self._neg.append(a[~m])
        for a_img, m_img in zip(a, m, strict=True):
            if not m_img.any():
                continue
            lab, n = _ndimage().label(m_img, structure=REGION_STRUCTURE)
            size = np.bincount(lab.ravel(), minlength=n + 1)
            sel = lab > 0
            self._pos.append(a_img[sel])
            self._weight.append(1.0 / size[lab[sel]])  # float64: sums over many pixels stay exact
            self.num_regions += n
        self.num_images += a.shape[0]

    def merge(self, other: PixelMetricAccumulator) -> None:
        """Adds another accumulator's pixels (e.g. another host's, or the normal images' of a test set)."""
        if other.aupro_limit != self.aupro_limit:
            raise ValueError("PixelMetricAccumulator.merge: aupro_limit differs")
        self._neg += other._neg
        self._pos += other._pos
        self._weight += other._weight
        self.num_regions += other.num_regions
        self.num_images += other.num_images

    @property
    def num_pixels(self) -> tuple[int, int]:
        """(anomalous, normal) pixel counts seen so far."""
        return sum(x.size for x in self._pos), sum(x.size for x in self._neg)

    def curves(self) -> dict:
        """Exact curves over every distinct score, high to low, with a leading 'nothing flagged' point.

        Returns thresholds (K + 1,) (the first is +inf), tp, fp (pixel counts with score >= threshold),
        tpr, fpr, pro (NaN when there are no regions).
        """
        neg = np.sort(np.concatenate(self._neg)) if self._neg else np.zeros(0, np.float32)
        pos = np.concatenate(self._pos) if self._pos else np.zeros(0, np.float32)
        weight = np.concatenate(self._weight) if self._weight else np.zeros(0)
        order = np.argsort(pos, kind="stable")
        pos, weight = pos[order], weight[order]
        P, N = pos.size, neg.size
        thresholds = np.union1d(neg, pos)[::-1]  # distinct scores, descending
        fp = N - np.searchsorted(neg, thresholds, side="left")  # scores >= t
        tp = P - np.searchsorted(pos, thresholds, side="left")
        # The tp highest positives are exactly those >= t; their weights sum to the region fractions.
        top_weight = np.concatenate([[0.0], np.cumsum(weight[::-1], dtype=np.float64)])
        tp, fp = np.concatenate([[0], tp]), np.concatenate([[0], fp])
        with np.errstate(invalid="ignore", divide="ignore"):
            tpr = tp / P if P else np.full(tp.shape, np.nan)
            fpr = fp / N if N else np.full(fp.shape, np.nan)
            pro = np.minimum(top_weight[tp] / self.num_regions, 1.0) if self.num_regions else np.full(tp.shape, np.nan)
        if self.num_regions:
            pro[-1] = 1.0  # float sums of 1/size over a region are 1 up to rounding
        return {
            "thresholds": np.concatenate([[np.inf], thresholds]),
            "tp": tp,
            "fp": fp,
            "tpr": tpr,
            "fpr": fpr,
            "pro": pro,
        }

    def compute(self) -> dict:
        """pixel_auroc, pixel_ap, pixel_f1_max, pixel_aupro, pixel_num_regions, pixel_num_pixels.

        Without both anomalous and normal pixels the metrics are NaN and `warnings` says why.
        """
        P, N = self.num_pixels
        out = {k: math.nan for k in _PIXEL_KEYS}
        out.update(pixel_num_regions=int(self.num_regions), pixel_num_pixels=int(P + N))
        if P == 0 or N == 0:
            out["warnings"] = [
                f"pixel metrics undefined: {P} anomalous and {N} normal pixels seen "
                f"over {self.num_images} images; need both"
            ]
            return out
        c = self.curves()
        tp, fp, tpr, fpr, pro = c["tp"], c["fp"], c["tpr"], c["fpr"], c["pro"]
        out["pixel_auroc"] = float(_trapezoid(tpr, fpr))
        # AP as sklearn.average_precision_score: recall steps times the precision at each threshold.
        precision = tp[1:] / np.maximum(tp[1:] + fp[1:], 1)
        out["pixel_ap"] = float(np.sum(np.diff(tpr) * precision))
        f1 = 2 * tp / np.maximum(2 * tp + fp + (P - tp), 1)  # 2tp / (2tp + fp + fn)
        out["pixel_f1_max"] = float(f1.max())
        if self.num_regions == 0:
            out["warnings"] = ["pixel AUPRO undefined: no ground-truth regions"]
        else:
            out["pixel_aupro"] = integrate_to_limit(fpr, pro, self.aupro_limit)
        return out


def pixel_metrics(maps, masks, *, aupro_limit: float = 0.3, batch_size: int = 64) -> dict:
    """Exact pixel metrics of in-memory maps (N, H, W) / masks (N, H, W), fed in chunks."""
    acc = PixelMetricAccumulator(aupro_limit=aupro_limit)
    for i in range(0, len(maps), batch_size):
        acc.update(maps[i : i + batch_size], masks[i : i + batch_size])
    return acc.compute()


# ----------------------------------------------------------------------------------------------
# Aggregates: one streaming evaluation, overall and per defect type
# ----------------------------------------------------------------------------------------------


class StreamingEvaluation:
    """Image scores and pixel maps fed batch by batch (any order); overall and per-defect metrics.

    Each defect type is scored on (its anomalous images + EVERY normal image). Normal images' pixels
    are held once, in their own accumulator, and joined to each defect's at `compute()`, so a defect
    first seen in a late batch still sees the normal images of earlier batches. An image is normal
    iff its label is 0, whatever its defect name.
    """

    def __init__(self, *, with_pixels: bool, aupro_limit: float = 0.3):
        self.with_pixels = bool(with_pixels)
        self.aupro_limit = float(aupro_limit)
        self._scores: list[float] = []
        self._labels: list[int] = []
        self._defects: list[str] = []
        self._normal_px = PixelMetricAccumulator(aupro_limit)
        self._defect_px: dict[str, PixelMetricAccumulator] = {}

    def update(self, scores, labels, defects, maps=None, masks=None) -> None:
        """scores (B,), labels (B,) {0, 1}, defects (B,) names; with pixels, maps / masks (B, H, W)."""
        s, y = _as_scores_labels(scores, labels, "StreamingEvaluation.update")
        d = [str(x) for x in defects]
        if len(d) != s.size:
            raise ValueError(f"StreamingEvaluation.update: defects has {len(d)} entries but scores has {s.size}")
        if self.with_pixels:
            if maps is None or masks is None:
                raise ValueError("StreamingEvaluation.update: maps and masks are required (with_pixels=True)")
            maps, masks = np.asarray(maps), np.asarray(masks)
            if len(maps) != s.size or len(masks) != s.size:
                raise ValueError(
                    f"StreamingEvaluation.update: maps/masks have {len(maps)}/{len(masks)} entries, scores {s.size}"
                )
            normal = np.flatnonzero(y == 0)
            if normal.size:
                self._normal_px.update(maps[normal], masks[normal])
            for name in sorted({d[i] for i in np.flatnonzero(y == 1)}):
                idx = [i for i in range(s.size) if y[i] == 1 and d[i] == name]
                acc = self._defect_px.setdefault(name, PixelMetricAccumulator(self.aupro_limit))
                acc.update(maps[idx], masks[idx])
        self._scores += s.tolist()
        self._labels += y.tolist()
        self._defects += d

    @property
    def num_images(self) -> int:
        return len(self._scores)

    def _pixels(self, names) -> PixelMetricAccumulator:
        acc = PixelMetricAccumulator(self.aupro_limit)
        acc.merge(self._normal_px)
        for name in names:
            acc.merge(self._defect_px[name])
        return acc

    def compute(self, threshold: float | None = None) -> dict:
        """{has_masks, num_images, num_anomalous, image_*, [pixel_*], [label metrics], per_defect}.

        per_defect maps each anomalous defect name to {num_images, has_masks, image_*, [pixel_*],
        [precision, recall, f1]}; `warnings` lists are merged, never overwritten.
        """
        s, y = np.asarray(self._scores, np.float64), np.asarray(self._labels, np.int64)
        d = np.asarray(self._defects, dtype=object)
        out = {"has_masks": self.with_pixels, "num_images": int(s.size), "num_anomalous": int(y.sum())}
        _merge_warnings(out, image_metrics(s, y))
        if self.with_pixels:
            _merge_warnings(out, self._pixels(sorted(self._defect_px)).compute())
        else:
            out.update(no_pixel_metrics())
        if threshold is not None:
            out.update(label_metrics(s, y, threshold))
        per_defect = {}
        for name in sorted(set(d[y == 1].tolist())):
            own = (d == name) & (y == 1)
            sel = own | (y == 0)
            entry = {"num_images": int(own.sum()), "has_masks": self.with_pixels}
            _merge_warnings(entry, image_metrics(s[sel], y[sel]))
            if self.with_pixels:
                _merge_warnings(entry, self._pixels([name]).compute())
            else:
                entry.update({k: None for k in _PIXEL_KEYS})
            if threshold is not None:
                thr = np.asarray(threshold, np.float64)
                lm = label_metrics(s[sel], y[sel], thr.reshape(-1)[sel] if thr.ndim else thr)
                entry.update({k: lm[k] for k in ("precision", "recall", "f1")})
            per_defect[name] = entry
        out["per_defect"] = per_defect
        return out


def per_defect_metrics(
    scores, labels, defects, maps=None, masks=None, *, threshold: float | None = None, aupro_limit: float = 0.3
) -> dict:
    """Metrics per defect type, each on (that type's images + every normal image), in memory.

    scores (N,), labels (N,) {0,1}, defects (N,) names (normal images are those with label 0,
    whatever their name). maps / masks (N, H, W) are optional: without masks the entries carry
    `has_masks: False` and None pixel metrics. With `threshold`, label precision/recall/F1 are added.
    Returns {defect: {num_images, has_masks, image_*, [pixel_*], [precision, recall, f1]}}.
    """
    ev = StreamingEvaluation(with_pixels=maps is not None and masks is not None, aupro_limit=aupro_limit)
    ev.update(scores, labels, defects, maps, masks)
    return ev.compute(threshold)["per_defect"]


def _merge_warnings(dst: dict, src: dict) -> None:
    """dst.update(src), concatenating their `warnings` lists instead of overwriting."""
    warns = list(dst.get("warnings", [])) + list(src.get("warnings", []))
    dst.update(src)
    if warns:
        dst["warnings"] = warns


def compute_all_metrics(
    scores, labels, *, maps=None, masks=None, threshold: float | None = None, aupro_limit: float = 0.3
) -> dict:
    """Image metrics, exact pixel metrics when masks are given (`has_masks` says which) and, with a
    threshold, label metrics: one flat dict (warnings merged)."""
    ev = StreamingEvaluation(with_pixels=maps is not None and masks is not None, aupro_limit=aupro_limit)
    labels = np.asarray(labels).reshape(-1)
    ev.update(scores, labels, ["good" if v == 0 else "anomaly" for v in labels], maps, masks)
    out = ev.compute(threshold)
    for k in ("per_defect", "num_images", "num_anomalous"):
        out.pop(k)
    return out
