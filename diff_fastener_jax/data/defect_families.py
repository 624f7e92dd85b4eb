"""Synthetic defects shaped like small real ones: thin cracks and scratches, pores, low-contrast
intensity patches and blurred patches (the `data.synthesis` families besides 'perlin' and 'cutpaste').

Every family draws a candidate change inside the foreground and keeps it only where the pixels visibly
change: the label is `visible_change(out, x)` (mean |difference| over channels above VISIBLE_CHANGE)
and the output equals the input everywhere else, so the mask is exactly where the image changed and a
change nobody could see is never labelled an anomaly. Sizes are in pixels of the image synthesised on
(the training resolution, or the training patch). Images are float32 (H, W, 3) in [-1, 1]; all
randomness comes from the `np.random.Generator` passed in.
"""

from __future__ import annotations

import numpy as np

# mean |difference| over channels, images in [-1, 1]: about 6 of 255 grey levels
VISIBLE_CHANGE = 0.05
CRACK_WIDTHS = (1, 2, 3)  # stroke width in pixels
CRACK_LENGTH = (0.2, 0.7)  # fraction of the image's short side
CRACK_MIN_LENGTH_PX = 6
# The heading wanders at most this far from its start, so the stroke never folds back onto itself
# (a fold would make a blob, not a crack).
CRACK_MAX_TURN_DEG = 60.0
CRACK_TURN_STD = 0.12  # radians per pixel of the heading's random walk
CRACK_STRENGTH = (0.35, 0.8)  # how far the stroke moves towards black or white
PORE_COUNT = (1, 3)
PORE_RADIUS_PX = (1.0, 3.0)
PORE_STRENGTH = (0.4, 0.9)
INTENSITY_DELTA = (0.08, 0.25)  # brightness shift, [-1, 1] units (4-12% of the range): low contrast
PATCH_RADIUS = (0.05, 0.2)  # intensity / blur ellipse semi-axes, fraction of the short side
PATCH_FEATHER_PX = 2.0  # soft edge of the intensity patch
BLUR_SIGMA_PX = (1.0, 3.0)


def visible_change(out: np.ndarray, x: np.ndarray) -> np.ndarray:
    """bool (H, W): where `out` differs visibly from `x` (both (H, W, 3))."""
    return np.abs(out - x).mean(axis=-1) > VISIBLE_CHANGE


def keep_visible(out: np.ndarray, x: np.ndarray, foreground: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(out with every invisible or off-foreground change undone, bool mask (H, W) of what remains)."""
    mask = visible_change(out, x) & foreground
    return np.where(mask[..., None], out, x).astype(np.float32), mask


def _random_foreground_point(foreground: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A uniformly drawn point inside a random foreground pixel (the whole image when it is empty)."""
    ys, xs = np.nonzero(foreground)
    if ys.size == 0:
        h, w = foreground.shape
        return float(rng.uniform(0, h)), float(rng.uniform(0, w))
    k = int(rng.integers(ys.size))
    return float(ys[k] + rng.random()), float(xs[k] + rng.random())


def _towards(x: np.ndarray, weight: np.ndarray, strength: float, bright: bool) -> np.ndarray:
    """x moved by `strength * weight` (weight (H, W) in [0, 1]) towards white (bright) or black."""
    target = 1.0 if bright else -1.0
    return x + (strength * weight)[..., None] * (target - x)


def _stamp_disks(shape: tuple[int, int], points: np.ndarray, radius: float) -> np.ndarray:
    """bool (H, W): pixels whose centre lies closer than `radius` to any of `points` (N, 2) (y, x)."""
    h, w = shape
    reach = int(np.ceil(radius)) + 1
    offsets = np.arange(-reach, reach + 1)
    base = np.floor(points).astype(np.int64)  # (N, 2)
    py = base[:, 0, None, None] + offsets[None, :, None]  # (N, K, 1)
    px = base[:, 1, None, None] + offsets[None, None, :]  # (N, 1, K)
    d2 = (py + 0.5 - points[:, 0, None, None]) ** 2 + (px + 0.5 - points[:, 1, None, None]) ** 2
    py, px = np.broadcast_arrays(py, px)
    keep = (d2 < radius * radius) & (py >= 0) & (py < h) & (px >= 0) & (px < w)
    out = np.zeros((h, w), bool)
    out[py[keep], px[keep]] = True
    return out


def crack_stroke(
    shape: tuple[int, int], foreground: np.ndarray, rng: np.random.Generator, width: int | None = None
) -> np.ndarray:
    """bool (H, W): a random-walk stroke `width` px wide (drawn from CRACK_WIDTHS when None) starting in
    the foreground. The heading drifts by a random walk clipped to CRACK_MAX_TURN_DEG of the start."""
    h, w = shape
    width = int(rng.choice(CRACK_WIDTHS)) if width is None else int(width)
    length = max(CRACK_MIN_LENGTH_PX, rng.uniform(*CRACK_LENGTH) * min(h, w))
    n = int(np.ceil(2 * length))  # half-pixel steps
    max_turn = np.deg2rad(CRACK_MAX_TURN_DEG)
    turn = np.clip(np.cumsum(rng.normal(0.0, CRACK_TURN_STD * np.sqrt(0.5), n)), -max_turn, max_turn)
    heading = rng.uniform(0.0, 2.0 * np.pi) + turn  # (n,)
    start = np.array(_random_foreground_point(foreground, rng))
    # the stroke runs both ways from its start, so a start near the foreground's edge still crosses it
    back = int(rng.integers(0, n))
    steps = 0.5 * np.stack([np.sin(heading), np.cos(heading)], axis=-1)  # (n, 2)
    path = np.cumsum(steps, axis=0)
    points = start + path - path[back]  # (n, 2) (y, x)
    # a disk of radius 1/2 can miss every pixel centre; a 1-px stroke uses half the pixel diagonal
    radius = np.sqrt(0.5) if width == 1 else width / 2.0
    return _stamp_disks(shape, points, radius)


def draw_crack(x: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin dark (crack) or bright (scratch) random-walk stroke. Returns (out, bool mask (H, W))."""
    stroke = crack_stroke(x.shape[:2], foreground, rng) & foreground
    bright = bool(rng.random() < 0.5)
    out = _towards(x, stroke.astype(np.float32), float(rng.uniform(*CRACK_STRENGTH)), bright)
    return keep_visible(out, x, foreground)


def draw_pore(x: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """1-3 small soft-edged dark or bright spots of radius 1-3 px. Returns (out, bool mask (H, W))."""
    h, w = x.shape[:2]
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5
    weight = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(PORE_COUNT[0], PORE_COUNT[1] + 1))):
        cy, cx = _random_foreground_point(foreground, rng)
        r = float(rng.uniform(*PORE_RADIUS_PX))
        dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        weight = np.maximum(weight, np.clip(r + 0.5 - dist, 0.0, 1.0))
    bright = bool(rng.random() < 0.5)
    out = _towards(x, weight * foreground, float(rng.uniform(*PORE_STRENGTH)), bright)
    return keep_visible(out, x, foreground)


def _ellipse_distance(shape: tuple[int, int], foreground: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """float32 (H, W): signed distance-like field, negative inside a random ellipse centred in the
    foreground (in pixels along the short semi-axis)."""
    h, w = shape
    cy, cx = _random_foreground_point(foreground, rng)
    a = float(rng.uniform(*PATCH_RADIUS)) * min(h, w) + 1.0
    b = float(rng.uniform(*PATCH_RADIUS)) * min(h, w) + 1.0
    angle = rng.uniform(0.0, np.pi)
    yy = np.arange(h, dtype=np.float32)[:, None] + 0.5 - cy
    xx = np.arange(w, dtype=np.float32)[None, :] + 0.5 - cx
    u = np.cos(angle) * yy + np.sin(angle) * xx
    v = -np.sin(angle) * yy + np.cos(angle) * xx
    return ((np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b)).astype(np.float32)


def draw_intensity(x: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A low-contrast brighter or darker patch (soft-edged ellipse). Returns (out, bool mask (H, W))."""
    dist = _ellipse_distance(x.shape[:2], foreground, rng)
    weight = np.clip(0.5 - dist / PATCH_FEATHER_PX, 0.0, 1.0) * foreground  # (H, W)
    delta = float(rng.uniform(*INTENSITY_DELTA)) * (1.0 if rng.random() < 0.5 else -1.0)
    out = np.clip(x + delta * weight[..., None], -1.0, 1.0)
    return keep_visible(out, x, foreground)


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W, C) with reflected borders (truncated at 3 sigma)."""
    r = max(1, int(np.ceil(3.0 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    h, w = x.shape[:2]
    p = np.pad(x, ((r, r), (0, 0), (0, 0)), mode="reflect" if h > r else "edge")
    x = sum(t * p[i : i + h] for i, t in enumerate(taps))
    p = np.pad(x, ((0, 0), (r, r), (0, 0)), mode="reflect" if w > r else "edge")
    return sum(t * p[:, i : i + w] for i, t in enumerate(taps)).astype(np.float32)


def draw_blur(x: np.ndarray, foreground: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A blurred elliptic patch (out of focus, smeared). Returns (out, bool mask (H, W)); empty where
    the patch is too flat for blur to show."""
    region = (_ellipse_distance(x.shape[:2], foreground, rng) <= 0) & foreground
    blurred = gaussian_blur(x, float(rng.uniform(*BLUR_SIGMA_PX)))
    out = np.where(region[..., None], blurred, x)
    return keep_visible(out, x, foreground)


DRAW = {"crack": draw_crack, "pore": draw_pore, "intensity": draw_intensity, "blur": draw_blur}
