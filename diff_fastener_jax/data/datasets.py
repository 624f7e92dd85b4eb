"""Dataset readers (DESIGN.md §6): MVTec AD layout, VisA's split CSV, a generic folder layout, and
the built-in synthetic demo (MVTec layout).

Layouts (paths below `data.root`):

  mvtec / demo  <category>/train/good/*.png                  normal training images
                <category>/test/<defect>/*.png               test images ('good' = normal)
                <category>/ground_truth/<defect>/<stem>_mask.png   one mask per defective test image
  visa          split_csv/1cls.csv  columns object,split,label,image,mask (paths relative to root,
                label 'normal' / 'anomaly'); `data.category` picks one object ('' = all objects)
  folder        <category>/<normal_dir>/*.png                normal images (split train/test below)
                <category>/<abnormal_dir>/<type>/*.png       defective images (or directly in abnormal_dir)
                <category>/<mask_dir>/<type>/<stem>*.png     optional masks (if mask_dir exists, every
                                                             defective image needs one)

Splits (`list_samples`): 'train' = normal training images minus the validation slice; 'val' = a
`data.val_fraction` slice of the normal training images (deterministic under `seed`), used for
validation and threshold calibration; 'test' = the test split, never used for training. The folder
layout has no test split of its own: a `data.folder_test_fraction` share of its normal images (chosen
under `seed`) plus every defective image form its test split.

k-fold (`data.fold` >= 0): the normal training pool (for the folder layout: ALL its normal images) is
split into `data.num_folds` folds under `seed`; fold `data.fold` is held out and becomes the test split's
normals, joined by the layout's anomalous test images (the layout's own test normals are not used).
'train' and 'val' then come from the other folds.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sys
import zlib
from collections.abc import Sequence

import ml_collections
import numpy as np
from PIL import Image

from diff_fastener_jax.config import category_names, class_names
from diff_fastener_jax.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")

# Separate random streams per decision, so changing one split never reshuffles another.
_STREAM_FOLDS, _STREAM_VAL, _STREAM_FOLDER_TEST = 1, 2, 3


class DatasetError(UserError, ValueError):
    """Bad dataset input: a missing/empty folder, an unreadable image, an unmatched mask, ..."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image of a dataset split."""

    path: str
    label: int  # 0 normal, 1 anomalous
    defect: str  # 'good' for normal images
    mask_path: str | None = None  # None: no pixel annotation (all-zero mask)
    foreground_path: str | None = None  # training normals: where synthetic anomalies may go (optional)
    category: str = ""  # the data.category it was listed under (several in a multi-category run)


# ---------------------------------------------------------------------------------------------------
# Decoding


def _size_hw(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def _open_fully(path: str) -> Image.Image:
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
    """Decodes `path` to uint8 (H, W, 3) at `size` (int or (H, W)) with bilinear resizing.

    Greyscale, palette and alpha images become 3-channel RGB. Raises DatasetError naming the file if it
    is missing or cannot be fully decoded.
    """
    return prepare_image(_open_fully(path), size)


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
    (8/16-bit, grey/palette/alpha -> RGB, bilinear resize)."""
    h, w = _size_hw(size)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(_to_uint8_array(img))
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)  # (H, W, 3)


def load_mask(path: str | None, size) -> np.ndarray:
    """Binary mask float32 (H, W, 1) in {0, 1} at `size` (nearest resizing); zeros when `path` is None.

    Pixels > 127 are defective. Masks stored as small label values (maximum in 1..127, e.g. 0/1 PNGs)
    are read as 'nonzero = defective' instead, so they do not silently become empty.
    """
    h, w = _size_hw(size)
    if path is None:
        return np.zeros((h, w, 1), np.float32)
    img = _open_fully(path)
    a = _to_uint8_array(img)
    if a.ndim == 3:
        a = a[..., :3].max(axis=-1) if a.shape[-1] >= 3 else a[..., 0]
    top = int(a.max()) if a.size else 0
    binary = a > (0 if 0 < top <= 127 else 127)
    m = Image.fromarray(binary.astype(np.uint8) * 255)
    if m.size != (w, h):
        m = m.resize((w, h), Image.NEAREST)
    return (np.asarray(m) > 127).astype(np.float32)[..., None]  # (H, W, 1)


def image_to_float(image_u8: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (the networks' input range)."""
    return image_u8.astype(np.float32) * (2.0 / 255.0) - 1.0


def load_arrays(samples: Sequence[Sample], size) -> dict:
    """Decodes `samples` for evaluation.

    Returns image float32 (N, H, W, 3) in [-1, 1], mask float32 (N, H, W, 1), label int32 (N,),
    defect list[str], path list[str].
    """
    h, w = _size_hw(size)
    n = len(samples)
    images = np.empty((n, h, w, 3), np.float32)
    masks = np.empty((n, h, w, 1), np.float32)
    for i, s in enumerate(samples):
        images[i] = image_to_float(load_image(s.path, (h, w)))
        masks[i] = load_mask(s.mask_path, (h, w))
    return {"image": images, "mask": masks, "label": np.array([s.label for s in samples], np.int32),
            "defect": [s.defect for s in samples], "path": [s.path for s in samples]}


def _check_decodes(path: str) -> None:
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
        raise DatasetError(f"cannot decode image {path}: {type(e).__name__}: {e}",
                           hint="replace or remove the file; every listed image is checked at start-up") from e


def verify_images(samples: Sequence[Sample], max_workers: int = 8) -> None:
    """Decodes every image and mask of `samples` once (threads: PIL releases the GIL while decoding);
    raises DatasetError naming the first bad file in `samples` order. Run at start-up, before compiling."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [p for s in samples for p in (s.path, s.mask_path) if p is not None]
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(paths)))) as pool:
        errors = list(pool.map(_error_of, paths))
    for err in errors:
        if err is not None:
            raise err


def _error_of(path: str) -> DatasetError | None:
    try:
        _check_decodes(path)
    except DatasetError as e:
        return e
    return None


# ---------------------------------------------------------------------------------------------------
# Layout parsing


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise DatasetError(f"{what}: folder {path} does not exist")


def _images_in(folder: str, what: str, allow_empty: bool = False) -> list[str]:
    """Sorted image paths directly inside `folder` (which must exist and, unless allowed, hold images)."""
    _require_dir(folder, what)
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder)
                   if _is_image(n) and os.path.isfile(os.path.join(folder, n)))
    if not paths and not allow_empty:
        raise DatasetError(f"{what}: folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _subdirs(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder)
                  if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _category_dir(data_cfg) -> str:
    category = str(data_cfg.get("category", "") or "")
    if not category:
        raise DatasetError(f"data.category is required for data.format={data_cfg.format!r}")
    root = str(data_cfg.root or "")
    if not root:
        raise DatasetError(f"data.root is required for data.format={data_cfg.format!r}")
    path = os.path.join(root, category)
    _require_dir(path, f"data.root/data.category ({data_cfg.format} layout)")
    return path


def _attach_foregrounds(normals: list[Sample], data_cfg) -> list[Sample]:
    """Normals with `foreground_path` set when the category has a `data.foreground_dir` folder.

    That folder holds one mask per normal training image, named <stem>.png or <stem>_mask.png
    (white = where synthetic anomalies may be placed). Without the folder the samples are returned
    as they are and synthesis falls back to `data.foreground` ('otsu' | 'full')."""
    name = str(data_cfg.get("foreground_dir", "") or "")
    if not name:
        return normals
    folder = os.path.join(_category_dir(data_cfg), name)
    if not os.path.isdir(folder):
        return normals
    masks = _images_in(folder, "data.foreground_dir", allow_empty=True)
    by_stem = {_stem(m): m for m in masks}
    by_stem.update({_stem(m)[:-len("_mask")]: m for m in masks if _stem(m).endswith("_mask")})
    out = []
    for s in normals:
        fg = by_stem.get(_stem(s.path))
        if fg is None:
            raise DatasetError(f"foreground masks: normal image {s.path} has no mask in {folder} "
                               f"(expected {_stem(s.path)}.png; remove {folder} to use data.foreground)")
        out.append(dataclasses.replace(s, foreground_path=fg))
    return out


def _parse_mvtec(data_cfg) -> tuple[list[Sample], list[Sample]]:
    """(normal training pool, test split) of an MVTec-layout category."""
    cat = _category_dir(data_cfg)
    train = [Sample(p, 0, "good") for p in _images_in(os.path.join(cat, "train", "good"),
                                                      "MVTec layout train/good")]
    test_dir, gt_dir = os.path.join(cat, "test"), os.path.join(cat, "ground_truth")
    _require_dir(test_dir, "MVTec layout test split")
    defects = _subdirs(test_dir)
    if not defects:
        raise DatasetError(f"MVTec layout: {test_dir} has no <defect>/ sub-folders (expected good/ and defects)")
    test: list[Sample] = []
    for defect in defects:
        images = _images_in(os.path.join(test_dir, defect), f"MVTec layout test/{defect}")
        if defect == "good":
            test += [Sample(p, 0, "good") for p in images]
            continue
        masks = _images_in(os.path.join(gt_dir, defect), f"MVTec layout ground_truth/{defect} "
                           f"(every defective test image needs a mask)", allow_empty=True)
        # <stem>_mask.png (MVTec) or, failing that, <stem>.png (some MVTec-style exports).
        by_stem = {_stem(m): m for m in masks if not _stem(m).endswith("_mask")}
        by_stem.update({_stem(m)[:-len("_mask")]: m for m in masks if _stem(m).endswith("_mask")})
        used = set()
        for p in images:
            stem = _stem(p)
            mask = by_stem.get(stem)
            if mask is None:
                raise DatasetError(f"MVTec layout: defective image {p} has no mask "
                                   f"(expected {os.path.join(gt_dir, defect, stem + '_mask.png')})")
            used.add(mask)
            test.append(Sample(p, 1, defect, mask))
        orphans = sorted(set(masks) - used)
        if orphans:
            raise DatasetError(f"MVTec layout: mask {orphans[0]} has no image in {os.path.join(test_dir, defect)}"
                               + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""))
    if os.path.isdir(gt_dir):
        for defect in _subdirs(gt_dir):
            if defect != "good" and defect not in defects:
                raise DatasetError(f"MVTec layout: masks in {os.path.join(gt_dir, defect)} have no images "
                                   f"(folder {os.path.join(test_dir, defect)} does not exist)")
    return train, test


def _parse_visa(data_cfg) -> tuple[list[Sample], list[Sample]]:
    """(normal training pool, test split) from VisA's split_csv/1cls.csv."""
    root = str(data_cfg.root or "")
    if not root:
        raise DatasetError("data.root is required for data.format='visa'")
    csv_path = os.path.join(root, "split_csv", "1cls.csv")
    if not os.path.isfile(csv_path):
        raise DatasetError(f"VisA layout: split file {csv_path} does not exist")
    category = str(data_cfg.get("category", "") or "")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"VisA layout: {csv_path} lacks column(s) {missing} "
                               f"(has {reader.fieldnames}; expected {list(VISA_COLUMNS)})")
        rows = list(enumerate(reader, start=2))  # line numbers for error messages (line 1 = header)
    objects = sorted({r["object"] for _, r in rows})
    if category:
        rows = [(i, r) for i, r in rows if r["object"] == category]
        if not rows:
            raise DatasetError(f"VisA layout: no rows for data.category={category!r} in {csv_path} "
                               f"(objects there: {objects})")
    train, test = [], []
    for line, r in rows:
        where = f"{csv_path} line {line}"
        split, label = r["split"].strip(), r["label"].strip()
        if split not in ("train", "test"):
            raise DatasetError(f"VisA layout: {where}: split {split!r} is not 'train' or 'test'")
        if label not in ("normal", "anomaly"):
            raise DatasetError(f"VisA layout: {where}: label {label!r} is not 'normal' or 'anomaly'")
        image = os.path.join(root, r["image"].strip())
        if not os.path.isfile(image):
            raise DatasetError(f"VisA layout: {where}: image {image} does not exist")
        mask = None
        if label == "anomaly":
            if not r["mask"].strip():
                raise DatasetError(f"VisA layout: {where}: anomalous image {image} has no mask")
            mask = os.path.join(root, r["mask"].strip())
            if not os.path.isfile(mask):
                raise DatasetError(f"VisA layout: {where}: mask {mask} of image {image} does not exist")
        s = Sample(image, int(label == "anomaly"), "good" if label == "normal" else "anomaly", mask)
        if split == "train":
            if s.label:
                raise DatasetError(f"VisA layout: {where}: anomalous image {image} in the train split")
            train.append(s)
        else:
            test.append(s)
    return train, test


def _match_masks(images: list[str], mask_folder: str, what: str) -> dict[str, str]:
    """{image path: mask path} for masks named <image stem>[_-.]* ; every image needs exactly one."""
    masks = _images_in(mask_folder, what, allow_empty=True)
    stems = {_stem(p): p for p in images}
    found: dict[str, str] = {}
    for m in masks:
        ms = _stem(m)
        # The longest image stem that prefixes the mask name (so img1 never steals img10's mask).
        cands = [s for s in stems if ms == s or (ms.startswith(s) and ms[len(s)] in "_-.")]
        if not cands:
            raise DatasetError(f"folder layout: mask {m} matches no defective image "
                               f"(its name must start with an image's stem: <stem>.png, <stem>_mask.png)")
        image = stems[max(cands, key=len)]
        if image in found:
            raise DatasetError(f"folder layout: image {image} has two masks: {found[image]} and {m}")
        found[image] = m
    for p in images:
        if p not in found:
            raise DatasetError(f"folder layout: defective image {p} has no mask in {mask_folder} "
                               f"(expected {_stem(p)}*.png; remove {os.path.dirname(mask_folder)} "
                               f"to run without masks)")
    return found


def _parse_folder(data_cfg, seed: int) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """(all normals, normal training pool, test split) of the generic folder layout."""
    cat = _category_dir(data_cfg)
    normal_dir = os.path.join(cat, str(data_cfg.normal_dir))
    abnormal_dir = os.path.join(cat, str(data_cfg.abnormal_dir))
    mask_root = os.path.join(cat, str(data_cfg.mask_dir)) if data_cfg.get("mask_dir") else ""
    normals = [Sample(p, 0, "good") for p in _images_in(normal_dir, "folder layout data.normal_dir")]

    # No abnormal folder at all: a normal-only dataset (train, calibrate, test on held-out normals).
    groups = []
    if os.path.exists(abnormal_dir):
        _require_dir(abnormal_dir, "folder layout data.abnormal_dir")
        direct = _images_in(abnormal_dir, "folder layout data.abnormal_dir", allow_empty=True)
        groups = [(os.path.basename(abnormal_dir.rstrip(os.sep)), direct, mask_root)] if direct else []
        for t in _subdirs(abnormal_dir):
            groups.append((t, _images_in(os.path.join(abnormal_dir, t), f"folder layout defect type {t!r}"),
                           os.path.join(mask_root, t) if mask_root else ""))
        if not groups:
            raise DatasetError(f"folder layout: {abnormal_dir} holds neither images nor <type>/ sub-folders "
                               f"(remove it to train from normal images alone)")
    has_masks = bool(mask_root) and os.path.isdir(mask_root)
    anomalous = []
    for defect, images, mask_folder in groups:
        masks = _match_masks(images, mask_folder, f"folder layout masks of {defect!r}") if has_masks else {}
        anomalous += [Sample(p, 1, defect, masks.get(p)) for p in images]

    # Deterministic test share of the normals (the layout has no test split of its own).
    frac = float(data_cfg.get("folder_test_fraction", 0.2))
    if not 0.0 <= frac < 1.0:
        raise DatasetError(f"data.folder_test_fraction must be in [0, 1), got {frac}")
    perm = np.random.default_rng([seed, _STREAM_FOLDER_TEST]).permutation(len(normals))
    n_test = min(int(round(frac * len(normals))), len(normals) - 1)
    test_idx = set(perm[:n_test].tolist())
    train = [s for i, s in enumerate(normals) if i not in test_idx]
    test = [s for i, s in enumerate(normals) if i in test_idx] + anomalous
    return normals, train, test


def _split_off(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(rest, held-out `fraction`) chosen under `seed`; keeps at least one image in `rest`."""
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    n_val = min(max(1, int(round(fraction * len(samples)))), len(samples) - 1)
    perm = np.random.default_rng([seed, _STREAM_VAL]).permutation(len(samples))
    held = set(perm[:n_val].tolist())
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


def list_samples(data_cfg, split: str, seed: int) -> list[Sample]:
    """The samples of `split` ('train', 'val', 'test') for the layout in `data_cfg` (config.data).

    Deterministic under `seed`; the whole layout is checked on every call, so a bad file anywhere raises
    DatasetError before anything trains. 'train' and 'val' hold normal images only.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return list_splits(data_cfg, seed)[split]


def class_ids_of(config, samples) -> list[int]:
    """Each sample's class id: its category's index in `config.class_names` (0 for one-category runs)."""
    names = class_names(config)
    if not names:
        return [0] * len(samples)
    index = {n: i for i, n in enumerate(names)}
    missing = sorted({s.category for s in samples} - set(index))
    if missing:
        raise DatasetError(f"samples of categories {missing} are not among the model's classes {names}")
    return [index[s.category] for s in samples]


def class_id_array(config, samples) -> np.ndarray | None:
    """(N,) int32 class ids for a unified multi-category model's inference; None for one-category models."""
    return np.asarray(class_ids_of(config, samples), np.int32) if class_names(config) else None


def available_categories(data_cfg) -> list[str]:
    """Every category under data.root for data.format: MVTec/demo folders with train/good, folder-layout
    folders with data.normal_dir, VisA's objects (split_csv/1cls.csv). Sorted."""
    fmt, root = str(data_cfg.format), str(data_cfg.root or "")
    if not root:
        raise DatasetError(f"data.root is required to list the categories of data.format={fmt!r}")
    if fmt == "visa":
        csv_path = os.path.join(root, "split_csv", "1cls.csv")
        if not os.path.isfile(csv_path):
            raise DatasetError(f"VisA layout: split file {csv_path} does not exist")
        with open(csv_path, newline="") as f:
            return sorted({r.get("object", "") for r in csv.DictReader(f)} - {""})
    _require_dir(root, "data.root")
    marker = os.path.join("train", "good") if fmt in ("mvtec", "demo") else str(data_cfg.normal_dir)
    return [d for d in _subdirs(root) if os.path.isdir(os.path.join(root, d, marker))]


def resolve_categories(data_cfg) -> list[str]:
    """data.category as a list: one name, 'a,b,c', or 'all' (`available_categories`)."""
    names = category_names(data_cfg.get("category", ""))
    if names == ["all"]:
        names = available_categories(data_cfg)
        if not names:
            raise DatasetError(f"data.category='all': no {data_cfg.format} categories under {data_cfg.root}")
    return names


def list_splits(data_cfg, seed: int) -> dict[str, list[Sample]]:
    """{'train': [...], 'val': [...], 'test': [...]} from ONE pass over the layout (see `list_samples`).

    A run lists its splits once with this and passes the lists on. With several categories
    (data.category 'a,b' or 'all') each is split on its own and the splits are concatenated in
    category order; every Sample carries its category."""
    names = resolve_categories(data_cfg)
    if len(names) > 1:
        out = {k: [] for k in SPLITS}
        for name in names:
            one = ml_collections.ConfigDict(data_cfg.to_dict())
            one.category = name
            for k, samples in _list_one_category(one, seed).items():
                out[k] += samples
        return out
    return _list_one_category(data_cfg, seed)


def _list_one_category(data_cfg, seed: int) -> dict[str, list[Sample]]:
    splits = _list_one_category_untagged(data_cfg, seed)
    category = str(data_cfg.get("category", "") or "")
    return {k: [dataclasses.replace(s, category=category) for s in v] for k, v in splits.items()}


def _list_one_category_untagged(data_cfg, seed: int) -> dict[str, list[Sample]]:
    fmt = str(data_cfg.format)
    if fmt in ("mvtec", "demo"):
        pool, test = _parse_mvtec(data_cfg)
        all_normals = pool
    elif fmt == "visa":
        pool, test = _parse_visa(data_cfg)
        all_normals = pool
    elif fmt == "folder":
        all_normals, pool, test = _parse_folder(data_cfg, seed)
    else:
        raise DatasetError(f"data.format={fmt!r} is not one of mvtec, visa, folder, demo")

    fold, num_folds = int(data_cfg.get("fold", -1)), int(data_cfg.get("num_folds", 5))
    if fold >= 0:
        if not 0 <= fold < num_folds:
            raise DatasetError(f"data.fold={fold} must be -1 (off) or in [0, data.num_folds={num_folds})")
        if len(all_normals) < num_folds:
            raise DatasetError(f"data.num_folds={num_folds} exceeds the {len(all_normals)} normal images")
        perm = np.random.default_rng([seed, _STREAM_FOLDS]).permutation(len(all_normals))
        held = set(np.array_split(perm, num_folds)[fold].tolist())
        pool = [s for i, s in enumerate(all_normals) if i not in held]
        test = [s for i, s in enumerate(all_normals) if i in held] + [s for s in test if s.label == 1]

    if fmt != "visa":
        pool = _attach_foregrounds(pool, data_cfg)
    train, val = _split_off(pool, float(data_cfg.get("val_fraction", 0.0)), seed)
    if not train:
        raise DatasetError(f"no normal training images for data.format={fmt!r} under {data_cfg.root}")
    return {"train": train, "val": val, "test": test}


# ---------------------------------------------------------------------------------------------------
# Demo data


def ensure_demo_data(config_data, default_root: str) -> str:
    """Returns the demo dataset root (`config_data.root` or `default_root`), generating the synthetic
    rail-fastener scenes there first for every category of data.category ('all': every built-in
    fastener type) whose `<root>/<category>` does not exist yet; a folder from an older generator version is
    reused with a warning on stderr."""
    from diff_fastener_jax.data.demo import (
        DEMO_TYPES,
        generate_demo_dataset,
        stale_generator_message,
    )

    root = str(config_data.get("root", "") or "") or default_root
    names = category_names(config_data.get("category", "")) or ["fastener"]
    if names == ["all"]:
        names = list(DEMO_TYPES)  # every built-in fastener type
    for category in names:
        seed = 0 if category == "fastener" else zlib.crc32(category.encode()) & 0xFFFF  # distinct scenes per name
        if os.path.isdir(os.path.join(root, category)):
            stale = stale_generator_message(os.path.join(root, category))
            if stale:
                print(f"warning: {stale}", file=sys.stderr, flush=True)
            continue
        size = int(min(256, max(32, int(config_data.get("image_size", 128)))))
        try:
            generate_demo_dataset(root, n_train=int(config_data.get("demo_n_train", 64)),
                                  n_test=int(config_data.get("demo_n_test", 48)), size=size, seed=seed,
                                  category=category, framing=str(config_data.get("demo_framing", "fastener")))
        except FileExistsError:
            pass  # another process (multi-host launch) generated it first
    return os.path.abspath(root)
