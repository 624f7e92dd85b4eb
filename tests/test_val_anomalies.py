"""data.val_anomalies: real defective images for validation and checkpoint selection only. They never
reach the training pipeline, the threshold calibration or the test split, and validation reports
val_real_image_auroc (and val_real_pixel_auroc with masks) against the held-out normals."""

import os

import numpy as np
import pytest
from PIL import Image

from diff_fastener_jax import config as C
from diff_fastener_jax.config_schema import SELECT_METRICS, base_config
from diff_fastener_jax.data import datasets, image_io, pipeline
from diff_fastener_jax.data.demo import generate_demo_dataset
from diff_fastener_jax.deploy import threshold
from diff_fastener_jax.training import loop

SIZE = 32


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_val")
    generate_demo_dataset(root / "data", n_train=12, n_test=4, size=SIZE, seed=2)
    real = root / "real_defects"
    rng = np.random.default_rng(0)
    for i, kind in enumerate(("dent", "dent", "stain")):
        os.makedirs(real / kind, exist_ok=True)
        os.makedirs(real / "masks" / kind, exist_ok=True)
        a = rng.integers(240, 256, (40, 40, 3), dtype=np.uint8)  # near-white: brighter than any demo normal
        Image.fromarray(a).save(real / kind / f"r{i}.png")
        m = np.zeros((40, 40), np.uint8)
        m[10:20, 10:30] = 255
        Image.fromarray(m).save(real / "masks" / kind / f"r{i}_mask.png")
    c = base_config("demo")
    C.apply_overrides(
        c,
        {
            "data.root": str(root / "data"),
            "data.image_size": SIZE,
            "data.val_fraction": 0.3,
            "data.val_anomalies": str(real),
            "train.batch_size": 4,
            "infer.batch_size": 4,
            "data.num_workers": 0,
        },
    )
    return c


def _fake_infer(params, images):
    """Stands in for the jitted program: map = brightness, score = its mean (no compile)."""
    amap = (np.asarray(images).mean(axis=-1) + 1.0) / 2.0  # (N, H, W)
    return images, amap, amap.mean(axis=(1, 2)), np.zeros(images.shape[0], np.int32)


def test_val_anomalies_never_reach_training_calibration_or_test(run_config, tmp_path, monkeypatch):
    config, samples = loop.prepare_run(run_config, str(tmp_path / "run"), 1)
    real = {s.path for s in samples["val_anomalies"]}
    assert len(real) == 3
    for split in ("train", "val", "test"):
        assert not real & {s.path for s in samples[split]}, split

    loaded = []
    original = image_io.load_image

    def recording_load(path, size):
        loaded.append(path)
        return original(path, size)

    monkeypatch.setattr(image_io, "load_image", recording_load)
    monkeypatch.setattr(datasets, "load_image", recording_load)
    it = pipeline.make_train_iterator(config, seed=0, num_workers=0)
    for _ in range(6):  # more than an epoch of pairs
        next(it)
    pipeline.make_val_batches(config, seed=0, num_batches=2)
    record, _ = threshold.calibrate(config, None, infer=_fake_infer)
    assert record["value"] is not None and record["num_images"] == len(samples["val"])
    assert loaded and not real & set(loaded)
    assert not real & {s.path for s in datasets.list_samples(config.data, "test", seed=config.seed)}


def test_validation_reports_real_anomaly_metrics(run_config, tmp_path):
    config, samples = loop.prepare_run(run_config, str(tmp_path / "run"), 1)
    real = loop.load_real_validation(config, samples)
    n_val = len(samples["val"])
    assert list(real["label"]) == [0] * n_val + [1] * 3 and real["has_pixel_labels"]
    val = loop._real_validation_scores(_fake_infer, None, real, batch_size=4)
    # the near-white images outscore every demo normal
    assert sorted(val) == ["val_real_image_auroc", "val_real_pixel_auroc"]
    assert val["val_real_image_auroc"] == 1.0
    assert SELECT_METRICS["val_real_image_auroc"] == "max"
    assert loop.load_real_validation(config, {**samples, "val_anomalies": []}) is None


def test_selecting_on_real_anomalies_needs_the_folder():
    c = base_config("demo")
    C.apply_overrides(c, {"train.select_on": "val_real_image_auroc"})
    with pytest.raises(
        C.ConfigError, match="data.val_anomalies: is required by train.select_on='val_real_image_auroc'"
    ):
        C.validate_data(c, check_data=False)
    C.apply_overrides(c, {"data.val_anomalies": "/no/such/folder"})
    with pytest.raises(C.ConfigError, match="data.val_anomalies: folder '/no/such/folder' does not exist"):
        C.validate_data(c, check_data=True)
