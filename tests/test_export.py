"""Export: model.stablehlo and model.onnx compute what the in-process JAX program computes."""

import json
import os

import numpy as np
import pytest
from ship_support import smoke_export, smoke_test_images

from diff_fastener_jax import Detector, export
from diff_fastener_jax.errors import UserError


@pytest.fixture(scope="module")
def run(smoke_run):
    return smoke_run


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smoke_run):
    return smoke_export(tmp_path_factory, smoke_run)


@pytest.fixture(scope="module")
def batch(run):
    det = Detector.load(run)
    images = det.preprocess(smoke_test_images(run, 5))  # (5, 32, 32, 3): not a multiple of the ONNX batch
    return images, det.infer(images)


def test_folder_is_self_contained(run, folder):
    assert sorted(os.listdir(folder)) == ["config.json", "detector.json", "model.onnx", "model.stablehlo",
                                          "params.npz"]
    with open(os.path.join(folder, "detector.json")) as f:
        rec = json.load(f)
    with open(os.path.join(run, "detector.json")) as f:
        stored = json.load(f)
    assert rec["threshold"] == stored["threshold"] and rec["threshold"]["value"] is not None
    assert rec["stablehlo"]["batch"] == "symbolic N" and "cpu" in rec["stablehlo"]["platforms"]
    assert rec["onnx"]["batch"] == 2 and rec["config_digest"] == stored["config_digest"]


def test_stablehlo_matches_jax_at_any_batch_size(folder, batch):
    images, (ref_map, ref_score) = batch
    f = export.load_stablehlo(folder)
    for n in (5, 1):  # symbolic batch: one exported program for every N
        amap, score = (np.asarray(o) for o in f(images[:n]))
        assert amap.shape == (n, 32, 32) and score.shape == (n,)
        np.testing.assert_allclose(amap, ref_map[:n], atol=1e-5)
        np.testing.assert_allclose(score, ref_score[:n], atol=1e-5)


def test_onnx_matches_jax_in_onnxruntime(folder, batch):
    images, (ref_map, ref_score) = batch
    sess = export.onnx_session(folder)
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert [o.name for o in sess.get_outputs()] == ["anomaly_map", "score"]
    amap, score = sess.run(None, {"images": images[:2]})
    assert amap.shape == (2, 32, 32) and score.shape == (2,) and amap.dtype == np.float32
    np.testing.assert_allclose(amap, ref_map[:2], atol=1e-5)
    amap, score = export.onnx_predict(sess, images)  # 5 images through the fixed batch of 2
    np.testing.assert_allclose(amap, ref_map, atol=1e-5)
    np.testing.assert_allclose(score, ref_score, atol=1e-5)


def test_detector_from_export_equals_detector_from_run(run, folder):
    paths = smoke_test_images(run, 3)
    a, b = Detector.load(run).predict(paths), Detector.load(folder).predict(paths)
    assert a.threshold == b.threshold
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_export_of_an_earlier_checkpoint_recalibrates(run, tmp_path):
    rec = export.export_run(run, str(tmp_path / "e3"), checkpoint=3, onnx=False, log=lambda *_: None)
    assert rec["checkpoint_step"] == 3 and rec["threshold"]["num_images"] > 0
    assert not os.path.exists(tmp_path / "e3" / "model.onnx")
    with pytest.raises(UserError, match="checkpoint does not apply"):
        Detector.load(str(tmp_path / "e3"), checkpoint=3)
