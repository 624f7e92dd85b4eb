"""Random P x P training crops (`data.patch_size`): where a crop goes, and cutting it.

Patch training keeps images at their resized size and trains on crops of it, so a defect keeps its
real size in pixels and a training step costs a P x P step whatever the image size. Crop positions
come from the training pair's own `np.random.Generator`, so they are deterministic per seed and pair.
"""

from __future__ import annotations

import numpy as np

from diff_fastener_jax.config import ConfigError


def check_fits(hw: tuple[int, int], patch: int, where: str) -> None:
    """Raises ConfigError naming data.patch_size when a P x P crop does not fit an image of `hw`."""
    if patch > min(hw):
        raise ConfigError(
            f"data.patch_size: {patch} px crops do not fit {where}, resized to "
            f"{hw[0]} x {hw[1]} (data.image_size / data.resize)",
            hint=f"e.g. --config.data.patch_size={min(hw)} or a larger data.image_size",
        )


def random_box(
    hw: tuple[int, int], patch: int, rng: np.random.Generator, anchor: np.ndarray | None = None
) -> tuple[int, int]:
    """(y0, x0) of a P x P crop inside an image of `hw`, uniform over the positions; with `anchor`
    (bool (H, W), e.g. the foreground) a random anchor pixel is drawn first and the crop is uniform over
    the positions that contain it (so the crop always holds some anchor pixel; an empty anchor is ignored)."""
    h, w = int(hw[0]), int(hw[1])
    check_fits((h, w), patch, "the image")
    if anchor is not None and anchor.any():
        ys, xs = np.nonzero(anchor)
        k = int(rng.integers(ys.size))
        y, x = int(ys[k]), int(xs[k])
        y0 = int(rng.integers(max(0, y - patch + 1), min(y, h - patch) + 1))
        x0 = int(rng.integers(max(0, x - patch + 1), min(x, w - patch) + 1))
        return y0, x0
    return int(rng.integers(0, h - patch + 1)), int(rng.integers(0, w - patch + 1))


def crop(a: np.ndarray, box: tuple[int, int], patch: int) -> np.ndarray:
    """a[y0:y0 + P, x0:x0 + P] (any trailing dimensions)."""
    y0, x0 = box
    return a[y0 : y0 + patch, x0 : x0 + patch]
