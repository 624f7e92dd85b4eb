"""The synthetic rail-fastener demo dataset: layout, masks, README, determinism, visible defects."""

import os

import numpy as np
import pytest
from PIL import Image

from diff_fastener_jax.config_schema import base_config
from diff_fastener_jax.data import demo
from diff_fastener_jax.data.datasets import list_samples


def _read(path):
    return np.asarray(Image.open(path))


def test_layout_masks_and_readme(tmp_path):
    cat = demo.generate_demo_dataset(tmp_path, n_train=5, n_test=9, size=32, seed=0)
    assert cat == tmp_path / "fastener"
    assert len(os.listdir(cat / "train" / "good")) == 5
    counts = {k: len(os.listdir(cat / "test" / k)) for k in ("good",) + demo.DEFECTS}
    assert sum(counts.values()) == 9 and min(counts.values()) >= 2
    for d in demo.DEFECTS:
        for name in os.listdir(cat / "test" / d):
            image = _read(cat / "test" / d / name)
            mask = _read(cat / "ground_truth" / d / name.replace(".png", "_mask.png"))
            assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
            assert set(np.unique(mask)) == {0, 255}  # binary and non-empty
    assert not (cat / "ground_truth" / "good").exists()
    assert "SYNTHETIC" in (tmp_path / "README.txt").read_text()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no leftover temp folder

    c = base_config("demo")
    c.data.root, c.data.image_size, c.data.val_fraction = str(tmp_path), 32, 0.0
    test = list_samples(c.data, "test", seed=0)
    assert len(list_samples(c.data, "train", seed=0)) == 5 and len(test) == 9
    assert sorted({s.defect for s in test}) == sorted(("good",) + demo.DEFECTS)
    with pytest.raises(FileExistsError):
        demo.generate_demo_dataset(tmp_path, n_train=5, n_test=9, size=32)


def test_deterministic_under_seed(tmp_path):
    a = demo.generate_demo_dataset(tmp_path / "a", n_train=2, n_test=4, size=32, seed=5)
    b = demo.generate_demo_dataset(tmp_path / "b", n_train=2, n_test=4, size=32, seed=5)
    c = demo.generate_demo_dataset(tmp_path / "c", n_train=2, n_test=4, size=32, seed=6)
    rel = os.path.join("test", "broken_clip", "000.png")
    assert np.array_equal(_read(a / rel), _read(b / rel))
    assert not np.array_equal(_read(a / rel), _read(c / rel))


@pytest.mark.parametrize("fastener", demo.FASTENER_TYPES)
@pytest.mark.parametrize("defect", demo.DEFECTS)
def test_defects_are_visible_and_localised(defect, fastener):
    """A defective scene differs from its normal twin (same random state) strongly inside the mask and
    hardly anywhere else, for both fastener types: every clearly visible change is labelled, the clip's
    drop shadow included (without it, ~100 changed pixels per missing omega clip at 64 px would count
    as normal)."""
    for seed in range(4):
        good, empty = demo.render_scene(64, np.random.default_rng(seed), fastener=fastener)
        bad, mask = demo.render_scene(64, np.random.default_rng(seed), defect, fastener)
        assert not empty.any() and mask.sum() >= 20
        diff = np.abs(good.astype(np.float32) - bad.astype(np.float32)).mean(axis=-1)  # grey levels
        assert diff[mask].mean() > 25.0
        assert not (diff[~mask] > 40).any(), "a clearly visible change lies outside the mask"
        assert (diff[~mask] > 20).sum() <= 10  # antialiased edges only
        grown = mask.copy()  # allow the soft edges just outside the mask
        for axis in (0, 1):
            for shift in (-1, 1):
                grown |= np.roll(mask, shift, axis=axis)
        assert diff[~grown].mean() < 0.5


def test_cli(tmp_path, capsys):
    demo.main(["--out", str(tmp_path), "--n-train", "2", "--n-test", "4", "--size", "32"])
    assert "SYNTHETIC" in capsys.readouterr().out
    assert len(os.listdir(tmp_path / "fastener" / "test")) == 4


def test_the_two_fastener_types_look_different():
    omega, _ = demo.render_scene(64, np.random.default_rng(0), fastener="omega")
    bar, _ = demo.render_scene(64, np.random.default_rng(0), fastener="bar")
    # Timber vs concrete sleeper: the sleeper band is markedly browner (red minus blue) on the bar type.
    band = slice(24, 40)
    warmth = lambda im: float(im[band, :, 0].astype(np.float32).mean() - im[band, :, 2].astype(np.float32).mean())  # noqa: E731
    assert warmth(bar) > warmth(omega) + 15
    assert demo.fastener_type_of("fastener_bar") == "bar" and demo.fastener_type_of("fastener") == "omega"
    with pytest.raises(ValueError, match="fastener type"):
        demo.render_scene(32, np.random.default_rng(0), fastener="spike")


@pytest.mark.parametrize("defect", demo.DEFECTS)
def test_fastener_framing_crops_the_defective_clip_whole(defect):
    """A fastener crop (the default framing) is the half of a twice-as-large track scene that holds the
    defective clip: all of the defect's mask lies inside the crop, and the clip is about 4x the area of
    a clip in the track framing at the same image size."""
    from diff_fastener_jax.data.demo import _render_track

    for seed in range(4):
        _, mask = demo.render_scene(64, np.random.default_rng(seed), defect)
        _, full_mask, _, _ = _render_track(128, np.random.default_rng(seed), defect, "omega")
        assert mask.shape == (64, 64) and mask.sum() == full_mask.sum() > 0
        _, track_mask = demo.render_scene(64, np.random.default_rng(seed), defect, framing="track")
        if defect == "missing_clip":  # the mask is the whole clip
            assert 3.0 < mask.sum() / track_mask.sum() < 5.0
    with pytest.raises(ValueError, match="framing"):
        demo.render_scene(32, np.random.default_rng(0), framing="closeup")


def test_fastener_crops_are_mirrored_to_one_orientation():
    """A right-hand fastener's crop is the mirror image of its window of the track scene, so every crop
    shows the rail on the same side (the right), as inspection systems normalise their crops."""
    from diff_fastener_jax.data.demo import _render_track

    sides = set()
    for seed in range(6):
        image, mask, zone = demo.render_scene_with_zone(64, np.random.default_rng(seed), "broken_clip")
        full, full_mask, full_zone, side = _render_track(128, np.random.default_rng(seed), "broken_clip", "omega")
        sides.add(side)
        window = (slice(32, 96), slice(0, 64)) if side == 0 else (slice(32, 96), slice(127, 63, -1))
        np.testing.assert_array_equal(image, full[window])
        np.testing.assert_array_equal(mask, full_mask[window])
        np.testing.assert_array_equal(zone, full_zone[window])
        # the rail's polished head (the brightest band) lies in the right quarter of every crop
        column_brightness = image.astype(np.float32).mean(axis=(0, 2))
        assert int(np.argmax(column_brightness)) >= 48, column_brightness.round()
    assert sides == {0, 1}


def test_an_older_generators_dataset_is_reported_not_silently_reused(tmp_path, capsys):
    """A workdir's demo data from before a generator change (here: masks without drop shadows) would
    give stale pixel metrics; ensure_demo_data reuses the folder but says so on stderr."""
    import ml_collections

    from diff_fastener_jax.data.demo import ensure_demo_data

    data = ml_collections.ConfigDict(
        {
            "root": str(tmp_path),
            "category": "fastener",
            "image_size": 32,
            "demo_n_train": 2,
            "demo_n_test": 4,
            "demo_framing": "fastener",
        }
    )
    ensure_demo_data(data, "unused")
    stamp = tmp_path / "fastener" / demo.GENERATOR_FILE
    assert stamp.read_text().strip() == demo.GENERATOR_VERSION
    ensure_demo_data(data, "unused")  # current data: reused quietly
    assert "warning" not in capsys.readouterr().err
    stamp.unlink()  # as a dataset written before the stamp existed
    ensure_demo_data(data, "unused")
    err = capsys.readouterr().err
    assert "warning:" in err and str(tmp_path / "fastener") in err and "Delete the folder" in err
