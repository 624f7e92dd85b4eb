"""Perlin gradient noise and the thresholded Perlin masks used for anomaly synthesis (DESIGN.md §5).

Everything is vectorised numpy; randomness comes from the `np.random.Generator` passed in, so the same
generator state always gives the same noise.
"""

from __future__ import annotations

import numpy as np

MAX_SCALE_EXPONENT = 5  # scales 2^0 .. 2^5 lattice cells per axis (the paper's range)


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade curve 6t^5 - 15t^4 + 10t^3 (zero first and second derivative at 0 and 1)."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator,
                 angle_deg: float = 0.0) -> np.ndarray:
    """2-D Perlin noise of `shape` (H, W) with `cells` (cy, cx) lattice cells across each axis.

    The lattice wraps around (gradients are indexed modulo the cell count), so the noise is defined at
    any coordinate; this lets us rotate the sampling grid by `angle_deg` about the image centre without
    running off the lattice. Scaled by sqrt(2) so values span about [-1, 1]. Returns float32 (H, W).
    """
    h, w = shape
    cy, cx = max(1, int(cells[0])), max(1, int(cells[1]))
    theta = rng.uniform(0.0, 2.0 * np.pi, size=(cy, cx))
    gy, gx = np.cos(theta).astype(np.float32).ravel(), np.sin(theta).astype(np.float32).ravel()

    yy = (np.arange(h, dtype=np.float32) + 0.5)[:, None]  # (H, 1)
    xx = (np.arange(w, dtype=np.float32) + 0.5)[None, :]  # (1, W)
    if angle_deg:
        # Sample the noise on a rotated grid: equivalent to rotating the noise image.
        a = np.deg2rad(angle_deg)
        dy, dx = yy - h / 2.0, xx - w / 2.0
        yy = np.float32(np.cos(a)) * dy - np.float32(np.sin(a)) * dx + np.float32(h / 2.0)
        xx = np.float32(np.sin(a)) * dy + np.float32(np.cos(a)) * dx + np.float32(w / 2.0)
    u = yy * np.float32(cy / h)  # lattice coordinates, one unit per cell; (H, W) or (H, 1)
    v = xx * np.float32(cx / w)
    fi, fj = np.floor(u), np.floor(v)
    fu, fv = u - fi, v - fj  # position inside the cell, in [0, 1)
    i0, j0 = fi.astype(np.int64) % cy, fj.astype(np.int64) % cx
    i1, j1 = (i0 + 1) % cy, (j0 + 1) % cx

    def corner(ii, jj, oy, ox):
        k = ii * cx + jj  # flat lattice index, broadcast to (H, W)
        return gy[k] * (fu - oy) + gx[k] * (fv - ox)

    n00, n01 = corner(i0, j0, 0.0, 0.0), corner(i0, j1, 0.0, 1.0)
    n10, n11 = corner(i1, j0, 1.0, 0.0), corner(i1, j1, 1.0, 1.0)
    su, sv = _fade(fu), _fade(fv)
    top = n00 + sv * (n01 - n00)
    bottom = n10 + sv * (n11 - n10)
    return (np.float32(np.sqrt(2.0)) * (top + su * (bottom - top))).astype(np.float32)


def max_scale_exponent(size: int) -> int:
    """Largest k with 2^k <= size, capped at MAX_SCALE_EXPONENT (the lattice never exceeds the image)."""
    return int(min(MAX_SCALE_EXPONENT, max(0, np.floor(np.log2(max(1, size))))))


def random_perlin_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise with scale 2^k per axis (k ~ U{0..5} independently, bounded by the image size) and a
    random rotation in [-90, 90) degrees. Returns float32 (H, W)."""
    h, w = shape
    ky = rng.integers(0, max_scale_exponent(h) + 1)
    kx = rng.integers(0, max_scale_exponent(w) + 1)
    angle = rng.uniform(-90.0, 90.0)
    return perlin_noise(shape, (2 ** ky, 2 ** kx), rng, angle_deg=angle)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5) -> np.ndarray:
    """One random thresholded Perlin mask (may be empty). Returns bool (H, W)."""
    return random_perlin_noise(shape, rng) > threshold
