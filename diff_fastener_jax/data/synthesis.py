"""Anomaly synthesis on the host: the paper's Perlin mask x foreground, an anomaly source, a blend;
cut-paste; and, through `data.synthesis`, the small-defect families of `defect_families`.

    out = x * (1 - M) + (1 - b) * src * M + b * x * M,   b ~ U[0.2, 0.8),  M in {0, 1}

Images are float32 (H, W, 3) in [-1, 1] (the networks' range). Sources, in order of preference:
a texture folder (`TextureBank`, any folder of images, e.g. DTD), else, with equal probability, the
image itself strongly augmented (3 random ops) and strip-shuffled, or a procedural texture. Nothing is
downloaded. All randomness comes from the `np.random.Generator` passed in.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from diff_fastener_jax.config_schema import DECIDED_AT_TRAINING
from diff_fastener_jax.data import defect_families, perlin
from diff_fastener_jax.data.image_io import IMAGE_EXTENSIONS, load_image
from diff_fastener_jax.errors import DatasetError

BETA_RANGE = (0.2, 0.8)
MAX_MASK_TRIES = 10  # Perlin draws before falling back to a rectangle
# data.foreground once 'auto' is resolved from the training images (data/foreground_kind.py)
FG_MODES = DECIDED_AT_TRAINING["data.foreground"]
# Cut-paste: a pixel counts as changed when the pasted copy differs from it by more than this (mean
# |difference| over channels, images in [-1, 1]; sensor noise and concrete grain stay below ~0.1), and
# a cut-paste needs this many changed pixels, else the paper's blended texture is drawn instead.
CUTPASTE_MIN_CHANGE = 0.15
CUTPASTE_MIN_PIXELS = 4
# A crack / pore / intensity / blur draw that changes fewer pixels visibly than this is drawn again,
# up to FAMILY_TRIES times, then replaced by the Perlin texture blend (which is never empty).
FAMILY_MIN_PIXELS = 3
FAMILY_TRIES = 4


# ---------------------------------------------------------------------------------------------------
# Foreground and masks


def otsu_threshold(gray: np.ndarray) -> float:
    """Otsu's threshold of a greyscale image in [0, 1]: maximises the between-class variance."""
    hist, edges = np.histogram(gray, bins=256, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centers)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


# Below this share of the image, Otsu found no usable object: the whole image is the foreground.
MIN_FOREGROUND_SHARE = 0.01


def foreground_mask(image: np.ndarray, mode: str = "otsu") -> np.ndarray:
    """bool (H, W): where anomalies may go. 'full' = everywhere (textures); 'otsu' = the Otsu class of
    the greyscale image that touches the border less (the object, whether darker or brighter than its
    background). Falls back to the whole image when Otsu finds no usable object (< 1% of pixels)."""
    h, w = image.shape[:2]
    if mode == "full":
        return np.ones((h, w), bool)
    if mode != "otsu":
        raise ValueError(
            f"foreground_mask: mode must be one of {FG_MODES}, got {mode!r} ('auto' is resolved from the training "
            "images first: data.foreground_kind.resolve)"
        )
    _, fg = otsu_object(image)
    if fg.mean() < MIN_FOREGROUND_SHARE:
        return np.ones((h, w), bool)
    return fg


def otsu_object(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(grey (H, W) float32 in [0, 1], object bool (H, W)) of `image` (H, W, 3) in [-1, 1]: the object is the
    class of the grey levels' Otsu split that touches the image border less."""
    gray = (np.asarray(image, np.float32).mean(axis=-1) + 1.0) / 2.0  # [-1, 1] -> [0, 1]
    bright = gray > otsu_threshold(gray)
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    return gray, (~bright if border.mean() > 0.5 else bright)


def _random_rectangle(foreground: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rectangle centred on a random foreground pixel, ANDed with the foreground (never empty)."""
    h, w = foreground.shape
    ys, xs = np.nonzero(foreground)  # anomaly_mask never passes an empty foreground
    k = rng.integers(ys.size)
    cy, cx = ys[k], xs[k]
    rh = max(1, int(h * rng.uniform(0.08, 0.25)))
    rw = max(1, int(w * rng.uniform(0.08, 0.25)))
    m = np.zeros((h, w), bool)
    m[max(0, cy - rh // 2) : cy + rh // 2 + 1, max(0, cx - rw // 2) : cx + rw // 2 + 1] = True
    return m & foreground


def anomaly_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    foreground: np.ndarray | None = None,
    max_tries: int = MAX_MASK_TRIES,
) -> np.ndarray:
    """bool (H, W), never empty, inside `foreground` (when it has any pixel).

    A thresholded Perlin mask AND the foreground, redrawn up to `max_tries` times while empty. Every
    Perlin scale reaches the threshold, so for a foreground of a few percent of the image the draws
    almost always succeed; only a tiny or thin foreground that the blobs keep missing falls back to
    a random rectangle centred on a foreground pixel and clipped to the foreground, so synthesis
    always terminates with an anomaly where anomalies may be. An empty foreground means anywhere.
    """
    fg = np.ones(shape, bool) if foreground is None else np.asarray(foreground, bool).reshape(shape)
    if not fg.any():
        fg = np.ones(shape, bool)
    for _ in range(max_tries):
        m = perlin.perlin_mask(shape, rng) & fg
        if m.any():
            return m
    return _random_rectangle(fg, rng)


# ---------------------------------------------------------------------------------------------------
# Augmentations (on [0, 1] float images (H, W, 3))


def _blur(x: np.ndarray) -> np.ndarray:
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(p[dy : dy + x.shape[0], dx : dx + x.shape[1]] for dy in range(3) for dx in range(3)) / 9.0


def _equalize(x: np.ndarray) -> np.ndarray:
    """Per-channel histogram equalisation on 256 levels (a lookup table from each channel's CDF)."""
    q = np.clip(x * 255.0 + 0.5, 0, 255).astype(np.int64)  # (H, W, C)
    out = np.empty(x.shape, np.float32)
    for c in range(x.shape[-1]):
        cdf = np.cumsum(np.bincount(q[..., c].ravel(), minlength=256)).astype(np.float32)
        lut = (cdf - cdf[0]) / max(1.0, float(cdf[-1] - cdf[0]))
        out[..., c] = lut[q[..., c]]
    return out


def _posterize(x: np.ndarray, levels: int) -> np.ndarray:
    return np.round(x * (levels - 1)) / (levels - 1)


def _rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotation by a random angle in [-90, 90) about the centre (nearest, reflected borders)."""
    h, w = x.shape[:2]
    a = np.deg2rad(rng.uniform(-90.0, 90.0))
    yy, xx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    sy = np.cos(a) * yy - np.sin(a) * xx + (h - 1) / 2
    sx = np.sin(a) * yy + np.cos(a) * xx + (w - 1) / 2

    def reflect(v, n):
        period = 2 * n
        v = np.mod(np.rint(v).astype(np.int64), period)
        return np.where(v >= n, period - 1 - v, v)

    return x[reflect(sy, h), reflect(sx, w)]


AUGMENTATIONS = {
    "gamma": lambda x, r: x ** r.uniform(0.5, 2.0),
    "brightness_contrast": lambda x, r: (x - x.mean()) * r.uniform(0.5, 1.8) + x.mean() + r.uniform(-0.3, 0.3),
    "color_mix": lambda x, r: x @ (np.eye(3) * 0.4 + r.uniform(0.0, 0.6, size=(3, 3))).T,
    "channel_permute": lambda x, r: x[..., r.permutation(3)],
    "solarize": lambda x, r: np.where(x > r.uniform(0.3, 0.8), 1.0 - x, x),
    "posterize": lambda x, r: _posterize(x, int(r.integers(2, 6))),
    "invert": lambda x, r: 1.0 - x,
    "equalize": lambda x, r: _equalize(x),
    "sharpen": lambda x, r: x + r.uniform(0.5, 2.0) * (x - _blur(x)),
    "blur": lambda x, r: _blur(_blur(x)),
    "rotate": _rotate,
    "flip": lambda x, r: x[::-1] if r.random() < 0.5 else x[:, ::-1],
}


def augment(x01: np.ndarray, rng: np.random.Generator, num_ops: int = 3) -> np.ndarray:
    """`num_ops` distinct random photometric/geometric ops on a [0, 1] image; result clipped to [0, 1]."""
    names = sorted(AUGMENTATIONS)
    x = np.asarray(x01, np.float32)
    for i in rng.choice(len(names), size=num_ops, replace=False):
        x = np.clip(AUGMENTATIONS[names[i]](x, rng), 0.0, 1.0).astype(np.float32)
    return x


def strip_shuffle(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Cuts the image into 4-16 strips along a random axis and permutes them (then, half the time, the
    same across the other axis): destroys the object's structure while keeping its colours."""
    axes = [int(rng.integers(2))]
    if rng.random() < 0.5:
        axes.append(1 - axes[0])
    for axis in axes:
        n = int(min(x.shape[axis], rng.integers(4, 17)))
        strips = np.array_split(x, n, axis=axis)
        x = np.concatenate([strips[i] for i in rng.permutation(n)], axis=axis)
    return x


# ---------------------------------------------------------------------------------------------------
# Sources


def procedural_texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random procedural texture in [0, 1], float32 (H, W, 3): fractal noise, stripes, a checkerboard
    or speckle, coloured with two random colours."""
    h, w = shape
    kind = int(rng.integers(4))
    if kind == 0:  # fractal Perlin noise (3 octaves)
        t = sum(perlin.perlin_noise(shape, (2 ** (o + 1),) * 2, rng, rng.uniform(0, 90)) / 2**o for o in range(3))
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
    elif kind in (1, 2):  # stripes / checkerboard at a random angle and period
        a = rng.uniform(0, np.pi)
        yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        period = rng.uniform(3.0, max(4.0, min(h, w) / 4))
        u = (np.cos(a) * yy + np.sin(a) * xx) / period
        if kind == 1:
            t = 0.5 + 0.5 * np.sin(2 * np.pi * u)
        else:
            v = (-np.sin(a) * yy + np.cos(a) * xx) / period
            t = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    else:  # speckle
        t = rng.random((h, w))
        t = _blur(t[..., None])[..., 0] if rng.random() < 0.5 else t
    c0, c1 = rng.random(3), rng.random(3)
    t = np.asarray(t, np.float32)[..., None]
    return (c0 * (1 - t) + c1 * t).astype(np.float32)


class TextureBank:
    """Anomaly source textures from any folder of images (searched recursively; e.g. DTD's images/).

    Decoded textures are cached per (path, shape) in a small LRU, per process (each grain worker keeps
    its own)."""

    def __init__(self, folder: str, cache_size: int = 64):
        if not os.path.isdir(folder):
            raise DatasetError(f"data.texture_dir: folder {folder} does not exist")
        self.folder = folder
        self.paths = sorted(
            os.path.join(d, n)
            for d, _, names in os.walk(folder)
            for n in names
            if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not self.paths:
            raise DatasetError(f"data.texture_dir: folder {folder} contains no images")
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self):  # ship paths to worker processes, not decoded pixels
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    def sample(self, rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
        """A random texture resized to `shape`, float32 (H, W, 3) in [0, 1]."""
        path = self.paths[int(rng.integers(len(self.paths)))]
        key = (path, tuple(shape))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        tex = load_image(path, tuple(shape)).astype(np.float32) / 255.0
        self._cache[key] = tex
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tex


def anomaly_source(x01: np.ndarray, rng: np.random.Generator, texture_bank: TextureBank | None = None) -> np.ndarray:
    """The pixels to paste, float32 (H, W, 3) in [0, 1]: an augmented texture from the bank; without a
    bank, half the time the image itself augmented and strip-shuffled, else a procedural texture."""
    shape = x01.shape[:2]
    if texture_bank is not None and len(texture_bank):
        return augment(texture_bank.sample(rng, shape), rng)
    if rng.random() < 0.5:
        return strip_shuffle(augment(x01, rng), rng)
    return augment(procedural_texture(shape, rng), rng, num_ops=1)


def shifted_copy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image itself, rolled by a random offset of at least 1/8 of its size along some axis: pasted
    through a mask (cut-paste), it puts real parts of the scene where they do not belong (a clip piece on
    bare concrete, concrete over a clip), the kind of anomaly whose pixels all look normal."""
    h, w = x.shape[:2]
    along = int(rng.integers(3))  # 0: vertical shift, 1: horizontal, 2: both (one-axis shifts keep bands aligned)
    while True:
        dy, dx = int(rng.integers(-(h // 2), h // 2 + 1)), int(rng.integers(-(w // 2), w // 2 + 1))
        dy, dx = (0 if along == 1 else dy), (0 if along == 0 else dx)
        if max(abs(dy) / h, abs(dx) / w) >= 1 / 8:
            return np.roll(x, (dy, dx), axis=(0, 1))


# ---------------------------------------------------------------------------------------------------
# Public entry point


def choose_family(families, rng: np.random.Generator) -> str:
    """One family name of `families` ((name, share), ... with shares summing to 1) drawn by share."""
    names = [name for name, _ in families]
    shares = np.asarray([share for _, share in families], np.float64)
    return names[int(rng.choice(len(names), p=shares / shares.sum()))]


def _cutpaste(x: np.ndarray, m: np.ndarray, rng: np.random.Generator):
    """(out, changed mask (H, W, 1)) of a cut-paste through mask `m`, or None when the shifted copy
    changes fewer than CUTPASTE_MIN_PIXELS pixels visibly."""
    src = shifted_copy(x, rng)
    # Only what visibly changed is an anomaly: concrete pasted on concrete is not one, and a label
    # there would teach the segmentation net to flag plain surfaces.
    changed = m * (np.abs(src - x).mean(axis=-1, keepdims=True) > CUTPASTE_MIN_CHANGE)
    if changed.sum() >= CUTPASTE_MIN_PIXELS:
        return (x * (1.0 - changed) + src * changed).astype(np.float32), changed
    return None


def _texture_blend(
    x: np.ndarray, m: np.ndarray, rng: np.random.Generator, texture_bank: TextureBank | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """The paper's blend of an anomaly source into `x` through mask `m` (H, W, 1): (out, m, beta)."""
    src = anomaly_source((x + 1.0) / 2.0, rng, texture_bank) * 2.0 - 1.0  # [-1, 1]
    beta = float(rng.uniform(*BETA_RANGE))
    out = x * (1.0 - m) + (1.0 - beta) * src * m + beta * x * m
    return np.clip(out, -1.0, 1.0).astype(np.float32), m, beta


def synthesize_anomaly(
    image_float: np.ndarray,
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    texture_bank: TextureBank | None = None,
    fg_mode: str = "otsu",
    cutpaste_prob: float = 0.0,
    families=(),
) -> tuple[np.ndarray, np.ndarray, float]:
    """Pastes a synthetic anomaly into a normal image.

    image_float: float32 (H, W, 3) in [-1, 1]. foreground: optional bool (H, W) or (H, W, 1) region
    where anomalies may appear, e.g. supplied by the dataset (`data.foreground_dir`); when None, or
    when a supplied mask is empty, it comes from `fg_mode` ('otsu' | 'full'). With probability
    `cutpaste_prob` the mask is filled opaquely with a shifted copy of the image (`shifted_copy`, beta 0)
    and cut back to the pixels that visibly changed (a copy that changes fewer than CUTPASTE_MIN_PIXELS
    falls back to a blended texture); 0 (the paper) draws nothing extra, so seeds reproduce the paper's path.
    `families` (`config_schema.parse_synthesis` of data.synthesis; () = the behaviour above) first
    draws one family by share: 'perlin' (the blend), 'cutpaste' (always cut-paste, as with
    cutpaste_prob 1), or a `defect_families` family ('crack', 'pore', 'intensity', 'blur'), labelled
    exactly where the pixels visibly change and redrawn while nearly invisible (after FAMILY_TRIES
    draws: the blend).
    Returns (out float32 (H, W, 3) in [-1, 1], mask float32 (H, W, 1) in {0, 1} and never empty,
    beta: in [0.2, 0.8), or 0.0 for a cut-paste or a defect family). Pixels outside the mask are returned
    unchanged.
    """
    x = np.asarray(image_float, np.float32)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"synthesize_anomaly expects an (H, W, 3) image, got shape {x.shape}")
    h, w = x.shape[:2]
    if foreground is not None:
        fg = np.asarray(foreground).reshape(h, w) > 0
        if not fg.any():
            fg = foreground_mask(x, fg_mode)
    else:
        fg = foreground_mask(x, fg_mode)
    family = choose_family(families, rng) if families else None
    if family in defect_families.DRAW:
        for _ in range(FAMILY_TRIES):
            out, mask = defect_families.DRAW[family](x, fg, rng)
            if mask.sum() >= FAMILY_MIN_PIXELS:
                return out, mask.astype(np.float32)[..., None], 0.0
    m = anomaly_mask((h, w), rng, fg).astype(np.float32)[..., None]  # (H, W, 1)
    if family == "cutpaste" or (family is None and cutpaste_prob > 0 and rng.random() < cutpaste_prob):
        pasted = _cutpaste(x, m, rng)
        if pasted is not None:
            return pasted[0], pasted[1], 0.0
    return _texture_blend(x, m, rng, texture_bank)
