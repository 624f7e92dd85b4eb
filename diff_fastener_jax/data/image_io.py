"""Image files and in-memory images -> the uint8 (H, W, 3) arrays every reader, predict and serve share.

One conversion for every source (a dataset file, an upload, a numpy array): 8/16-bit, grey, palette and
alpha become 8-bit RGB, resized bilinearly; masks are binarised and resized by area (`load_mask`).
Decoding failures raise DatasetError naming the file.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from diff_fastener_jax.data.sizing import Resize, as_resize, size_hw
from diff_fastener_jax.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
__all__ = [
    "IMAGE_EXTENSIONS",
    "Resize",
    "array_to_pil",
    "check_decodes",
    "decode_bytes",
    "image_to_float",
    "load_image",
    "load_mask",
    "open_image",
    "prepare_image",
    "size_hw",
]


def open_image(path: str) -> Image.Image:
    """Opens and fully decodes an image (truncated/corrupt files fail here, not later)."""
    if not os.path.isfile(path):
        raise DatasetError(f"image file {path} does not exist")
    try:
        img = Image.open(path)
        img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise DatasetError(f"cannot decode image {path}: {type(e).__name__}: {e}") from e
    return img


def decode_bytes(data: bytes, name: str) -> Image.Image:
    """Fully decodes an encoded image held in memory (an upload); DatasetError naming `name` if it is not one."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # the same failures as _open_fully
        raise DatasetError(f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    return img


def _to_uint8_array(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 (H, W) or (H, W, C); 16-bit and float images are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        return np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.asarray(img)


def load_image(path: str, size) -> np.ndarray:
    """Decodes `path` to uint8 (H, W, 3) at `size` (int or (H, W): exactly that size; a `sizing.Resize`:
    the size its rule gives this image) with bilinear resizing.

    Greyscale, palette and alpha images become 3-channel RGB. Raises DatasetError naming the file if it
    is missing or cannot be fully decoded.
    """
    return prepare_image(open_image(path), size)


def array_to_pil(a: np.ndarray, where: str = "image array") -> Image.Image:
    """An in-memory image, uint8 or uint16, (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> PIL image.

    16-bit colour (which PIL cannot hold) is scaled to 8 bit exactly as 16-bit files are.
    """
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or min(a.shape[:2]) < 1:
        raise DatasetError(f"{where}: expected an (H, W), (H, W, 3) or (H, W, 4) image, got shape {a.shape}")
    if a.dtype == np.uint16:
        if a.ndim == 2:
            return Image.fromarray(a)  # mode I;16, rescaled by prepare_image
        a = np.clip(a.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if a.dtype != np.uint8:
        raise DatasetError(f"{where}: expected uint8 or uint16 pixels, got {a.dtype}")
    return Image.fromarray(a)


def prepare_image(img: Image.Image, size) -> np.ndarray:
    """A decoded PIL image -> uint8 (H, W, 3) at `size`: the one conversion every image goes through
    (8/16-bit, grey/palette/alpha -> RGB, bilinear resize). `size` as in `load_image`."""
    h, w = as_resize(size).hw((img.height, img.width))
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(_to_uint8_array(img))
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)  # (H, W, 3)


def load_mask(path: str | None, size) -> np.ndarray:
    """Binary mask float32 (H, W, 1) in {0, 1} at `size`; zeros when `path` is None.

    Resized by area: a pixel is defective when at least half of the source area it covers is. Nearest
    neighbours would sample one source pixel per pixel and, when shrinking, cut a thin part of a region
    off as a pixel of its own, which AUPRO then counts as one more defect (MPDD's 512 px masks at 256²:
    two one-pixel regions that are not regions at 512 px).

    `size` as in `load_image`; pass the image's own (H, W) to be sure a mask matches its image (a mask
    of another size than its image still comes out at the image's size). Pixels > 127 are defective. Masks stored as small label values (maximum in 1..127, e.g. 0/1 PNGs)
    are read as 'nonzero = defective' instead, so they do not silently become empty.
    """
    rule = as_resize(size)
    if path is None:
        if rule.fixed_hw is None:
            raise ValueError(f"an absent mask has no size under data.resize={rule.mode!r}: pass the image's (H, W)")
        return np.zeros((*rule.fixed_hw, 1), np.float32)
    img = open_image(path)
    h, w = rule.hw((img.height, img.width))
    a = _to_uint8_array(img)
    if a.ndim == 3:
        a = a[..., :3].max(axis=-1) if a.shape[-1] >= 3 else a[..., 0]
    top = int(a.max()) if a.size else 0
    binary = a > (0 if 0 < top <= 127 else 127)
    m = Image.fromarray(binary.astype(np.uint8) * 255)
    if m.size != (w, h):
        m = m.resize((w, h), Image.BOX)  # each pixel: the mean of the source area it covers
    return (np.asarray(m) >= 128).astype(np.float32)[..., None]  # (H, W, 1): at least half defective


def image_to_float(image_u8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the networks' input range)."""
    return image_u8.astype(np.float32) * (2.0 / 255.0) - 1.0


def check_decodes(path: str) -> None:
    """Decodes `path` once and drops the pixels; JPEGs decode at reduced scale (a truncated file
    still fails: the decoder reads every entropy-coded block)."""
    if not os.path.isfile(path):
        raise DatasetError(f"image file {path} does not exist")
    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise DatasetError(
            f"cannot decode image {path}: {type(e).__name__}: {e}",
            hint="replace or remove the file; every listed image is checked at start-up",
        ) from e
