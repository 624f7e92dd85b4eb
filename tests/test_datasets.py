"""Dataset readers: the three layouts on tiny generated trees, splits, k-fold, decoding, bad input."""

import os
import zlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from diff_fastener_jax.config_schema import base_config
from diff_fastener_jax.data import datasets, demo, image_io
from diff_fastener_jax.data.datasets import DatasetError, list_samples

SIZE = 16


def _img(path, value=None, mode="RGB", size=(20, 12)):
    """Writes a small image (random unless `value`) and returns its path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    channels = {"RGB": (3,), "L": ()}[mode]
    a = (
        np.full((size[1], size[0]) + channels, value, np.uint8)
        if value is not None
        else rng.integers(0, 256, (size[1], size[0]) + channels, dtype=np.uint8)
    )
    Image.fromarray(a, mode).save(path)
    return str(path)


def _mask(path, size=(20, 12)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    a = np.zeros((size[1], size[0]), np.uint8)
    a[2:8, 3:9] = 255
    Image.fromarray(a).save(path)
    return str(path)


def _cfg(fmt, root, category="widget", **kw):
    c = base_config({"folder": "fastener"}.get(fmt, fmt))
    c.data.root = str(root)
    c.data.category = category
    c.data.image_size = SIZE
    for k, v in kw.items():
        c.data[k] = v
    return c.data


@pytest.fixture
def mvtec(tmp_path):
    cat = tmp_path / "widget"
    for i in range(10):
        _img(str(cat / "train" / "good" / f"{i:03d}.png"), mode="L" if i == 0 else "RGB")
    for i in range(2):
        _img(str(cat / "test" / "good" / f"{i:03d}.png"))
    for d in ("crack", "hole"):
        for i in range(2):
            _img(str(cat / "test" / d / f"{i:03d}.png"))
            _mask(str(cat / "ground_truth" / d / f"{i:03d}_mask.png"))
    return tmp_path


def test_mvtec_layout_splits(mvtec):
    cfg = _cfg("mvtec", mvtec, val_fraction=0.2)
    train, val, test = (list_samples(cfg, s, seed=0) for s in ("train", "val", "test"))
    assert len(train) == 8 and len(val) == 2
    assert {s.path for s in train}.isdisjoint(s.path for s in val)
    assert all(s.label == 0 and s.defect == "good" and s.mask_path is None for s in train + val)
    assert len(test) == 6 and sorted({s.defect for s in test}) == ["crack", "good", "hole"]
    for s in test:
        if s.label:
            assert s.mask_path.endswith(os.path.join(s.defect, os.path.basename(s.path)[:-4] + "_mask.png"))
        else:
            assert s.mask_path is None and s.defect == "good"
    # The test split never leaks into training.
    assert not {s.path for s in train + val} & {s.path for s in test}


def test_identical_images_groups_byte_identical_files_in_split_order(mvtec):
    cat = mvtec / "widget" / "test"
    cfg = _cfg("mvtec", mvtec)
    assert datasets.identical_images(list_samples(cfg, "test", seed=0)) == []
    for src, dst in (("crack/000.png", "hole/001.png"), ("good/000.png", "crack/001.png")):
        (cat / dst).write_bytes((cat / src).read_bytes())
    test = list_samples(cfg, "test", seed=0)
    order = {s.path: i for i, s in enumerate(test)}
    groups = datasets.identical_images(test)
    expected = [
        sorted([str(cat / a), str(cat / b)], key=order.get)
        for a, b in (("crack/000.png", "hole/001.png"), ("good/000.png", "crack/001.png"))
    ]
    assert groups == sorted(expected, key=lambda g: order[g[0]])


def test_val_split_is_deterministic_under_seed(mvtec):
    cfg = _cfg("mvtec", mvtec, val_fraction=0.3)
    a = list_samples(cfg, "val", seed=1)
    assert a == list_samples(cfg, "val", seed=1)
    assert any(list_samples(cfg, "val", seed=s) != a for s in range(2, 8))
    assert list_samples(_cfg("mvtec", mvtec, val_fraction=0.0), "val", seed=1) == []


def test_kfold_partitions_the_normal_training_images(mvtec):
    pool = {s.path for s in list_samples(_cfg("mvtec", mvtec, val_fraction=0.0), "train", seed=0)}
    held_all = []
    for k in range(5):
        cfg = _cfg("mvtec", mvtec, val_fraction=0.2, fold=k, num_folds=5)
        train, val, test = (list_samples(cfg, s, seed=0) for s in ("train", "val", "test"))
        held = [s.path for s in test if s.label == 0]
        assert len(held) == 2 and len(train) + len(val) == 8
        assert set(held) | {s.path for s in train + val} == pool
        assert not set(held) & {s.path for s in train + val}
        assert sum(s.label for s in test) == 4  # every test anomaly
        held_all += held
    assert sorted(held_all) == sorted(pool)  # the folds cover each normal exactly once


def test_load_image_mask_and_arrays(mvtec):
    cfg = _cfg("mvtec", mvtec)
    grey = os.path.join(str(mvtec), "widget", "train", "good", "000.png")
    im = image_io.load_image(grey, SIZE)
    assert im.shape == (SIZE, SIZE, 3) and im.dtype == np.uint8
    assert np.array_equal(im[..., 0], im[..., 1])  # greyscale replicated to 3 channels
    assert image_io.load_image(grey, (8, 12)).shape == (8, 12, 3)
    test = list_samples(cfg, "test", seed=0)
    m = image_io.load_mask(next(s.mask_path for s in test if s.label), SIZE)
    assert m.shape == (SIZE, SIZE, 1) and m.dtype == np.float32
    assert set(np.unique(m)) == {0.0, 1.0}
    assert not image_io.load_mask(None, SIZE).any()
    arrays = datasets.load_arrays(test, SIZE)
    assert arrays["image"].shape == (6, SIZE, SIZE, 3) and arrays["image"].dtype == np.float32
    assert arrays["image"].min() >= -1.0 and arrays["image"].max() <= 1.0
    assert arrays["mask"].shape == (6, SIZE, SIZE, 1)
    assert list(arrays["label"]) == [s.label for s in test] and arrays["label"].dtype == np.int32
    assert arrays["defect"] == [s.defect for s in test] and arrays["path"] == [s.path for s in test]
    assert all(arrays["mask"][i].any() == bool(s.label) for i, s in enumerate(test))


def test_label_valued_masks_are_not_lost(tmp_path):
    """Masks stored as 0/1 (or small instance ids) must not binarise to empty."""
    a = np.zeros((8, 8), np.uint8)
    a[2:4, 2:4] = 1
    a[5:7, 5:7] = 2
    Image.fromarray(a).save(tmp_path / "m.png")
    m = image_io.load_mask(str(tmp_path / "m.png"), 8)[..., 0]
    assert m.sum() == 8 and m[2, 2] == 1 and m[5, 5] == 1


def test_masks_shrink_by_area(tmp_path):
    """A shrunk mask pixel is defective iff at least half of the source block it covers is, so a thin
    part of a region stays joined to it instead of leaving a piece as a region of its own."""
    rng = np.random.default_rng(0)
    a = (rng.random((32, 32)) < 0.5).astype(np.uint8) * 255
    Image.fromarray(a).save(tmp_path / "r.png")
    m = image_io.load_mask(str(tmp_path / "r.png"), 8)[..., 0]  # 4 x 4 source blocks
    share = (a > 127).reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.array_equal(m, (share >= 0.5).astype(np.float32))
    # A square with a 1 px thin tail ending in a knob: one 8-connected region at 64 px and, read by
    # area, at 32 px; nearest neighbours sample the odd rows, lose the tail and leave the knob alone.
    b = np.zeros((64, 64), np.uint8)
    b[8:24, 8:24] = 255
    b[16, 24:40] = 255
    b[15:18, 40:44] = 255
    Image.fromarray(b).save(tmp_path / "t.png")
    structure = np.ones((3, 3))
    assert ndimage.label(b > 127, structure)[1] == 1
    nearest = np.asarray(Image.fromarray(b).resize((32, 32), Image.NEAREST)) > 127
    assert ndimage.label(nearest, structure)[1] == 2
    small = image_io.load_mask(str(tmp_path / "t.png"), 32)[..., 0]
    assert ndimage.label(small > 0, structure)[1] == 1
    # Growing keeps the shape: each source pixel becomes a 2 x 2 block.
    big = image_io.load_mask(str(tmp_path / "t.png"), 128)[..., 0]
    assert np.array_equal(big, np.kron((b > 127).astype(np.float32), np.ones((2, 2), np.float32)))


def _visa(tmp_path, rows):
    os.makedirs(tmp_path / "split_csv", exist_ok=True)
    with open(tmp_path / "split_csv" / "1cls.csv", "w") as f:
        f.write("object,split,label,image,mask\n")
        for r in rows:
            f.write(",".join(r) + "\n")
    return tmp_path


def _visa_tree(tmp_path):
    rows = []
    for obj in ("candle", "pcb1"):
        for i in range(4):
            p = f"{obj}/Data/Images/Normal/{i:03d}.JPG"
            _img(str(tmp_path / p))
            rows.append((obj, "train" if i < 3 else "test", "normal", p, ""))
        p, m = f"{obj}/Data/Images/Anomaly/100.JPG", f"{obj}/Data/Masks/Anomaly/100.png"
        _img(str(tmp_path / p))
        _mask(str(tmp_path / m))
        rows.append((obj, "test", "anomaly", p, m))
    return _visa(tmp_path, rows), rows


def test_visa_layout(tmp_path):
    root, _ = _visa_tree(tmp_path)
    cfg = _cfg("visa", root, category="pcb1", val_fraction=0.0)
    train, test = list_samples(cfg, "train", seed=0), list_samples(cfg, "test", seed=0)
    assert len(train) == 3 and all("pcb1" in s.path and s.label == 0 for s in train)
    assert [s.label for s in test] == [0, 1] and test[1].defect == "anomaly"
    assert test[1].mask_path == str(root / "pcb1/Data/Masks/Anomaly/100.png")
    assert len(list_samples(_cfg("visa", root, category="", val_fraction=0.0), "train", seed=0)) == 6
    with pytest.raises(DatasetError, match="no rows for data.category='nope'.*candle"):
        list_samples(_cfg("visa", root, category="nope"), "train", seed=0)


@pytest.fixture
def folder(tmp_path):
    cat = tmp_path / "fastener"
    for i in range(10):
        _img(str(cat / "normal" / f"n{i}.png"))
    for t in ("loose", "missing"):
        for i in range(2):
            _img(str(cat / "abnormal" / t / f"img{i}.png"))
            _mask(str(cat / "masks" / t / f"img{i}_mask.png"))
    _img(str(cat / "abnormal" / "img1.png"))  # a defective image directly in abnormal_dir
    _mask(str(cat / "masks" / "img1.png"))
    return tmp_path


def test_folder_layout(folder):
    cfg = _cfg("folder", folder, category="fastener", val_fraction=0.0, folder_test_fraction=0.2)
    train, test = list_samples(cfg, "train", seed=0), list_samples(cfg, "test", seed=0)
    assert len(train) == 8
    normals_test = [s for s in test if s.label == 0]
    assert len(normals_test) == 2 and not {s.path for s in normals_test} & {s.path for s in train}
    anomalous = [s for s in test if s.label == 1]
    assert sorted(s.defect for s in anomalous) == ["abnormal", "loose", "loose", "missing", "missing"]
    for s in anomalous:  # img1 must get img1's mask, in its own type folder
        assert os.path.basename(s.mask_path).startswith(os.path.basename(s.path)[:-4])
        assert os.path.dirname(s.mask_path).endswith("masks" if s.defect == "abnormal" else s.defect)
    assert list_samples(cfg, "test", seed=0) == test  # deterministic
    assert any(list_samples(cfg, "test", seed=s) != test for s in range(1, 6))


def test_folder_layout_without_masks(folder):
    import shutil

    shutil.rmtree(folder / "fastener" / "masks")
    test = list_samples(_cfg("folder", folder, category="fastener"), "test", seed=0)
    assert all(s.mask_path is None for s in test) and sum(s.label for s in test) == 5


def test_folder_kfold_uses_all_normals(folder):
    cfg = _cfg("folder", folder, category="fastener", val_fraction=0.0, fold=1, num_folds=5)
    train, test = list_samples(cfg, "train", seed=0), list_samples(cfg, "test", seed=0)
    assert len(train) == 8 and sum(1 - s.label for s in test) == 2 and sum(s.label for s in test) == 5


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear DatasetError naming the path


def test_missing_category_folder(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "widget")):
        list_samples(_cfg("mvtec", tmp_path), "train", seed=0)


def test_empty_train_folder(mvtec):
    folder = mvtec / "widget" / "train" / "good"
    for n in os.listdir(folder):
        os.remove(folder / n)
    with pytest.raises(DatasetError, match=f"{folder}.*no images"):
        list_samples(_cfg("mvtec", mvtec), "train", seed=0)


def test_missing_test_folder(mvtec):
    import shutil

    shutil.rmtree(mvtec / "widget" / "test")
    with pytest.raises(DatasetError, match="test"):
        list_samples(_cfg("mvtec", mvtec), "test", seed=0)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_image_names_the_file(mvtec, damage):
    path = mvtec / "widget" / "train" / "good" / "003.png"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not an image" * 10, "empty": b""}[damage])
    with pytest.raises(DatasetError, match=f"cannot decode image {path}"):
        image_io.load_image(str(path), SIZE)
    samples = list_samples(_cfg("mvtec", mvtec, val_fraction=0.0), "train", seed=0)
    with pytest.raises(DatasetError, match=str(path)):
        datasets.load_arrays(samples, SIZE)
    with pytest.raises(DatasetError, match=str(path)):
        datasets.verify_images(samples)


def test_missing_image_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        image_io.load_image(str(tmp_path / "nope.png"), SIZE)


def test_mask_without_image_mvtec(mvtec):
    orphan = _mask(str(mvtec / "widget" / "ground_truth" / "crack" / "007_mask.png"))
    with pytest.raises(DatasetError, match=f"mask {orphan} has no image"):
        list_samples(_cfg("mvtec", mvtec), "train", seed=0)


def test_mask_folder_without_images_mvtec(mvtec):
    _mask(str(mvtec / "widget" / "ground_truth" / "bent" / "000_mask.png"))
    with pytest.raises(DatasetError, match="bent"):
        list_samples(_cfg("mvtec", mvtec), "test", seed=0)


def test_anomalous_image_without_mask_mvtec(mvtec):
    os.remove(mvtec / "widget" / "ground_truth" / "hole" / "001_mask.png")
    image = mvtec / "widget" / "test" / "hole" / "001.png"
    with pytest.raises(DatasetError, match=f"defective image {image} has no mask"):
        list_samples(_cfg("mvtec", mvtec), "test", seed=0)


def test_mask_without_image_folder(folder):
    orphan = _mask(str(folder / "fastener" / "masks" / "loose" / "zzz_mask.png"))
    with pytest.raises(DatasetError, match=f"mask {orphan} matches no defective image"):
        list_samples(_cfg("folder", folder, category="fastener"), "train", seed=0)


def test_anomalous_image_without_mask_folder(folder):
    os.remove(folder / "fastener" / "masks" / "missing" / "img0_mask.png")
    with pytest.raises(DatasetError, match="img0.png has no mask"):
        list_samples(_cfg("folder", folder, category="fastener"), "test", seed=0)


def test_missing_abnormal_folder_means_normal_images_only(folder):
    import shutil

    shutil.rmtree(folder / "fastener" / "abnormal")
    cfg = _cfg("folder", folder, category="fastener")
    train, test = list_samples(cfg, "train", seed=0), list_samples(cfg, "test", seed=0)
    assert train and test and all(s.label == 0 for s in train + test)
    assert not {s.path for s in train} & {s.path for s in test}


def test_empty_abnormal_folder_is_an_error(folder):
    import shutil

    shutil.rmtree(folder / "fastener" / "abnormal")
    (folder / "fastener" / "abnormal").mkdir()
    with pytest.raises(DatasetError, match="remove it to train from normal images alone"):
        list_samples(_cfg("folder", folder, category="fastener"), "train", seed=0)


def test_visa_errors(tmp_path):
    root, rows = _visa_tree(tmp_path)
    os.remove(root / rows[0][3])
    with pytest.raises(DatasetError, match=f"line 2: image {root / rows[0][3]} does not exist"):
        list_samples(_cfg("visa", root, category="candle"), "train", seed=0)
    _visa(root, [r for r in rows[1:] if r[0] == "pcb1"] + [("pcb1", "test", "anomaly", rows[-1][3], "")])
    with pytest.raises(DatasetError, match="anomalous image .* has no mask"):
        list_samples(_cfg("visa", root, category="pcb1"), "train", seed=0)
    os.remove(root / "split_csv" / "1cls.csv")
    with pytest.raises(DatasetError, match="1cls.csv does not exist"):
        list_samples(_cfg("visa", root, category="pcb1"), "train", seed=0)


def test_zero_training_images(tmp_path):
    root, rows = _visa_tree(tmp_path)
    _visa(root, [r[:1] + ("test",) + r[2:] for r in rows])  # everything in the test split
    with pytest.raises(DatasetError, match="no normal training images"):
        list_samples(_cfg("visa", root, category="candle"), "train", seed=0)


def test_ensure_demo_data_generates_once(tmp_path):
    c = base_config("demo")
    c.data.image_size, c.data.demo_n_train, c.data.demo_n_test = 32, 3, 4
    root = demo.ensure_demo_data(c.data, str(tmp_path / "demo_data"))
    assert root == str(tmp_path / "demo_data")
    c.data.root = root
    assert len(list_samples(c.data, "train", seed=0)) + len(list_samples(c.data, "val", seed=0)) == 3
    stamp = os.path.getmtime(os.path.join(root, "fastener", "train", "good", "000.png"))
    assert demo.ensure_demo_data(c.data, "/unused") == root  # data.root wins; nothing regenerated
    assert os.path.getmtime(os.path.join(root, "fastener", "train", "good", "000.png")) == stamp


def test_mvtec_category_without_ground_truth_has_image_labels_only(mvtec):
    """No ground_truth/ folder at all (e.g. a category released with image labels only): the defective
    test images have no masks and `has_pixel_labels` says pixel metrics are undefined."""
    import shutil

    full = list_samples(_cfg("mvtec", mvtec), "test", seed=0)
    assert datasets.has_pixel_labels(full)
    shutil.rmtree(mvtec / "widget" / "ground_truth")
    test = list_samples(_cfg("mvtec", mvtec), "test", seed=0)
    assert [(s.path, s.label, s.defect) for s in test] == [(s.path, s.label, s.defect) for s in full]
    assert all(s.mask_path is None for s in test)
    assert not datasets.has_pixel_labels(test)
    assert not datasets.has_pixel_labels([s for s in full if s.label == 0])  # no anomalies: undefined too
    arrays = datasets.load_arrays(test, SIZE)
    assert arrays["mask"].shape == (len(test), SIZE, SIZE, 1) and not arrays["mask"].any()


def test_mvtec_ground_truth_folder_missing_one_defect_type_is_still_an_error(mvtec):
    import shutil

    shutil.rmtree(mvtec / "widget" / "ground_truth" / "hole")
    with pytest.raises(DatasetError, match="ground_truth/hole"):
        list_samples(_cfg("mvtec", mvtec), "test", seed=0)


def _val_anomalies(tmp_path, with_masks=True):
    folder = tmp_path / "real_defects"
    _img(str(folder / "a.png"))
    _img(str(folder / "scratch" / "b.png"))
    if with_masks:
        _mask(str(folder / "masks" / "a_mask.png"))
        _mask(str(folder / "masks" / "scratch" / "b.png"))
    return folder


def test_val_anomalies_are_listed_apart_from_every_split(mvtec, tmp_path):
    folder = _val_anomalies(tmp_path)
    cfg = _cfg("mvtec", mvtec, val_anomalies=str(folder))
    real = datasets.list_val_anomalies(cfg)
    assert [(os.path.basename(s.path), s.label, s.defect, os.path.basename(s.mask_path)) for s in real] == [
        ("a.png", 1, "real", "a_mask.png"),
        ("b.png", 1, "scratch", "b.png"),
    ]
    assert all(s.category == "widget" for s in real) and datasets.has_pixel_labels(real)
    splits = datasets.list_splits(cfg, seed=0)
    listed = {s.path for split in splits.values() for s in split}
    assert not listed & {s.path for s in real}
    datasets.check_disjoint(real, splits)
    assert datasets.list_val_anomalies(_cfg("mvtec", mvtec)) == []
    # images without a masks/ folder: image labels only
    no_masks = _val_anomalies(tmp_path / "other", with_masks=False)
    assert not datasets.has_pixel_labels(datasets.list_val_anomalies(_cfg("mvtec", mvtec, val_anomalies=str(no_masks))))


def test_val_anomalies_errors(mvtec, tmp_path):
    folder = _val_anomalies(tmp_path)
    os.remove(folder / "masks" / "scratch" / "b.png")
    with pytest.raises(DatasetError, match="b.png has no mask"):
        datasets.list_val_anomalies(_cfg("mvtec", mvtec, val_anomalies=str(folder)))
    test_image = list_samples(_cfg("mvtec", mvtec), "test", seed=0)[-1]
    with pytest.raises(DatasetError, match="is also in the 'test' split"):
        datasets.check_disjoint([test_image], datasets.list_splits(_cfg("mvtec", mvtec), seed=0))
    with pytest.raises(DatasetError, match="multi-category run"):
        datasets.list_val_anomalies(_cfg("mvtec", mvtec, category="widget,gadget", val_anomalies=str(folder)))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DatasetError, match="holds neither images"):
        datasets.list_val_anomalies(_cfg("mvtec", mvtec, val_anomalies=str(tmp_path / "empty")))
