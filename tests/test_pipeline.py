"""Grain training pipeline: batch format, exact half/half split (also per device), determinism across
worker counts and processes, checkpoint/restore of the iterator, validation batches."""

import json

import numpy as np
import pytest

from diff_fastener_jax.config_schema import base_config
from diff_fastener_jax.data import datasets, pipeline
from diff_fastener_jax.data.demo import generate_demo_dataset

SIZE = 32


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    generate_demo_dataset(root, n_train=11, n_test=4, size=SIZE, seed=1)
    return str(root)


def _config(root, batch_size=8, **data):
    c = base_config("demo")
    c.data.root = root
    c.data.image_size = SIZE
    c.train.batch_size = batch_size
    for k, v in data.items():
        c.data[k] = v
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_are_half_synthetic_also_per_device(demo_root):
    config = _config(demo_root, batch_size=8)
    it = pipeline.make_train_iterator(config, seed=0, num_workers=0)
    train_images = datasets.load_arrays(datasets.list_samples(config.data, "train", seed=0), SIZE)["image"]
    for batch in _take(it, 3):
        assert batch["image"].shape == (8, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
        assert batch["mask"].shape == (8, SIZE, SIZE, 1) and batch["mask"].dtype == np.float32
        assert batch["is_synthetic"].dtype == np.float32
        assert list(batch["is_synthetic"]) == [0, 1] * 4
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        for chunk in np.split(batch["is_synthetic"], 4):  # 4 devices x 2 rows
            assert chunk.sum() == 1
        for i in range(8):
            m = batch["mask"][i]
            assert set(np.unique(m)) <= {0.0, 1.0}
            if i % 2:
                assert m.sum() > 0
            else:  # normal rows: untouched training images, no mask
                assert m.sum() == 0
                assert np.abs(train_images - batch["image"][i]).max(axis=(1, 2, 3)).min() < 1e-6
    it.close()


def test_same_batches_with_zero_and_two_workers_and_restore(demo_root):
    config = _config(demo_root, batch_size=4)
    it0 = pipeline.make_train_iterator(config, seed=3, num_workers=0)
    ref = _take(it0, 5)
    it2 = pipeline.make_train_iterator(config, seed=3, num_workers=2)
    try:
        _assert_same(ref[:3], _take(it2, 3))
        state = json.loads(json.dumps(it2.get_state()))  # checkpointable as JSON
        assert state["step"] == 3
        _assert_same(ref[3:], _take(it2, 2))
    finally:
        it2.close()
    # Restore a 2-worker state into an in-process iterator: the sequence continues.
    fresh = pipeline.make_train_iterator(config, seed=3, num_workers=0)
    fresh.set_state(state)
    _assert_same(ref[3:], _take(fresh, 2))


def test_checkpoint_restore_continues_the_sequence(demo_root):
    config = _config(demo_root, batch_size=4)
    it = pipeline.make_train_iterator(config, seed=0, num_workers=0)
    _take(it, 2)
    state = it.get_state()
    after = _take(it, 3)
    it.set_state(state)  # rewind the same iterator
    _assert_same(after, _take(it, 3))
    other = pipeline.make_train_iterator(config, seed=1, num_workers=0)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_seeds_and_epochs_differ(demo_root):
    config = _config(demo_root, batch_size=4)
    a = _take(pipeline.make_train_iterator(config, seed=0, num_workers=0), 6)  # > 1 epoch of 10 images
    b = _take(pipeline.make_train_iterator(config, seed=1, num_workers=0), 1)
    assert not np.array_equal(a[0]["image"], b[0]["image"])
    assert not np.array_equal(a[0]["image"], a[5]["image"])


def test_process_shards_concatenate_to_the_global_batch(demo_root):
    config = _config(demo_root, batch_size=8)
    whole = _take(pipeline.make_train_iterator(config, seed=0, num_workers=0), 2)
    parts = [
        _take(pipeline.make_train_iterator(config, seed=0, process_index=p, process_count=2, num_workers=0), 2)
        for p in range(2)
    ]
    for k in range(2):
        assert parts[0][k]["image"].shape[0] == 4
        joined = {key: np.concatenate([parts[0][k][key], parts[1][k][key]]) for key in whole[k]}
        _assert_same([whole[k]], [joined])


def test_bad_batch_sizes(demo_root):
    with pytest.raises(ValueError, match="even"):
        pipeline.make_train_iterator(_config(demo_root, batch_size=5), seed=0)
    with pytest.raises(ValueError, match="2 x 4 processes"):
        pipeline.make_train_iterator(_config(demo_root, batch_size=4), seed=0, process_count=4)


def test_clean_rows_for_anomaly_oriented_noise(demo_root):
    config = _config(demo_root, batch_size=4)
    config.loss.anomaly_oriented_noise = True
    batch = next(pipeline.make_train_iterator(config, seed=0, num_workers=0))
    assert batch["clean"].shape == batch["image"].shape
    np.testing.assert_array_equal(batch["clean"][0::2], batch["image"][0::2])
    outside = batch["mask"][1::2] == 0  # synthetic rows equal their clean image outside the mask
    np.testing.assert_array_equal(
        np.broadcast_to(outside, batch["image"][1::2].shape) * (batch["clean"][1::2] - batch["image"][1::2]), 0
    )


def test_val_batches_are_fixed_and_half_synthetic(demo_root):
    config = _config(demo_root, batch_size=4, val_fraction=0.2)
    a = pipeline.make_val_batches(config, seed=0, num_batches=3)
    _assert_same(a, pipeline.make_val_batches(config, seed=0, num_batches=3))
    assert len(a) == 3
    val_images = datasets.load_arrays(datasets.list_samples(config.data, "val", seed=0), SIZE)["image"]
    for batch in a:
        assert batch["image"].shape == (4, SIZE, SIZE, 3) and list(batch["is_synthetic"]) == [0, 1, 0, 1]
        assert (batch["mask"][1::2].reshape(2, -1).sum(1) > 0).all() and batch["mask"][0::2].sum() == 0
        for row in batch["image"][0::2]:  # the normal rows are held-out validation images
            assert np.abs(val_images - row).max(axis=(1, 2, 3)).min() < 1e-6
    assert pipeline.make_val_batches(_config(demo_root, val_fraction=0.0), seed=0, num_batches=2) == []


def test_benchmark_reports_throughput(demo_root):
    (r,) = pipeline.benchmark(_config(demo_root, batch_size=4), [0], num_batches=2)
    assert r["workers"] == 0 and r["images_per_s"] > 0 and r["size"] == SIZE
