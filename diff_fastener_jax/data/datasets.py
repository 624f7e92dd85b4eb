"""Dataset readers: MVTec AD layout, VisA's split CSV, a generic folder layout, and
the built-in synthetic demo (MVTec layout).

Layouts (paths below `data.root`):

  mvtec / demo  <category>/train/good/*.png                  normal training images
                <category>/test/<defect>/*.png               test images ('good' = normal)
                <category>/ground_truth/<defect>/<stem>_mask.png   one mask per defective test image
                (a category without any ground_truth/ folder has image labels only: its defective
                samples have no mask and `has_pixel_labels` is False)
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
import hashlib
import os
from collections.abc import Sequence

import ml_collections
import numpy as np

from diff_fastener_jax.config import category_names, class_names
from diff_fastener_jax.data.image_io import (
    IMAGE_EXTENSIONS,
    check_decodes,
    image_to_float,
    load_image,
    load_mask,
)
from diff_fastener_jax.data.sizing import as_resize
from diff_fastener_jax.errors import DatasetError

SPLITS = ("train", "val", "test")
VISA_COLUMNS = ("object", "split", "label", "image", "mask")

# Separate random streams per decision, so changing one split never reshuffles another.
_STREAM_FOLDS, _STREAM_VAL, _STREAM_FOLDER_TEST = 1, 2, 3


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
# Decoding a split


def load_sample(sample: Sample, size) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), mask float32 (H, W, 1)) of one sample, the mask at its image's size.
    `size`: an int / (H, W) (exactly that size) or a `sizing.Resize` (`sizing.resize_of(config)`)."""
    image = load_image(sample.path, size)
    return image, load_mask(sample.mask_path, image.shape[:2])


def load_arrays(samples: Sequence[Sample], size) -> dict:
    """Decodes `samples` for evaluation; `size` as in `load_sample`.

    Returns image float32 (N, H, W, 3) in [-1, 1], mask float32 (N, H, W, 1), label int32 (N,),
    defect list[str], path list[str]. Under a resize rule that keeps the aspect ratio the images must
    come out the same size (else DatasetError: load them one by one with `load_sample`).
    """
    rule = as_resize(size)
    n = len(samples)
    if rule.fixed_hw is not None:
        h, w = rule.fixed_hw
        images = np.empty((n, h, w, 3), np.float32)
        masks = np.empty((n, h, w, 1), np.float32)
        for i, s in enumerate(samples):
            image, masks[i] = load_sample(s, rule)
            images[i] = image_to_float(image)
    else:
        decoded = [load_sample(s, rule) for s in samples]
        shapes = sorted({image.shape[:2] for image, _ in decoded})
        if len(shapes) > 1:
            raise DatasetError(
                f"images of {len(shapes)} sizes under data.resize={rule.mode!r} "
                f"(e.g. {shapes[0]} and {shapes[-1]}) do not stack into one array",
                hint="score them one at a time (datasets.load_sample) or use data.resize=square",
            )
        hw = shapes[0] if shapes else (rule.size, rule.size)
        images = np.stack([image_to_float(i) for i, _ in decoded]) if decoded else np.empty((0, *hw, 3), np.float32)
        masks = np.stack([m for _, m in decoded]) if decoded else np.empty((0, *hw, 1), np.float32)
    return {
        "image": images,
        "mask": masks,
        "label": np.array([s.label for s in samples], np.int32),
        "defect": [s.defect for s in samples],
        "path": [s.path for s in samples],
    }


def has_pixel_labels(samples: Sequence[Sample]) -> bool:
    """True when `samples` has anomalous images and every one of them has a mask (pixel metrics are
    defined); False for an image-label-only split (e.g. an MVTec category without ground_truth/, a
    folder layout without masks) or one without anomalous images."""
    anomalous = [s for s in samples if s.label == 1]
    return bool(anomalous) and all(s.mask_path is not None for s in anomalous)


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


def identical_images(samples: Sequence[Sample]) -> list[list[str]]:
    """Groups of two or more image paths of `samples` whose files are byte for byte the same (each group
    and the groups in `samples` order). A copy in a test split counts once more in every metric."""
    groups: dict[str, list[str]] = {}
    for s in samples:
        with open(s.path, "rb") as f:
            groups.setdefault(hashlib.sha256(f.read()).hexdigest(), []).append(s.path)
    return [paths for paths in groups.values() if len(paths) > 1]


def _error_of(path: str) -> DatasetError | None:
    try:
        check_decodes(path)
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
    paths = sorted(
        os.path.join(folder, n) for n in os.listdir(folder) if _is_image(n) and os.path.isfile(os.path.join(folder, n))
    )
    if not paths and not allow_empty:
        raise DatasetError(f"{what}: folder {folder} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
    return paths


def _subdirs(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))


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
    by_stem.update({_stem(m)[: -len("_mask")]: m for m in masks if _stem(m).endswith("_mask")})
    out = []
    for s in normals:
        fg = by_stem.get(_stem(s.path))
        if fg is None:
            raise DatasetError(
                f"foreground masks: normal image {s.path} has no mask in {folder} "
                f"(expected {_stem(s.path)}.png; remove {folder} to use data.foreground)"
            )
        out.append(dataclasses.replace(s, foreground_path=fg))
    return out


def _parse_mvtec(data_cfg) -> tuple[list[Sample], list[Sample]]:
    """(normal training pool, test split) of an MVTec-layout category."""
    cat = _category_dir(data_cfg)
    train = [Sample(p, 0, "good") for p in _images_in(os.path.join(cat, "train", "good"), "MVTec layout train/good")]
    test_dir, gt_dir = os.path.join(cat, "test"), os.path.join(cat, "ground_truth")
    _require_dir(test_dir, "MVTec layout test split")
    # No ground_truth/ at all: image labels only. A ground_truth/ folder that lacks some masks is an
    # error below (a half-annotated split would give wrong pixel metrics).
    image_labels_only = not os.path.exists(gt_dir)
    defects = _subdirs(test_dir)
    if not defects:
        raise DatasetError(f"MVTec layout: {test_dir} has no <defect>/ sub-folders (expected good/ and defects)")
    test: list[Sample] = []
    for defect in defects:
        images = _images_in(os.path.join(test_dir, defect), f"MVTec layout test/{defect}")
        if defect == "good":
            test += [Sample(p, 0, "good") for p in images]
            continue
        if image_labels_only:
            test += [Sample(p, 1, defect) for p in images]
            continue
        masks = _images_in(
            os.path.join(gt_dir, defect),
            f"MVTec layout ground_truth/{defect} (every defective test image needs a mask)",
            allow_empty=True,
        )
        # <stem>_mask.png (MVTec) or, failing that, <stem>.png (some MVTec-style exports).
        by_stem = {_stem(m): m for m in masks if not _stem(m).endswith("_mask")}
        by_stem.update({_stem(m)[: -len("_mask")]: m for m in masks if _stem(m).endswith("_mask")})
        used = set()
        for p in images:
            stem = _stem(p)
            mask = by_stem.get(stem)
            if mask is None:
                raise DatasetError(
                    f"MVTec layout: defective image {p} has no mask "
                    f"(expected {os.path.join(gt_dir, defect, stem + '_mask.png')})"
                )
            used.add(mask)
            test.append(Sample(p, 1, defect, mask))
        orphans = sorted(set(masks) - used)
        if orphans:
            raise DatasetError(
                f"MVTec layout: mask {orphans[0]} has no image in {os.path.join(test_dir, defect)}"
                + (f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else "")
            )
    if os.path.isdir(gt_dir):
        for defect in _subdirs(gt_dir):
            if defect != "good" and defect not in defects:
                raise DatasetError(
                    f"MVTec layout: masks in {os.path.join(gt_dir, defect)} have no images "
                    f"(folder {os.path.join(test_dir, defect)} does not exist)"
                )
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
            raise DatasetError(
                f"VisA layout: {csv_path} lacks column(s) {missing} "
                f"(has {reader.fieldnames}; expected {list(VISA_COLUMNS)})"
            )
        rows = list(enumerate(reader, start=2))  # line numbers for error messages (line 1 = header)
    objects = sorted({r["object"] for _, r in rows})
    if category:
        rows = [(i, r) for i, r in rows if r["object"] == category]
        if not rows:
            raise DatasetError(
                f"VisA layout: no rows for data.category={category!r} in {csv_path} (objects there: {objects})"
            )
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
            raise DatasetError(
                f"folder layout: mask {m} matches no defective image "
                f"(its name must start with an image's stem: <stem>.png, <stem>_mask.png)"
            )
        image = stems[max(cands, key=len)]
        if image in found:
            raise DatasetError(f"folder layout: image {image} has two masks: {found[image]} and {m}")
        found[image] = m
    for p in images:
        if p not in found:
            raise DatasetError(
                f"folder layout: defective image {p} has no mask in {mask_folder} "
                f"(expected {_stem(p)}*.png; remove {os.path.dirname(mask_folder)} "
                f"to run without masks)"
            )
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
            groups.append(
                (
                    t,
                    _images_in(os.path.join(abnormal_dir, t), f"folder layout defect type {t!r}"),
                    os.path.join(mask_root, t) if mask_root else "",
                )
            )
        if not groups:
            raise DatasetError(
                f"folder layout: {abnormal_dir} holds neither images nor <type>/ sub-folders "
                f"(remove it to train from normal images alone)"
            )
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


def list_val_anomalies(data_cfg) -> list[Sample]:
    """The real defective images of `data.val_anomalies` ([] when unset), for validation only.

    The folder holds images directly or in <type>/ sub-folders; if it has a `data.mask_dir` sub-folder,
    every image needs a mask there (<mask_dir>/[<type>/]<stem>*.png, as in the folder layout). These
    samples are never part of any split: `list_splits` (training, calibration, test) does not see them."""
    folder = str(data_cfg.get("val_anomalies", "") or "")
    if not folder:
        return []
    _require_dir(folder, "data.val_anomalies")
    names = category_names(data_cfg.get("category", ""))
    if len(names) > 1 or names == ["all"]:
        raise DatasetError(
            f"data.val_anomalies: a multi-category run (data.category={data_cfg.category!r}) "
            f"cannot tell which category each real anomaly belongs to",
            hint="validate one category per run, or leave data.val_anomalies empty",
        )
    mask_name = str(data_cfg.get("mask_dir", "") or "masks")
    mask_root = os.path.join(folder, mask_name)
    has_masks = os.path.isdir(mask_root)
    groups = []
    direct = _images_in(folder, "data.val_anomalies", allow_empty=True)
    if direct:
        groups.append(("real", direct, mask_root))
    for t in _subdirs(folder):
        if t != mask_name:
            groups.append(
                (t, _images_in(os.path.join(folder, t), f"data.val_anomalies type {t!r}"), os.path.join(mask_root, t))
            )
    if not groups:
        raise DatasetError(f"data.val_anomalies: folder {folder} holds neither images nor <type>/ sub-folders")
    category = names[0] if names else ""
    out = []
    for defect, images, mask_folder in groups:
        masks = _match_masks(images, mask_folder, f"data.val_anomalies masks of {defect!r}") if has_masks else {}
        out += [Sample(p, 1, defect, masks.get(p), category=category) for p in images]
    return out


def check_disjoint(val_anomalies: Sequence[Sample], splits: dict) -> None:
    """Raises DatasetError when a data.val_anomalies image is also in a split (selecting a checkpoint on
    test images, or validating on training images, would bias the run)."""
    used = {os.path.realpath(s.path): split for split, samples in splits.items() for s in samples}
    for s in val_anomalies:
        split = used.get(os.path.realpath(s.path))
        if split is not None:
            raise DatasetError(
                f"data.val_anomalies: {s.path} is also in the {split!r} split",
                hint="point data.val_anomalies at images outside the dataset's splits",
            )


def _split_off(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """(rest, held-out `fraction`) chosen under `seed`; keeps at least one image in `rest`."""
    if fraction <= 0 or len(samples) < 2:
        return list(samples), []
    n_val = min(max(1, int(round(fraction * len(samples)))), len(samples) - 1)
    perm = np.random.default_rng([seed, _STREAM_VAL]).permutation(len(samples))
    held = set(perm[:n_val].tolist())
    return ([s for i, s in enumerate(samples) if i not in held], [s for i, s in enumerate(samples) if i in held])


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
