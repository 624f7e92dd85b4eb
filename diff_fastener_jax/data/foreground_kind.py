"""The 'auto' settings decided once, from the training normals, before training starts:
`data.foreground='auto'` (one object on a background, 'otsu', or a surface, 'full'?) and
`infer.normal_map='auto'` (an object that keeps one pose, ONE_POSE_NORMAL_MAP, or not, 'off'?).

Synthesis draws its anomalies inside the image's Otsu object for objects and anywhere for surfaces
(textures). On a plain surface the Otsu split is not an object but one half of the surface's shades, so
'otsu' would teach defects in half of it only. Two facts of an image's Otsu split say "object":

- **two populations of grey levels**: Otsu's separability, between-class variance over total variance,
  is at least OBJECT_MIN_SEPARABILITY. A unimodal Gaussian histogram gives 2/pi = 0.64, a uniform one
  (a smooth illumination gradient) 0.75, two well-apart populations close to 1;
- **an outline, not a texture**: the two classes meet along at most OBJECT_MAX_OUTLINE image sides of
  boundary (class changes between 4-neighbours, divided by sqrt(H * W): a disc filling the image gives 4),
  whereas the shades of a textured surface interleave along tens to hundreds of sides.

Measured at the recipe's 256² (docs/experiments.md): MPDD plates and MVTec bottles have separability
>= 0.91 and outlines of 3.6-7 sides. Constructed grey surfaces fail one test or both: noise, stains,
vignetted or brushed metal, woven or blotched textures 0.63-0.81 with 70-256 sides; a smooth gradient
0.75 with 1 side; tiles with grout 0.93 with 28 sides. A category is 'otsu' when at least half of up
to SAMPLE_IMAGES evenly spaced training normals pass both tests, else 'full'.

`infer.normal_map='auto'` asks a third question of the same images: does the object keep one pose? The
normal map (deploy/normal_map.py) is the per-pixel mean of the held-out normals' anomaly maps; it
removes the networks' response to the object's fixed structure only where that structure sits at the
same pixels in every image. The sampled normals' Otsu objects say so when their median pairwise
intersection over union is at least POSE_MIN_OVERLAP. Measured at 256²: MVTec bottles, photographed
from above in one place, 0.98 (the lowest pair 0.95); MPDD plates, laid at varying positions and
angles, 0.61. Then ONE_POSE_NORMAL_MAP, else 'off'; always 'off' for a surface (no object to keep a
pose), for a multi-category model (one map per model) and with fewer held-out normals than it needs
(`normal_map.min_normals`).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from diff_fastener_jax.config import class_names
from diff_fastener_jax.config_schema import AUTO, ONE_POSE_NORMAL_MAP
from diff_fastener_jax.data.image_io import image_to_float, load_image
from diff_fastener_jax.data.sizing import resize_of
from diff_fastener_jax.data.synthesis import MIN_FOREGROUND_SHARE, otsu_object
from diff_fastener_jax.deploy import normal_map
from diff_fastener_jax.errors import DatasetError

OBJECT_MIN_SEPARABILITY = 0.8
OBJECT_MAX_OUTLINE = 16.0  # image sides (sqrt(H * W)) of boundary between the Otsu classes
SAMPLE_IMAGES = 32
POSE_MIN_OVERLAP = 0.9  # median pairwise IoU of the normals' Otsu objects that says "one pose"


def otsu_split_facts(image: np.ndarray) -> dict:
    """{'separability', 'outline', 'object_share'} of the Otsu split of `image` (H, W, 3) in [-1, 1]:
    between-class over total grey-level variance, the boundary length in image sides (4-neighbour class
    changes / sqrt(H * W)), and the share of the object class (the one `foreground_mask` takes)."""
    return _otsu_split(image)[0]


def _otsu_split(image: np.ndarray) -> tuple[dict, np.ndarray]:
    """(`otsu_split_facts` of `image`, its Otsu object mask (H, W) bool)."""
    gray, obj = otsu_object(image)
    gray = gray.astype(np.float64)  # (H, W) in [0, 1]
    h, w = gray.shape
    share = float(obj.mean())
    total = float(gray.var())
    if share in (0.0, 1.0) or total <= 0.0:
        return {"separability": 0.0, "outline": 0.0, "object_share": share}, obj
    between = share * (1.0 - share) * (gray[obj].mean() - gray[~obj].mean()) ** 2
    changes = np.count_nonzero(obj[1:] != obj[:-1]) + np.count_nonzero(obj[:, 1:] != obj[:, :-1])
    facts = {"separability": between / total, "outline": changes / float(np.sqrt(h * w)), "object_share": share}
    return facts, obj


def pose_overlap(masks: list[np.ndarray]) -> float:
    """The median intersection over union of all pairs of `masks` (each (H, W) bool, one shape): 1.0
    when every mask is the same, 0.0 for disjoint ones (and for two empty ones)."""
    if len(masks) < 2:
        raise ValueError(f"pose_overlap: needs at least 2 masks, got {len(masks)}")
    flat = np.stack([m.reshape(-1) for m in masks]).astype(np.float64)  # (N, H * W)
    inter = flat @ flat.T  # (N, N) pixels each pair shares
    area = flat.sum(axis=1)  # (N,)
    union = area[:, None] + area[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return float(np.median(iou[np.triu_indices(len(masks), k=1)]))


def shows_object(facts: dict) -> bool:
    """Whether one image's Otsu split (`otsu_split_facts`) is an object on a background."""
    return (
        facts["separability"] >= OBJECT_MIN_SEPARABILITY
        and facts["outline"] <= OBJECT_MAX_OUTLINE
        and facts["object_share"] >= MIN_FOREGROUND_SHARE
    )


def resolve(
    config: ml_collections.ConfigDict, train_samples, held_out_normals: int | None = None
) -> tuple[ml_collections.ConfigDict, dict | None]:
    """(config, record): `config` as it is with record None unless data.foreground or infer.normal_map
    is 'auto'; then a copy with each 'auto' decided from up to SAMPLE_IMAGES evenly spaced
    `train_samples` at the training resolution ('otsu' or 'full'; ONE_POSE_NORMAL_MAP or 'off'), and the facts
    behind the choices: {'images'}, with {'foreground', 'object_images', 'separability_median',
    'outline_median'} and {'normal_map', 'pose_overlap', 'held_out_normals'} for the settings that were
    'auto'. `held_out_normals`: how many normals the normal map would be fitted on (fewer than
    it needs: 'off'); None where the caller does not use the normal map.
    Deterministic: the same samples give the same choices (a resume repeats them)."""
    auto_foreground = config.data.foreground == AUTO
    auto_normal_map = config.infer.normal_map == AUTO
    if not (auto_foreground or auto_normal_map):
        return config, None
    samples = sorted(train_samples, key=lambda s: s.path)
    if not samples:
        raise DatasetError("data.foreground / infer.normal_map 'auto': no training images to decide from")
    picks = np.unique(np.linspace(0, len(samples) - 1, min(SAMPLE_IMAGES, len(samples))).round().astype(int))
    rule = resize_of(config)
    splits = [_otsu_split(image_to_float(load_image(samples[i].path, rule))) for i in picks]
    facts = [f for f, _ in splits]
    out = ml_collections.ConfigDict(config.to_dict())
    record: dict = {"images": len(facts)}
    if auto_foreground:
        objects = sum(shows_object(f) for f in facts)
        out.data.foreground = "otsu" if 2 * objects >= len(facts) else "full"
        record.update(
            foreground=out.data.foreground,
            object_images=int(objects),
            separability_median=float(np.median([f["separability"] for f in facts])),
            outline_median=float(np.median([f["outline"] for f in facts])),
        )
    if auto_normal_map:
        # one map per model, and a surface has no object to keep a pose
        one_object = out.data.foreground == "otsu" and not class_names(out) and len(splits) > 1
        overlap = pose_overlap([mask for _, mask in splits]) if one_object else None
        fits = held_out_normals is None or held_out_normals >= normal_map.min_normals(ONE_POSE_NORMAL_MAP)
        one_pose = overlap is not None and overlap >= POSE_MIN_OVERLAP
        out.infer.normal_map = ONE_POSE_NORMAL_MAP if one_pose and fits else "off"
        record.update(normal_map=out.infer.normal_map, pose_overlap=overlap, held_out_normals=held_out_normals)
    return out, record


def describe(record: dict) -> str:
    """The training log's lines for a `resolve` record, one per resolved setting."""
    lines = []
    if "foreground" in record:
        lines.append(
            f"data.foreground auto -> {record['foreground']}: {record['object_images']} of "
            f"{record['images']} training images show one object on a background"
        )
    if "normal_map" in record:
        overlap, held_out = record["pose_overlap"], record["held_out_normals"]
        why = (
            "no single object to keep a pose (a surface, a multi-category model or one image)"
            if overlap is None
            else f"the objects of {record['images']} training images overlap by {overlap:.2f} "
            f"(median IoU; one pose from {POSE_MIN_OVERLAP})"
        )
        need = normal_map.min_normals(ONE_POSE_NORMAL_MAP)
        if held_out is not None and held_out < need:
            why += f"; {held_out} held-out normal image(s) are too few to fit a normal map on ({need})"
        lines.append(f"infer.normal_map auto -> {record['normal_map']}: {why}")
    return "\n".join(lines)
