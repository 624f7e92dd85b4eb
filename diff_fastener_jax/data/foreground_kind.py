"""`data.foreground='auto'`: does a category show one object on a background ('otsu') or a surface
('full')? Decided once, from the training normals, before training starts.

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
"""

from __future__ import annotations

import ml_collections
import numpy as np

from diff_fastener_jax.data.image_io import image_to_float, load_image
from diff_fastener_jax.data.sizing import resize_of
from diff_fastener_jax.data.synthesis import MIN_FOREGROUND_SHARE, otsu_object
from diff_fastener_jax.errors import DatasetError

AUTO = "auto"
OBJECT_MIN_SEPARABILITY = 0.8
OBJECT_MAX_OUTLINE = 16.0  # image sides (sqrt(H * W)) of boundary between the Otsu classes
SAMPLE_IMAGES = 32


def otsu_split_facts(image: np.ndarray) -> dict:
    """{'separability', 'outline', 'object_share'} of the Otsu split of `image` (H, W, 3) in [-1, 1]:
    between-class over total grey-level variance, the boundary length in image sides (4-neighbour class
    changes / sqrt(H * W)), and the share of the object class (the one `foreground_mask` takes)."""
    gray, obj = otsu_object(image)
    gray = gray.astype(np.float64)  # (H, W) in [0, 1]
    h, w = gray.shape
    share = float(obj.mean())
    total = float(gray.var())
    if share in (0.0, 1.0) or total <= 0.0:
        return {"separability": 0.0, "outline": 0.0, "object_share": share}
    between = share * (1.0 - share) * (gray[obj].mean() - gray[~obj].mean()) ** 2
    changes = np.count_nonzero(obj[1:] != obj[:-1]) + np.count_nonzero(obj[:, 1:] != obj[:, :-1])
    return {"separability": between / total, "outline": changes / float(np.sqrt(h * w)), "object_share": share}


def shows_object(facts: dict) -> bool:
    """Whether one image's Otsu split (`otsu_split_facts`) is an object on a background."""
    return (
        facts["separability"] >= OBJECT_MIN_SEPARABILITY
        and facts["outline"] <= OBJECT_MAX_OUTLINE
        and facts["object_share"] >= MIN_FOREGROUND_SHARE
    )


def resolve(config: ml_collections.ConfigDict, train_samples) -> tuple[ml_collections.ConfigDict, dict | None]:
    """(config, record): `config` as it is with record None unless data.foreground is 'auto'; then a copy
    with 'otsu' or 'full', decided from up to SAMPLE_IMAGES evenly spaced `train_samples` at the
    training resolution, and the record {'foreground', 'object_images', 'images', 'separability_median',
    'outline_median'}. Deterministic: the same samples give the same choice (a resume repeats it)."""
    if config.data.foreground != AUTO:
        return config, None
    samples = sorted(train_samples, key=lambda s: s.path)
    if not samples:
        raise DatasetError("data.foreground='auto': no training images to decide from")
    picks = np.unique(np.linspace(0, len(samples) - 1, min(SAMPLE_IMAGES, len(samples))).round().astype(int))
    rule = resize_of(config)
    facts = [otsu_split_facts(image_to_float(load_image(samples[i].path, rule))) for i in picks]
    objects = sum(shows_object(f) for f in facts)
    chosen = "otsu" if 2 * objects >= len(facts) else "full"
    out = ml_collections.ConfigDict(config.to_dict())
    out.data.foreground = chosen
    return out, {
        "foreground": chosen,
        "object_images": int(objects),
        "images": len(facts),
        "separability_median": float(np.median([f["separability"] for f in facts])),
        "outline_median": float(np.median([f["outline"] for f in facts])),
    }
