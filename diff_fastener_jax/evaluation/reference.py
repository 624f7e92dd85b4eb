"""Reference detectors: simple baselines fitted on the training normals and scored on the same test split.

They say what a detector must beat to have learnt anything about the defects:

* 'global_stats': four grey-level statistics of the whole image (mean, standard deviation, 1st and
  99th percentile). Each is scored two-sided, as the distance |s - mean| / std from the training
  normals' distribution of that statistic, so no direction is learnt from test labels. The entry reports
  every statistic's image AUROC and the best of them (an optimistic choice among four: a bar to clear).
* 'pixel_gaussian': a Gaussian per pixel and channel of the training normals at the evaluation
  resolution; the anomaly map is the root-mean-square z-score over channels (mapped to [0, 1) by
  z / (1 + z), which keeps every ranking), smoothed like the model's map; the image score is the top-K
  mean, with the model's K, of the map smoothed like the model's scored map. It has image and pixel
  metrics.

Only training normals are used to fit; test labels only score the result.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from diff_fastener_jax.config_schema import REFERENCE_DETECTORS
from diff_fastener_jax.evaluation import metrics as M

GLOBAL_STATISTICS = ("mean", "std", "dark_p1", "bright_p99")
STD_FLOOR = 1e-3  # on [-1, 1] images: a pixel or statistic that never varies in the normals
PIXEL_STD_FLOOR = 0.02  # about 2.5 grey levels: sensor noise the few normals may not show


def grey(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) in [-1, 1] -> (N, H, W) float64 channel mean."""
    return np.asarray(images, np.float64).mean(axis=-1)


def global_statistics(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> (N, 4) float64: GLOBAL_STATISTICS of each image's grey values."""
    g = grey(images).reshape(len(images), -1)
    return np.stack([g.mean(1), g.std(1), np.percentile(g, 1, axis=1), np.percentile(g, 99, axis=1)], axis=1)


def selected(which: str) -> tuple[str, ...]:
    """`eval.reference` -> the detectors to run (REFERENCE_DETECTORS)."""
    if which not in REFERENCE_DETECTORS:
        raise ValueError(f"eval.reference must be one of {REFERENCE_DETECTORS}, got {which!r}")
    return {"all": ("global_stats", "pixel_gaussian"), "none": ()}.get(which, (which,))


class ReferenceDetectors:
    """Fit on normal batches (`fit`), then feed test batches (`update`) and `compute` the metrics.

    `top_k`: K of the image score of the pixel Gaussian; `smooth`: (rows (H, H), cols (W, W)) smoothing
    matrices for its map, or None; `score_smooth`: the same for the map its image score is read from
    (the model's `infer.score_sigma`), or None for the map itself.
    """

    def __init__(
        self,
        which: tuple[str, ...],
        *,
        top_k: int,
        smooth=None,
        score_smooth=None,
        with_pixels: bool,
        aupro_limit: float = 0.3,
    ):
        self.which = tuple(which)
        self.top_k = int(top_k)
        self.smooth = smooth
        self.score_smooth = score_smooth
        self.with_pixels = bool(with_pixels)
        self._stats_normal: list[np.ndarray] = []
        self._sum = self._sum_sq = None
        self._count = 0
        self._fitted = False
        self._stats_test: list[np.ndarray] = []
        self._labels: list[int] = []
        self._gaussian = M.StreamingEvaluation(with_pixels=with_pixels, aupro_limit=aupro_limit)

    def fit(self, batches: Iterable[np.ndarray]) -> None:
        """Training normals, (b, H, W, C) in [-1, 1] per batch."""
        for images in batches:
            images = np.asarray(images, np.float64)
            self._stats_normal.append(global_statistics(images))
            if self._sum is None:
                self._sum, self._sum_sq = np.zeros(images.shape[1:]), np.zeros(images.shape[1:])
            self._sum += images.sum(0)
            self._sum_sq += (images**2).sum(0)
            self._count += len(images)
        if self._count < 2:
            raise ValueError(f"reference detectors: need at least 2 training normals to fit, got {self._count}")
        stats = np.concatenate(self._stats_normal)
        self.stat_mean, self.stat_std = stats.mean(0), np.maximum(stats.std(0, ddof=1), STD_FLOOR)
        self.pixel_mean = self._sum / self._count  # (H, W, C)
        var = (self._sum_sq - self._count * self.pixel_mean**2) / (self._count - 1)
        self.pixel_std = np.maximum(np.sqrt(np.maximum(var, 0.0)), PIXEL_STD_FLOOR)
        self._fitted = True

    def maps(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pixel Gaussian's (map, the map its image score is read from) of (N, H, W, C) images, each
        (N, H, W) float64 in [0, 1), from one z-score pass; the second is the first when `score_smooth`
        is None."""
        z = (np.asarray(images, np.float64) - self.pixel_mean) / self.pixel_std
        z = np.sqrt((z**2).mean(-1))  # (N, H, W)

        def squashed(smooth):
            if smooth is None:
                return z / (1.0 + z)
            rows, cols = smooth
            zs = np.matmul(np.matmul(rows, z), cols.T)  # (H, H) @ (N, H, W) @ (W, W): two matmuls
            return zs / (1.0 + zs)

        amap = squashed(self.smooth)
        return amap, (amap if self.score_smooth is None else squashed(self.score_smooth))

    def update(self, images: np.ndarray, labels, defects, masks=None) -> None:
        """One test batch: images (b, H, W, C), labels (b,), defect names, masks (b, H, W) when with_pixels."""
        if not self._fitted:
            raise RuntimeError("reference detectors: fit() on the training normals before update()")
        self._stats_test.append(global_statistics(images))
        self._labels += np.asarray(labels).reshape(-1).tolist()
        if "pixel_gaussian" in self.which:
            amap, scored = self.maps(images)
            flat = np.sort(scored.reshape(len(scored), -1), axis=1)[:, -self.top_k :]
            self._gaussian.update(
                flat.mean(1), labels, defects, amap if self.with_pixels else None, masks if self.with_pixels else None
            )

    def compute(self) -> dict:
        """{'global_stats': {image_auroc, statistic, per_statistic}, 'pixel_gaussian': {image_auroc,
        pixel_auroc, pixel_aupro, ...}} for the selected detectors."""
        out: dict = {}
        y = np.asarray(self._labels, np.int64)
        if "global_stats" in self.which:
            z = np.abs(np.concatenate(self._stats_test) - self.stat_mean) / self.stat_std  # (N, 4)
            per = {name: M.image_metrics(z[:, j], y).get("image_auroc") for j, name in enumerate(GLOBAL_STATISTICS)}
            finite = {k: v for k, v in per.items() if v is not None and np.isfinite(v)}
            best = max(finite, key=finite.get) if finite else None
            out["global_stats"] = {
                "image_auroc": finite[best] if best else None,
                "statistic": best,
                "per_statistic": per,
            }
        if "pixel_gaussian" in self.which:
            res = self._gaussian.compute()
            out["pixel_gaussian"] = {
                k: res.get(k) for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pixel_aupro")
            }
        return out


def beaten_note(model: dict, reference: dict) -> list[str]:
    """One line per reference detector whose image AUROC (or pixel AUROC) the model does not beat."""
    lines = []
    for name, ref in reference.items():
        for key in ("image_auroc", "pixel_auroc"):
            r, m = ref.get(key), model.get(key)
            if r is None or m is None or not (np.isfinite(r) and np.isfinite(m)):
                continue
            if m <= r:
                what = f" ({ref['statistic']})" if ref.get("statistic") else ""
                lines.append(
                    f"The model does not beat the reference detector {name}{what} on {key}: {m:.4f} against {r:.4f}."
                )
    return lines
