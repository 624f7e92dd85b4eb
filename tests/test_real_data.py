"""The MVTec reader on the real MPDD metal_plate data, when it is present (not part of the repo)."""

import os

import numpy as np
import pytest
from helpers import ROOT, tiny_config

from diff_fastener_jax.data import datasets

MPDD = os.environ.get("DFJ_MPDD_ROOT", os.path.join(os.path.dirname(ROOT), "shared", "data", "mpdd_metal_plate"))


def _category_root():
    """(root, category) for the MVTec layout, or skip when the data are absent."""
    if not os.path.isdir(MPDD):
        pytest.skip(f"real MPDD data not found at {MPDD}")
    if os.path.isdir(os.path.join(MPDD, "train")):
        return os.path.dirname(MPDD), os.path.basename(MPDD)
    cats = [d for d in os.listdir(MPDD) if os.path.isdir(os.path.join(MPDD, d, "train"))]
    if not cats:
        pytest.skip(f"{MPDD} is not in the MVTec layout")
    return MPDD, cats[0]


def test_mpdd_metal_plate_layout_and_masks():
    root, category = _category_root()
    config = tiny_config(**{"data.format": "mvtec", "data.root": root, "data.category": category})
    train = datasets.list_samples(config.data, "train", seed=0)
    val = datasets.list_samples(config.data, "val", seed=0)
    test = datasets.list_samples(config.data, "test", seed=0)
    assert len(train) + len(val) == 55 and len(val) >= 1
    assert len(test) == 106 and sum(s.label for s in test) == 81
    assert all(s.mask_path for s in test if s.label == 1)
    arrays = datasets.load_arrays([s for s in test if s.label == 1][:4], 64)
    assert arrays["image"].shape == (4, 64, 64, 3)
    assert np.all(arrays["mask"].reshape(4, -1).max(axis=1) == 1.0)  # every defect mask is non-empty


BOTTLE = os.environ.get("DFJ_BOTTLE_ROOT", os.path.join(os.path.dirname(ROOT), "shared", "data", "mvtec_bottle"))


def test_mvtec_bottle_reads_with_image_labels_only():
    """MVTec AD bottle without a ground_truth/ folder: image labels, no masks, pixel metrics undefined."""
    if not os.path.isdir(os.path.join(BOTTLE, "train")):
        pytest.skip(f"real MVTec bottle data not found at {BOTTLE}")
    config = tiny_config(
        **{"data.format": "mvtec", "data.root": os.path.dirname(BOTTLE), "data.category": os.path.basename(BOTTLE)}
    )
    train = datasets.list_samples(config.data, "train", seed=0)
    val = datasets.list_samples(config.data, "val", seed=0)
    test = datasets.list_samples(config.data, "test", seed=0)
    assert len(train) + len(val) == 209 and len(val) >= 1
    assert len(test) == 83 and sum(s.label for s in test) == 63
    assert sorted({s.defect for s in test}) == ["broken_large", "broken_small", "contamination", "good"]
    assert not any(s.mask_path for s in test) and not datasets.has_pixel_labels(test)
