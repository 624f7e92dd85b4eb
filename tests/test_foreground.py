"""Where synthetic anomalies go: foreground masks supplied by the dataset, and the deliberate fallbacks."""

import numpy as np
import pytest
from PIL import Image

from diff_fastener_jax.config_schema import base_config
from diff_fastener_jax.data import datasets, image_io, pipeline, synthesis
from diff_fastener_jax.data.datasets import DatasetError

SIZE = 32


def _folder_dataset(root, n=8, with_foreground=True, abnormal=False):
    """A folder-layout category with only normal/ images; foreground/ masks = the left 12 columns."""
    cat = root / "parts"
    (cat / "normal").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(60, 200, (SIZE, SIZE, 3), dtype=np.uint8)).save(cat / "normal" / f"n{i}.png")
    if with_foreground:
        (cat / "foreground").mkdir()
        fg = np.zeros((SIZE, SIZE), np.uint8)
        fg[:, :12] = 255
        for i in range(n):
            Image.fromarray(fg).save(cat / "foreground" / f"n{i}_mask.png")
    return cat


def _config(root, batch_size=8):
    c = base_config("fastener")
    c.data.root, c.data.category, c.data.image_size = str(root), "parts", SIZE
    c.data.foreground = "full"  # without supplied masks, anomalies could go anywhere
    c.train.batch_size = batch_size
    return c


def test_supplied_foreground_masks_confine_training_and_validation_anomalies(tmp_path):
    _folder_dataset(tmp_path)
    config = _config(tmp_path)
    train = datasets.list_samples(config.data, "train", seed=0)
    assert train and all(s.foreground_path and s.foreground_path.endswith("_mask.png") for s in train)
    ds = pipeline.build_train_dataset(config, seed=0)
    for k in range(6):
        batch = ds[k]
        synth = batch["mask"][1::2, ..., 0]  # (B/2, H, W) masks of the synthetic rows
        assert synth.reshape(len(synth), -1).any(axis=1).all()
        assert not synth[:, :, 12:].any(), "a synthetic anomaly left the supplied foreground"
    for batch in pipeline.make_val_batches(config, seed=0, num_batches=2):
        assert batch["mask"][1::2].any() and not batch["mask"][1::2, :, 12:].any()


def test_without_foreground_folder_the_config_rule_applies(tmp_path):
    _folder_dataset(tmp_path, with_foreground=False)
    config = _config(tmp_path)
    assert all(s.foreground_path is None for s in datasets.list_samples(config.data, "train", seed=0))
    masks = np.concatenate([pipeline.build_train_dataset(config, seed=0)[k]["mask"][1::2] for k in range(6)])
    assert masks[:, :, 12:].any()  # 'full': anomalies also land outside the left strip


def test_missing_foreground_mask_is_named(tmp_path):
    cat = _folder_dataset(tmp_path)
    stem = datasets.list_samples(_config(tmp_path).data, "train", seed=0)[0].path.rsplit("/", 1)[1][:-4]
    (cat / "foreground" / f"{stem}_mask.png").unlink()
    with pytest.raises(DatasetError, match=rf"{stem}\.png has no mask"):
        datasets.list_samples(_config(tmp_path).data, "train", seed=0)


@pytest.mark.parametrize("framing,band", [("track", (0.3, 0.6)), ("fastener", (0.7, 0.97))])
def test_demo_data_supplies_the_fastening_zone(tmp_path, framing, band):
    """The sleeper band: about 40% of the height of a track scene, most of a fastener crop (ballast
    showing above and below)."""
    from diff_fastener_jax.data.demo import generate_demo_dataset

    generate_demo_dataset(tmp_path, n_train=3, n_test=4, size=SIZE, seed=0, framing=framing)
    c = base_config("demo")
    c.data.root, c.data.image_size, c.data.val_fraction = str(tmp_path), SIZE, 0.0
    train = datasets.list_samples(c.data, "train", seed=0)
    assert len(train) == 3
    for s in train:
        zone = image_io.load_mask(s.foreground_path, SIZE)[..., 0] > 0
        rows = zone.any(axis=1)
        assert zone[rows].all()  # a full-width band (the sleeper) ...
        assert band[0] < rows.mean() < band[1]  # ... around the middle
        assert rows[SIZE // 2]


def test_perlin_masks_rarely_need_the_rectangle_fallback(monkeypatch):
    # A fastening-zone-like band of 25% of the image: Perlin draws land in it nearly always.
    calls = []
    real = synthesis._random_rectangle
    monkeypatch.setattr(synthesis, "_random_rectangle", lambda fg, rng: calls.append(1) or real(fg, rng))
    band = np.zeros((64, 64), bool)
    band[24:40] = True
    rng = np.random.default_rng(0)
    for _ in range(200):
        m = synthesis.anomaly_mask((64, 64), rng, band)
        assert m.any() and not (m & ~band).any()
    assert len(calls) <= 2


def test_tiny_foreground_falls_back_to_a_rectangle_inside_it():
    fg = np.zeros((64, 64), bool)
    fg[10:12, 40:42] = True  # 4 pixels: Perlin blobs keep missing it
    for seed in range(5):
        m = synthesis.anomaly_mask((64, 64), np.random.default_rng(seed), fg)
        assert m.any() and not (m & ~fg).any()


def test_empty_foreground_means_anywhere_and_empty_supplied_mask_uses_the_config_rule():
    rng = np.random.default_rng(1)
    m = synthesis.anomaly_mask((32, 32), rng, np.zeros((32, 32), bool))
    assert m.any()
    image = np.full((32, 32, 3), -0.5, np.float32)
    _, mask, _ = synthesis.synthesize_anomaly(
        image, np.random.default_rng(2), foreground=np.zeros((32, 32)), fg_mode="full"
    )
    assert mask.any()


def test_demo_fastening_zone_puts_synthetic_anomalies_on_the_clips(capsys):
    """Otsu's foreground on the track scenes is the bright concrete and rail head: the dark clips, where
    every test defect is, fall outside it. The supplied fastening zone contains them. (In a fastener crop
    the clip is large enough for Otsu to hold most of it; the zone still holds all of it.)"""
    import copy

    from diff_fastener_jax.data import demo

    rng = np.random.default_rng(0)
    inside, touched = {"otsu": [], "zone": []}, {"otsu": [], "zone": []}
    for i in range(30):
        state = copy.deepcopy(rng.bit_generator.state)
        image, _, zone = demo.render_scene_with_zone(64, rng, framing="track")
        twin = np.random.default_rng()
        twin.bit_generator.state = state  # the same scene with one clip removed: its mask is the clip
        _, clip = demo.render_scene(64, twin, "missing_clip", framing="track")
        fgs = {"otsu": synthesis.foreground_mask(image_io.image_to_float(image), "otsu"), "zone": zone}
        for name, fg in fgs.items():
            inside[name].append((fg & clip).sum() / clip.sum())
            srng = np.random.default_rng(i)
            touched[name] += [(synthesis.anomaly_mask((64, 64), srng, fg) & clip).any() for _ in range(10)]
    summary = {k: (float(np.mean(inside[k])), float(np.mean(touched[k]))) for k in inside}
    print("clip pixels inside the foreground, synthetic masks touching the clip:", summary)
    # Blobs (cells >= 8 px) touch a clip less often than unfiltered speckle (0.40 vs 0.47), but cover it.
    assert summary["zone"][0] == 1.0 and summary["zone"][1] > 0.3
    assert summary["otsu"][0] < 0.2 and summary["otsu"][1] < 0.2
