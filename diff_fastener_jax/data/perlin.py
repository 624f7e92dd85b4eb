"""Perlin gradient noise and the thresholded Perlin masks used for anomaly synthesis.

Everything is vectorised numpy; randomness comes from the `np.random.Generator` passed in, so the same
generator state always gives the same noise.
"""

from __future__ import annotations

import numpy as np

MAX_SCALE_EXPONENT = 5  # scales 2^0 .. 2^5 lattice cells per axis (the paper's range, at 256 px)
# The paper's finest lattice cell is 256 / 2^5 = 8 px. At smaller images the scale range is cut so no
# cell gets smaller than that: at 64 px 2^5 cells would be 2 px wide and the thresholded masks become
# speckle and one-pixel slivers that look like no real defect.
MIN_CELL_PX = 8


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade curve 6t^5 - 15t^4 + 10t^3 (zero first and second derivative at 0 and 1)."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator, angle_deg: float = 0.0
) -> np.ndarray:
    """2-D Perlin noise of `shape` (H, W) with `cells` (cy, cx) lattice cells across each axis.

    A lattice of cy x cx cells has (cy + 1) x (cx + 1) gradient corners; nothing wraps, so even a single
    cell has four independent corners (a wrapped lattice would give one cell one shared gradient and
    noise that never reaches the mask threshold). With `angle_deg` the sampling grid is rotated about the
    image centre, and the lattice is enlarged just enough to cover the rotated grid (cell size kept),
    which is equivalent to rotating a larger noise image. Scaled by sqrt(2) so values span about
    [-1, 1]. Returns float32 (H, W).
    """
    h, w = shape
    cy, cx = max(1, int(cells[0])), max(1, int(cells[1]))
    yy = (np.arange(h, dtype=np.float64) + 0.5)[:, None]  # (H, 1) pixel centres
    xx = (np.arange(w, dtype=np.float64) + 0.5)[None, :]  # (1, W)
    if angle_deg:
        a = np.deg2rad(angle_deg)
        dy, dx = yy - h / 2.0, xx - w / 2.0
        yy = np.cos(a) * dy - np.sin(a) * dx + h / 2.0  # (H, W)
        xx = np.sin(a) * dy + np.cos(a) * dx + w / 2.0
    u = yy * (cy / h)  # lattice coordinates, one unit per cell
    v = xx * (cx / w)
    # Shift so the grid starts at lattice corner 0; the lattice spans [0, ny] x [0, nx].
    u0, v0 = np.floor(u.min()), np.floor(v.min())
    u, v = u - u0, v - v0
    ny = max(1, int(np.ceil(u.max())))
    nx = max(1, int(np.ceil(v.max())))
    theta = rng.uniform(0.0, 2.0 * np.pi, size=(ny + 1, nx + 1))  # (cells+1) corners per axis
    gy, gx = np.cos(theta).ravel(), np.sin(theta).ravel()

    i0 = np.minimum(np.floor(u).astype(np.int64), ny - 1)  # u == ny (right edge) stays in the last cell
    j0 = np.minimum(np.floor(v).astype(np.int64), nx - 1)
    fu, fv = u - i0, v - j0  # position inside the cell, in [0, 1]
    i1, j1 = i0 + 1, j0 + 1

    def corner(ii, jj, oy, ox):
        k = ii * (nx + 1) + jj  # flat lattice index, broadcast to (H, W)
        return gy[k] * (fu - oy) + gx[k] * (fv - ox)

    n00, n01 = corner(i0, j0, 0.0, 0.0), corner(i0, j1, 0.0, 1.0)
    n10, n11 = corner(i1, j0, 1.0, 0.0), corner(i1, j1, 1.0, 1.0)
    su, sv = _fade(fu), _fade(fv)
    top = n00 + sv * (n01 - n00)
    bottom = n10 + sv * (n11 - n10)
    out = np.sqrt(2.0) * (top + su * (bottom - top))
    return np.broadcast_to(out, (h, w)).astype(np.float32)


def max_scale_exponent(size: int) -> int:
    """Largest k with size / 2^k >= MIN_CELL_PX (cells at least 8 px, as at the paper's 256 px), capped at
    MAX_SCALE_EXPONENT; 0 for images smaller than two cells."""
    return int(min(MAX_SCALE_EXPONENT, max(0, np.floor(np.log2(max(1, size) / MIN_CELL_PX)))))


def random_perlin_noise(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise with scale 2^k per axis (k ~ U{0..5} independently, cut so cells stay >= 8 px) and a
    random rotation in [-90, 90) degrees. Returns float32 (H, W)."""
    h, w = shape
    ky = rng.integers(0, max_scale_exponent(h) + 1)
    kx = rng.integers(0, max_scale_exponent(w) + 1)
    angle = rng.uniform(-90.0, 90.0)
    return perlin_noise(shape, (2**ky, 2**kx), rng, angle_deg=angle)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5) -> np.ndarray:
    """One random thresholded Perlin mask (may be empty). Returns bool (H, W)."""
    return random_perlin_noise(shape, rng) > threshold
