"""Sizes and patches: the one resize rule (square, short_side, long_side, stride rounding, masks follow
their images), data.image_size pairs, and patch training (crops inside the image, with their masks and
foreground, deterministic, (P, P, 3), refused when larger than the image)."""

import os

import numpy as np
import pytest
from PIL import Image

from diff_fastener_jax import config as C
from diff_fastener_jax.config_schema import base_config
from diff_fastener_jax.data import datasets, image_io, patches, pipeline
from diff_fastener_jax.data.demo import generate_demo_dataset
from diff_fastener_jax.data.sizing import Resize, network_stride, resize_of

SIZE = 32


def _write(path, w, h, value=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(w * 1000 + h)
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
    Image.fromarray(a).save(path)
    return str(path)


def test_resize_rule_keeps_the_aspect_ratio_and_rounds_to_the_stride():
    assert Resize(64).hw((200, 300)) == (64, 64)  # square: the paper, squashed
    assert Resize((48, 80)).hw((200, 300)) == (48, 80)
    assert Resize(64, "short_side", 1).hw((200, 300)) == (64, 96)
    assert Resize(64, "short_side", 1).hw((300, 200)) == (96, 64)
    assert Resize(64, "short_side", 32).hw((200, 300)) == (64, 96)
    assert Resize(64, "short_side", 32).hw((200, 330)) == (64, 96)  # 105.6 -> 96 (nearest multiple)
    assert Resize(64, "short_side", 32).hw((200, 360)) == (64, 128)  # 115.2 -> 128
    assert Resize(96, "long_side", 32).hw((200, 300)) == (64, 96)
    assert Resize(96, "long_side", 32).hw((1000, 100)) == (96, 32)  # never below one stride
    with pytest.raises(ValueError, match="needs an int data.image_size"):
        Resize((64, 96), "short_side")


def test_network_stride_is_the_deeper_nets_downsampling():
    m = base_config().model
    assert network_stride(m) == 32  # 6 levels each
    m.seg_channels = (8, 16)
    m.channel_mults = (1, 2, 2)
    assert network_stride(m) == 4


def test_image_and_mask_loads_follow_the_same_rule(tmp_path):
    """A 300 x 200 (W x H) image with short_side 64 becomes 96 wide, 64 high; its mask follows."""
    image = _write(tmp_path / "a.png", 300, 200)
    mask = np.zeros((200, 300), np.uint8)
    mask[100:150, 150:240] = 255
    Image.fromarray(mask).save(tmp_path / "a_mask.png")
    rule = Resize(64, "short_side", 32)
    loaded = image_io.load_image(image, rule)
    assert loaded.shape == (64, 96, 3) and loaded.dtype == np.uint8
    m = image_io.load_mask(str(tmp_path / "a_mask.png"), loaded.shape[:2])
    assert m.shape == (64, 96, 1)
    ys, xs = np.nonzero(m[..., 0])
    assert (ys.min(), ys.max() + 1, xs.min(), xs.max() + 1) == (32, 48, 48, 77)  # 64/200 and 96/300 of the box
    sample = datasets.Sample(image, 1, "x", str(tmp_path / "a_mask.png"))
    img2, m2 = datasets.load_sample(sample, rule)
    np.testing.assert_array_equal(img2, loaded)
    np.testing.assert_array_equal(m2, m)
    assert datasets.load_sample(datasets.Sample(image, 0, "good"), rule)[1].shape == (64, 96, 1)
    with pytest.raises(ValueError, match="pass the image's"):
        image_io.load_mask(None, rule)
    # the default rule is the paper's square resize, the same as passing the int
    np.testing.assert_array_equal(image_io.load_image(image, Resize(64)), image_io.load_image(image, 64))


def test_load_arrays_refuses_images_that_come_out_at_different_sizes(tmp_path):
    a, b = _write(tmp_path / "a.png", 300, 200), _write(tmp_path / "b.png", 200, 200)
    samples = [datasets.Sample(a, 0, "good"), datasets.Sample(b, 0, "good")]
    assert datasets.load_arrays(samples, 32)["image"].shape == (2, 32, 32, 3)
    with pytest.raises(datasets.DatasetError, match="2 sizes under data.resize='short_side'"):
        datasets.load_arrays(samples, Resize(32, "short_side", 32))
    assert datasets.load_arrays(samples[:1], Resize(32, "short_side", 16))["image"].shape == (1, 32, 48, 3)


def test_image_size_pair_and_resize_validation():
    c = base_config()
    C.apply_overrides(c, {"data.image_size": "(256, 384)"})
    assert c.data.image_size == (256, 384)
    C.validate_data(c, check_data=False)
    assert resize_of(c).hw((900, 900)) == (256, 384)
    C.apply_overrides(c, {"data.image_size": "(256, 300)"})
    with pytest.raises(C.ConfigError, match="data.image_size: .* must be divisible by 32"):
        C.validate_data(c, check_data=False)
    C.apply_overrides(c, {"data.image_size": "(256, 384)", "data.resize": "short_side"})
    with pytest.raises(C.ConfigError, match="data.image_size: an \\(H, W\\) pair fixes both sides"):
        C.validate_data(c, check_data=False)
    C.apply_overrides(c, {"data.image_size": 256, "data.resize": "sideways"})
    with pytest.raises(C.ConfigError, match="data.resize: 'sideways' is not one of square, short_side, long_side"):
        C.validate_data(c, check_data=False)


@pytest.mark.parametrize("resize", ["square", "short_side"])
def test_patch_larger_than_the_image_is_a_config_error(resize):
    c = base_config()
    C.apply_overrides(c, {"data.image_size": 64, "data.resize": resize, "data.patch_size": 96})
    with pytest.raises(C.ConfigError, match="data.patch_size: 96 px crops do not fit"):
        C.validate_data(c, check_data=False)
    C.apply_overrides(c, {"data.patch_size": 48})
    with pytest.raises(C.ConfigError, match="data.patch_size: 48 must be divisible by 32"):
        C.validate_data(c, check_data=False)
    C.apply_overrides(c, {"data.patch_size": 64})
    C.validate_data(c, check_data=False)


def test_long_side_patch_that_misses_the_short_side_is_refused_by_the_pipeline(tmp_path):
    """With 'long_side' the short side depends on each image: the pipeline checks them (headers only)."""
    for i in range(3):
        _write(tmp_path / "w" / "train" / "good" / f"{i}.png", 300, 100)
    _write(tmp_path / "w" / "test" / "good" / "0.png", 300, 100)
    c = base_config("mvtec")
    C.apply_overrides(
        c,
        {
            "data.root": str(tmp_path),
            "data.category": "w",
            "data.image_size": 96,
            "data.resize": "long_side",
            "data.patch_size": 64,
            "data.val_fraction": 0.0,
            "train.batch_size": 2,
        },
    )
    C.validate_data(c, check_data=True)  # cannot know the short sides yet
    with pytest.raises(C.ConfigError, match="data.patch_size: 64 px crops do not fit .*0.png, resized to 32 x 96"):
        pipeline.build_train_dataset(c, seed=0)


def test_random_box_stays_inside_and_anchored_boxes_hold_an_anchor_pixel():
    rng = np.random.default_rng(0)
    anchor = np.zeros((40, 70), bool)
    anchor[30:33, 60:62] = True
    for _ in range(200):
        y0, x0 = patches.random_box((40, 70), 16, rng)
        assert 0 <= y0 <= 40 - 16 and 0 <= x0 <= 70 - 16
        y0, x0 = patches.random_box((40, 70), 16, rng, anchor=anchor)
        assert 0 <= y0 <= 40 - 16 and 0 <= x0 <= 70 - 16
        assert patches.crop(anchor, (y0, x0), 16).any()
    assert patches.random_box((16, 16), 16, rng) == (0, 0)
    with pytest.raises(C.ConfigError, match="data.patch_size: 17 px crops do not fit"):
        patches.random_box((16, 40), 17, rng)


def _pair(h=40, w=56):
    """A pair of uint8 images (a bright object on a dark background) with a supplied foreground."""
    rng = np.random.default_rng(3)
    normal = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)
    source = normal.copy()
    source[10:30, 30:50] = 200
    fg = np.zeros((h, w), bool)
    fg[10:30, 30:50] = True
    return {"normal": normal, "source": source, "source_fg": fg, "class_id": np.zeros(2, np.int32)}


def test_patch_pairs_are_crops_with_their_masks_and_foreground():
    pair = _pair()
    synth = pipeline._SynthesizePair("otsu", None, True, patch_size=16)
    normal_f = image_io.image_to_float(pair["normal"])
    source_f = image_io.image_to_float(pair["source"])
    for seed in range(20):
        out = synth(pair, np.random.default_rng(seed))
        assert out["image"].shape == (2, 16, 16, 3) and out["mask"].shape == (2, 16, 16, 1)
        normal_crop, source_crop = out["clean"]
        assert _is_crop_of(normal_crop, normal_f) and _is_crop_of(source_crop, source_f)
        # the synthetic anomaly lies inside the source crop's (cropped) foreground: the object
        m = out["mask"][1, ..., 0] > 0
        assert m.any() and (source_crop[m].mean(axis=-1) > 0.4).all()
        assert not out["mask"][0].any()
        again = synth(pair, np.random.default_rng(seed))
        for k in out:
            np.testing.assert_array_equal(out[k], again[k])


def _is_crop_of(crop, image):
    p = crop.shape[0]
    return any(
        np.array_equal(crop, image[y : y + p, x : x + p])
        for y in range(image.shape[0] - p + 1)
        for x in range(image.shape[1] - p + 1)
    )


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("patches")
    generate_demo_dataset(root, n_train=9, n_test=4, size=SIZE, seed=1)
    return str(root)


def test_patch_training_batches_and_validation_batches_are_patch_sized(demo_root):
    c = base_config("demo")
    C.apply_overrides(
        c,
        {
            "data.root": demo_root,
            "data.image_size": SIZE,
            "data.patch_size": 16,
            "train.batch_size": 4,
            "data.synthesis": "crack:0.5,pore:0.5",
        },
    )
    it = pipeline.make_train_iterator(c, seed=0, num_workers=0)
    batches = [next(it) for _ in range(2)]
    for b in batches:
        assert b["image"].shape == (4, 16, 16, 3) and b["mask"].shape == (4, 16, 16, 1)
        assert list(b["is_synthetic"]) == [0, 1, 0, 1]
        assert b["mask"][1::2].any(axis=(1, 2, 3)).all() and not b["mask"][0::2].any()
    again = pipeline.make_train_iterator(c, seed=0, num_workers=0)
    np.testing.assert_array_equal(next(again)["image"], batches[0]["image"])
    val = pipeline.make_val_batches(c, seed=0, num_batches=1)
    assert val[0]["image"].shape == (4, 16, 16, 3)
