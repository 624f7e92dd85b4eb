"""The normal map (`infer.normal_map='subtract'` or 'standardise'): per pixel, the mean anomaly map of
the held-out normal images (and, to standardise, their spread).

On an object seen in one pose the networks answer its fixed structure (a bottle's rings, a plate's
edge) with the same faint response in every image, and a faint real defect elsewhere does not outscore
it. The normal map is that shared response: the mean of the held-out normals' maps, blurred by
BLUR_SIGMA px at 256² so that it removes a region's level and not the exact pixels of a few images.
The inference program subtracts it before taking the image score (inference.NORMAL_MAP_PARAM).

'standardise' also divides by how much the normals vary there: the per-pixel standard deviation of
the blurred maps plus its median over the image (so that a pixel where every normal agrees is not
divided by zero). Where the normals' responses spread (a glass rim's highlight, which moves a little
from bottle to bottle) a response counts less than the same response where they agree. Its array is
(2, H, W): [mean, scale]; the program scores (map - mean) / scale.

It is fitted in the same pass as the threshold, on the same held-out normals (`threshold.calibrate`).
Each normal's calibration score is taken against the normal map of the OTHER normals (leave-one-out):
against a mean that contains its own map, a calibration image would score lower than any unseen normal
and the threshold would sit too low.
"""

from __future__ import annotations

import os

import numpy as np

from diff_fastener_jax.config_schema import FITTED_NORMAL_MAPS
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.foreground import OUTSIDE_REGION

NORMAL_MAP_FILE = "normal_map.npy"
# Blur of the mean map, sigma in pixels at 256² (scaled with the side of the map, like infer.map_sigma).
BLUR_SIGMA = 8.0
# The leave-one-out calibration needs another normal to compare each one with ('subtract'), or two
# others to measure a spread ('standardise').
MIN_NORMALS = 2
MIN_NORMALS_STANDARDISED = 3
# The scale's floor (map units) where every normal's map is the same: the division stays finite.
MIN_SCALE = 1e-6


def fitted(config) -> bool:
    """Whether `config` scores with a normal map fitted on the held-out normals."""
    return config.infer.normal_map in FITTED_NORMAL_MAPS


def standardised(config) -> bool:
    return config.infer.normal_map == "standardise"


def array_shape(config, height: int, width: int) -> tuple[int, ...]:
    """The normal map's shape for an (height, width) map: (H, W), or (2, H, W) [mean, scale] to standardise."""
    return (2, height, width) if standardised(config) else (height, width)


def neutral(config, height: int, width: int) -> np.ndarray:
    """The normal map that leaves the program's scores the model's own: zero mean, unit scale."""
    if standardised(config):
        return np.stack([np.zeros((height, width), np.float32), np.ones((height, width), np.float32)])
    return np.zeros((height, width), np.float32)


def min_normals(mode: str) -> int:
    """How many held-out normals the `infer.normal_map` mode needs."""
    return MIN_NORMALS_STANDARDISED if mode == "standardise" else MIN_NORMALS


def blur_sigma(height: int, width: int) -> float:
    """BLUR_SIGMA at 256², in pixels of a (height, width) map (scaled with the square root of its area)."""
    return BLUR_SIGMA * float(np.sqrt(height * width)) / 256.0


def blur_matrices(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows (H, H), cols (W, W)) float64: rows @ m @ cols.T is m blurred by `blur_sigma`."""
    from diff_fastener_jax.inference import smoothing_matrix

    sigma = blur_sigma(height, width)
    return smoothing_matrix(height, sigma), smoothing_matrix(width, sigma)


def check_count(num_normals: int, mode: str) -> None:
    """UserError unless there are enough held-out normals to fit an `infer.normal_map` `mode` map."""
    need = min_normals(mode)
    if num_normals < need:
        raise UserError(
            f"infer.normal_map={mode!r}: needs at least {need} held-out normal images, got {num_normals}",
            hint="raise data.val_fraction (or add normal training images), or set infer.normal_map='off'",
        )


def fit(
    maps: np.ndarray, k: int, regions: np.ndarray | None = None, *, standardise: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(normal map float32 (H, W), or (2, H, W) [mean, scale] to `standardise`; leave-one-out scores (n,)
    float64) of the held-out normals' maps `maps` (n, H, W), as the inference program returns them;
    `k`: the program's top-K; `regions` (n, H, W) bool: where each image's score is taken
    (`infer.score_region`), None for everywhere.

    Score i is the top-K mean of maps[i] minus the blurred mean of the other n - 1 maps (divided by
    their scale to standardise; OUTSIDE_REGION outside its region, as in the program). The blur is
    linear, so each image's leave-one-out mean is (sum - blur(maps[i])) / (n - 1), and its variance
    comes from the sum of squares the same way.
    """
    maps = np.asarray(maps, np.float64)
    n = maps.shape[0]
    check_count(n, "standardise" if standardise else "subtract")
    rows, cols = blur_matrices(maps.shape[1], maps.shape[2])
    # Two broadcast matmuls (BLAS), not one three-operand einsum: numpy's unoptimised einsum loops over
    # all five indices (n * H^2 * W^2 multiply-adds: minutes for 21 maps of 256²).
    blurred = rows @ maps @ cols.T  # (n, H, W)
    total, total_sq = blurred.sum(axis=0), (blurred * blurred).sum(axis=0)  # (H, W)

    def summary(s1, s2, count):  # the mean map, and the scale map of `count` blurred maps
        mean = s1 / count
        if not standardise:
            return mean, 1.0
        spread = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))  # (H, W)
        return mean, spread + max(float(np.median(spread)), MIN_SCALE)

    scores = np.empty(n)
    for i in range(n):
        mean, scale_map = summary(total - blurred[i], total_sq - blurred[i] ** 2, n - 1)
        scored = (maps[i] - mean) / scale_map
        if regions is not None:
            scored = np.where(regions[i], scored, OUTSIDE_REGION)
        flat = np.sort(scored.reshape(-1))
        scores[i] = flat[-k:].mean()
    mean, scale_map = summary(total, total_sq, n)
    normal_map = np.stack([mean, scale_map]) if standardise else mean
    return normal_map.astype(np.float32), scores


def attach(params, normal_map: np.ndarray) -> dict:
    """`params` with `normal_map` as params[NORMAL_MAP_PARAM], replacing any it carried (a new dict; the
    networks' trees shared)."""
    from diff_fastener_jax.inference import NORMAL_MAP_PARAM

    return {**params, NORMAL_MAP_PARAM: np.asarray(normal_map, np.float32)}


def missing(config, params) -> bool:
    """Whether `config` scores with a normal map (`fitted`) that `params` lacks: it must then be fitted
    (`threshold.calibrate`) before the program can run."""
    from diff_fastener_jax.inference import NORMAL_MAP_PARAM

    return fitted(config) and NORMAL_MAP_PARAM not in (params or {})


def save(folder: str, normal_map: np.ndarray) -> str:
    """Writes <folder>/normal_map.npy atomically (a crash never leaves half a file); returns its path."""
    path = os.path.join(folder, NORMAL_MAP_FILE)
    tmp = path + ".tmp.npy"
    np.save(tmp, np.asarray(normal_map, np.float32))
    os.replace(tmp, path)
    return path


def load(folder: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """<folder>/normal_map.npy, or None when the folder has none. UserError when it is not a float32
    array of `shape` (`array_shape`) or holds non-finite values."""
    path = os.path.join(folder, NORMAL_MAP_FILE)
    if not os.path.isfile(path):
        return None
    try:
        normal_map = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable .npy array ({e})") from e
    if normal_map.shape != tuple(shape) or normal_map.dtype != np.float32 or not np.isfinite(normal_map).all():
        raise UserError(
            f"{path}: expected a finite float32 array of shape {tuple(shape)}, got {normal_map.dtype} {normal_map.shape}",
            hint="training writes it with detector.json; evaluate --recalibrate fits one afresh for its evaluation",
        )
    return normal_map
