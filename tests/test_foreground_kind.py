"""The 'auto' settings: for data.foreground, the two facts of an image's Otsu split against closed
forms, objects told from surfaces and the category-level choice; for infer.normal_map, the pose overlap
against closed forms and the choice on objects in one pose, in varying poses and on surfaces; training
saving and logging what it chose."""

import json
import os

import numpy as np
import pytest
from helpers import tiny_config
from PIL import Image

from diff_fastener_jax.config_schema import ONE_POSE_NORMAL_MAP
from diff_fastener_jax.data import foreground_kind, synthesis
from diff_fastener_jax.data.datasets import Sample
from diff_fastener_jax.deploy import normal_map

SIDE = 256


def _grey(g: np.ndarray) -> np.ndarray:
    """(H, W) grey levels in [0, 1] -> (H, W, 3) in [-1, 1], as the images reach synthesis."""
    return np.repeat((np.clip(g, 0.0, 1.0) * 2.0 - 1.0)[..., None], 3, axis=-1).astype(np.float32)


def _disc(radius: float, rng=None, noise: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] + 0.5
    inside = (yy - SIDE / 2) ** 2 + (xx - SIDE / 2) ** 2 < radius**2
    g = np.where(inside, 0.8, 0.2)
    if noise:
        g = g + noise * rng.standard_normal(g.shape)
    return _grey(g)


def _objects(rng) -> dict:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1)
    plate = 0.85 + 0.03 * rng.standard_normal((SIDE, SIDE))  # a dark textured plate on a bright table
    plate[60:200, 40:210] = 0.3 + 0.1 * xx[60:200, 40:210] + 0.04 * rng.standard_normal((140, 170))
    return {"bright disc": _disc(70, rng, 0.03), "dark plate": _grey(plate)}


def _surfaces(rng) -> dict:
    from scipy.ndimage import gaussian_filter1d

    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / (SIDE - 1)
    noise = rng.standard_normal((SIDE, SIDE))
    tiles = np.full((SIDE, SIDE), 0.7)
    for k in (0, 1):  # 2 px grout lines every 32 px
        tiles[k::32, :] = tiles[:, k::32] = 0.25
    return {
        "sensor noise": _grey(0.5 + 0.1 * noise),
        "lit from one side": _grey(0.3 + 0.4 * xx + 0.05 * noise),
        "smooth gradient": _grey(0.3 + 0.4 * xx),  # one straight outline, but no two populations (0.75)
        "vignetted metal": _grey(0.65 - 0.35 * ((yy - 0.5) ** 2 + (xx - 0.5) ** 2) + 0.04 * noise),
        "brushed metal": _grey(0.5 + gaussian_filter1d(0.3 * noise, 12, axis=1) + 0.02 * noise),
        "tiles and grout": _grey(tiles + 0.04 * noise),
    }


def test_the_split_facts_match_closed_forms():
    # Two grey levels: every bit of variance lies between the classes. A digital disc of radius r meets
    # the background at about 8r 4-neighbour pairs (2r rows and 2r columns, crossed twice each).
    disc = foreground_kind.otsu_split_facts(_disc(40))
    assert disc["separability"] == pytest.approx(1.0, abs=1e-9)
    assert disc["outline"] == pytest.approx(8 * 40 / SIDE, rel=0.03)
    assert disc["object_share"] == pytest.approx(np.pi * 40**2 / SIDE**2, rel=0.02)
    # A Gaussian split at its mean: between-class over total variance is 2/pi.
    noise = 0.5 + 0.1 * np.random.default_rng(0).standard_normal((1024, 1024))
    gauss = foreground_kind.otsu_split_facts(_grey(noise))
    assert gauss["separability"] == pytest.approx(2 / np.pi, abs=0.01)
    # independent pixels split at the median: half of the 2 * 1024 * 1023 neighbour pairs differ
    assert gauss["outline"] == pytest.approx(1024 * 1023 / 1024, rel=0.01)
    flat = foreground_kind.otsu_split_facts(_grey(np.full((SIDE, SIDE), 0.5)))
    assert flat["separability"] == 0.0 and not foreground_kind.shows_object(flat)


def test_objects_are_told_from_surfaces():
    rng = np.random.default_rng(1)
    for name, image in _objects(rng).items():
        facts = foreground_kind.otsu_split_facts(image)
        assert foreground_kind.shows_object(facts), (name, facts)
    for name, image in _surfaces(rng).items():
        facts = foreground_kind.otsu_split_facts(image)
        assert not foreground_kind.shows_object(facts), (name, facts)


def _write(folder, images: list[np.ndarray]) -> list[Sample]:
    os.makedirs(folder, exist_ok=True)
    samples = []
    for i, x in enumerate(images):
        path = os.path.join(folder, f"{i:03d}.png")
        Image.fromarray(np.round((x + 1.0) * 127.5).astype(np.uint8)).save(path)
        samples.append(Sample(path=path, label=0, defect="good"))
    return samples


def test_a_category_is_otsu_when_most_normals_show_an_object(tmp_path):
    rng = np.random.default_rng(2)
    config = tiny_config(**{"data.foreground": "auto", "data.image_size": SIDE})
    discs = [_disc(r, rng, 0.03) for r in np.linspace(40, 90, 30)]
    surfaces = list(_surfaces(rng).values())
    # 40 images, 30 of them objects: SAMPLE_IMAGES (32) evenly spaced ones decide
    mostly_objects = _write(tmp_path / "a", discs + (surfaces * 2)[:10])
    chosen, record = foreground_kind.resolve(config, list(reversed(mostly_objects)))  # order-independent
    assert chosen.data.foreground == "otsu" and config.data.foreground == "auto"  # a copy
    assert record["images"] == foreground_kind.SAMPLE_IMAGES and record["foreground"] == "otsu"
    assert record["object_images"] == 24  # picks 0, 1.26, ... round to 24 discs of the first 30
    assert foreground_kind.resolve(config, mostly_objects)[1] == record  # deterministic

    only_surfaces = _write(tmp_path / "b", surfaces + discs[:2])
    chosen, record = foreground_kind.resolve(config, only_surfaces)
    assert chosen.data.foreground == "full"
    assert (record["object_images"], record["images"]) == (2, len(surfaces) + 2)

    fixed = tiny_config(**{"data.foreground": "otsu"})
    assert foreground_kind.resolve(fixed, only_surfaces) == (fixed, None)


def _square(top: int, left: int, side: int = 100) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), bool)
    mask[top : top + side, left : left + side] = True
    return mask


def test_the_pose_overlap_is_the_median_pairwise_iou():
    # a square of side a and the same square moved s px along a row overlap by (a - s) / (a + s)
    assert foreground_kind.pose_overlap([_square(50, 50), _square(50, 50)]) == 1.0
    assert foreground_kind.pose_overlap([_square(50, 50), _square(50, 70)]) == pytest.approx(80 / 120)
    assert foreground_kind.pose_overlap([_square(0, 0), _square(150, 150)]) == 0.0
    # three masks, three pairs: 1.0, 80/120 and 80/120 -> the median 2/3
    three = [_square(50, 50), _square(50, 50), _square(50, 70)]
    assert foreground_kind.pose_overlap(three) == pytest.approx(2 / 3)
    assert foreground_kind.pose_overlap([np.zeros((4, 4), bool)] * 2) == 0.0
    with pytest.raises(ValueError, match="at least 2 masks"):
        foreground_kind.pose_overlap([_square(0, 0)])


def _shifted_disc(dy: int, dx: int, rng) -> np.ndarray:
    return np.roll(_disc(70, rng, 0.03), (dy, dx), axis=(0, 1))


def test_normal_map_auto_fits_one_only_for_an_object_in_one_pose(tmp_path):
    rng = np.random.default_rng(3)
    config = tiny_config(**{"data.foreground": "auto", "infer.normal_map": "auto", "data.image_size": SIDE})
    # the same disc within 2 px: IoU >= 0.95
    one_pose = _write(tmp_path / "a", [_shifted_disc(*rng.integers(-2, 3, 2), rng) for _ in range(8)])
    chosen, record = foreground_kind.resolve(config, one_pose)
    assert (chosen.data.foreground, chosen.infer.normal_map) == ("otsu", ONE_POSE_NORMAL_MAP)
    assert record["pose_overlap"] >= 0.95 and record["images"] == 8
    assert f"infer.normal_map auto -> {ONE_POSE_NORMAL_MAP}: the objects of 8 training images overlap by" in (
        foreground_kind.describe(record)
    )
    # the same disc anywhere within 60 px: IoU mostly below 0.6
    moved = _write(tmp_path / "b", [_shifted_disc(*rng.integers(-60, 61, 2), rng) for _ in range(8)])
    chosen, record = foreground_kind.resolve(config, moved)
    assert (chosen.data.foreground, chosen.infer.normal_map) == ("otsu", "off")
    assert record["pose_overlap"] < foreground_kind.POSE_MIN_OVERLAP
    # a surface has no object to keep a pose: 'off' without an overlap
    surfaces = _write(tmp_path / "c", list(_surfaces(rng).values()))
    chosen, record = foreground_kind.resolve(config, surfaces)
    assert (chosen.data.foreground, chosen.infer.normal_map, record["pose_overlap"]) == ("full", "off", None)
    # one pose, but too few held-out normals to fit a map on (the calibration's minimum)
    need = normal_map.min_normals(ONE_POSE_NORMAL_MAP)
    chosen, record = foreground_kind.resolve(config, one_pose, held_out_normals=need - 1)
    assert chosen.infer.normal_map == "off" and record["held_out_normals"] == need - 1
    assert f"{need - 1} held-out normal image(s) are too few" in foreground_kind.describe(record)
    assert foreground_kind.resolve(config, one_pose, held_out_normals=need)[0].infer.normal_map == ONE_POSE_NORMAL_MAP
    # foreground set by the user: only the normal map is decided, and only it is recorded
    fixed = tiny_config(**{"data.foreground": "otsu", "infer.normal_map": "auto", "data.image_size": SIDE})
    chosen, record = foreground_kind.resolve(fixed, one_pose)
    assert chosen.infer.normal_map == ONE_POSE_NORMAL_MAP and "foreground" not in record
    # a unified model of several categories shares no normal map
    unified = tiny_config(**{"infer.normal_map": "auto", "data.category": "a,b", "data.image_size": SIDE})
    assert foreground_kind.resolve(unified, one_pose)[0].infer.normal_map == "off"


def test_auto_is_a_setting_that_synthesis_never_sees_unresolved():
    from diff_fastener_jax.config import validate_config
    from diff_fastener_jax.inference import scores_otsu_foreground

    config = tiny_config(**{"data.foreground": "auto", "infer.score_region": "foreground"})
    validate_config(config, check_data=False)
    assert scores_otsu_foreground(config)  # an untrained config builds the costlier, Otsu program
    with pytest.raises(ValueError, match="'auto' is resolved from the training images first"):
        synthesis.foreground_mask(_disc(40), "auto")


def test_training_saves_and_logs_the_choices(demo_root, tmp_path):
    from diff_fastener_jax.data import datasets
    from diff_fastener_jax.training.loop import train_and_evaluate

    config = tiny_config(
        **{"data.root": demo_root, "data.foreground": "auto", "infer.normal_map": "auto", "train.num_steps": 2}
    )
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir, quiet=True)
    splits = datasets.list_splits(config.data, seed=config.seed)
    held_out = sum(s.label == 0 for s in splits["val"])
    _, want = foreground_kind.resolve(config, splits["train"], held_out)
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert (saved["data"]["foreground"], saved["infer"]["normal_map"]) == (want["foreground"], want["normal_map"])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        events = [r for r in map(json.loads, f) if r.get("event") == "auto"]
    assert len(events) == 1 and {k: events[0][k] for k in want} == want
