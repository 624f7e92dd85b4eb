"""Scoring a folder of images with a Detector: anomaly maps, overlays, verdicts and scores.csv."""

from __future__ import annotations

import csv
import glob
import os
import sys

import numpy as np
from PIL import Image

from diff_fastener_jax.data import image_io
from diff_fastener_jax.deploy import heatmap
from diff_fastener_jax.deploy.detector import Detector
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.evaluation import outputs
from diff_fastener_jax.logging_utils import ProgressBar

MAP_FORMATS = ("png16", "npy")


def find_images(spec: str) -> list[str]:
    """A folder (its image files, sorted) or a glob pattern; UserError when nothing matches."""
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec))
        paths = [p for p in paths if os.path.isfile(p) and p.lower().endswith(image_io.IMAGE_EXTENSIONS)]
    else:
        paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    if not paths:
        raise UserError(
            f"--images {spec!r}: no image files found",
            hint=f"give a folder of {'/'.join(image_io.IMAGE_EXTENSIONS)} files or a quoted glob",
        )
    return paths


def images_root(spec: str) -> str:
    """The folder an --images spec names: the folder itself, or a glob's folders before its first
    wildcard ('site/*/*.png' -> 'site'). scores.csv paths and output names are relative to it."""
    if os.path.isdir(spec):
        return spec
    parts = spec.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return os.sep.join(fixed) or (os.sep if spec.startswith(os.sep) else ".")


def output_stems(relative_paths: list[str]) -> list[str]:
    """Output file stems from the inputs' paths relative to the images root, unique by construction:
    'a/img.png' -> 'a/img' (a subfolder of --out), and where two inputs differ only in their extension
    ('img.png', 'img.tif') each keeps it ('img_png', 'img_tif')."""
    stems = [os.path.splitext(r)[0] for r in relative_paths]
    repeated = {s for s in stems if stems.count(s) > 1}
    return [r.replace(".", "_") if s in repeated else s for r, s in zip(relative_paths, stems)]


def write_outputs(
    out_dir: str, stem: str, img: Image.Image, amap: np.ndarray, mask: np.ndarray, maps: str = "png16"
) -> None:
    """<stem>_overlay.png, <stem>_map.png|.npy and <stem>_mask.png for one image at its own size
    (`stem` may hold subfolders: they are created)."""
    os.makedirs(os.path.dirname(os.path.join(out_dir, stem)), exist_ok=True)
    h, w = amap.shape
    rgb = image_io.prepare_image(img, (h, w))  # (h, w, 3) uint8: 16-bit and grey read as in training
    Image.fromarray(heatmap.heat_overlay(rgb, amap, stem)).save(os.path.join(out_dir, f"{stem}_overlay.png"))
    if maps == "npy":
        np.save(os.path.join(out_dir, f"{stem}_map.npy"), amap.astype(np.float32))
    else:
        u16 = np.round(np.clip(amap, 0.0, 1.0) * 65535.0).astype(np.uint16)
        Image.fromarray(u16).save(os.path.join(out_dir, f"{stem}_map.png"))
    Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(out_dir, f"{stem}_mask.png"))


FROM_FOLDER = "from_folder"


def categories_of(paths: list[str], category: str | None) -> list[str] | None:
    """Each image's category for a unified model: `category` for all, or with 'from_folder' the name of
    the folder holding each image (images/<category>/*.png); None when no category is given."""
    if not category:
        return None
    if category == FROM_FOLDER:
        return [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    return [category] * len(paths)


def predict(
    det: Detector,
    paths: list[str],
    out_dir: str,
    *,
    maps: str = "png16",
    show_progress: bool = True,
    category: str | None = None,
    root: str | None = None,
) -> dict:
    """Scores `paths` with `det`; writes scores.csv, the per-image files and errors.csv (if any).

    `category`: for a unified multi-category model, the category of every image, or 'from_folder'.
    `root`: the folder the paths are given relative to in scores.csv and the output names (default:
    the deepest folder holding them all). Returns {"scored": n, "errors": [(path, reason)], "threshold": t}.
    """
    cats = categories_of(paths, category)
    det.class_ids(cats, len(paths))  # an unknown or missing category fails before anything is written
    if maps not in MAP_FORMATS:
        raise UserError(f"--maps must be one of {MAP_FORMATS}, got {maps!r}")
    os.makedirs(out_dir, exist_ok=True)
    if root is None:
        root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else "."
    relative = [outputs.relative_path(p, root) for p in paths]
    stems = output_stems(relative)
    bs = det.config.infer.batch_size
    errors: list[tuple[str, str]] = []
    bar = ProgressBar(len(paths), "images", disable=not show_progress)
    with outputs.ScoresWriter(os.path.join(out_dir, "scores.csv")) as rows:
        for i0 in range(0, len(paths), bs):
            ok, images = [], []
            for i in range(i0, min(i0 + bs, len(paths))):
                try:
                    images.append(det.read(paths[i], paths[i]))
                    ok.append(i)
                except UserError as e:  # report the file by name and go on with the rest
                    errors.append((relative[i], str(e)))
                    print(f"[error] {e}", file=sys.stderr)
            if ok:
                out = det.predict(images, None if cats is None else [cats[i] for i in ok])
                for j, i in enumerate(ok):
                    write_outputs(out_dir, stems[i], images[j], out.anomaly_maps[j], out.masks[j], maps)
                    rows.row(
                        relative[i],
                        det.config.data.category if cats is None else cats[i],
                        "",
                        None,
                        out.labels[j],
                        out.scores[j],
                        out.thresholds[j],
                        out.denoise_steps[j],
                    )
            bar.update(min(i0 + bs, len(paths)) - i0)
    bar.close()
    if errors:
        with open(os.path.join(out_dir, "errors.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "error"])
            w.writerows(errors)
    return {"scored": len(paths) - len(errors), "errors": errors, "threshold": det.threshold}
