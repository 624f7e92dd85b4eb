"""Export: model.stablehlo and model.onnx compute what the in-process JAX program computes."""

import json
import os

import numpy as np
import pytest
from ship_support import smoke_export, smoke_test_images

from diff_fastener_jax import Detector
from diff_fastener_jax.deploy import export
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
    images = det.preprocess(smoke_test_images(run, 10))  # (10, 32, 32, 3)
    assert images.shape[0] == 10
    return images, det.infer(images)


def test_folder_is_self_contained(run, folder):
    assert sorted(os.listdir(folder)) == ["config.json", "detector.json", "model.onnx", "model.stablehlo", "params.npz"]
    with open(os.path.join(folder, "detector.json")) as f:
        rec = json.load(f)
    with open(os.path.join(run, "detector.json")) as f:
        stored = json.load(f)
    assert rec["threshold"] == stored["threshold"] and rec["threshold"]["value"] is not None
    assert rec["stablehlo"]["batch"] == "symbolic N" and "cpu" in rec["stablehlo"]["platforms"]
    assert rec["onnx"]["batch"] == "dynamic B" and rec["config_digest"] == stored["config_digest"]


def test_stablehlo_parameter_layout_matches_the_program_and_params_npz(folder):
    import jax

    with open(os.path.join(folder, "detector.json")) as f:
        layout = json.load(f)["stablehlo"]["params"]
    with open(os.path.join(folder, "model.stablehlo"), "rb") as f:
        exp = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(folder, "params.npz")) as z:
        assert sorted(p["name"] for p in layout) == sorted(z.files)
        for p, aval in zip(layout, exp.in_avals):  # the program's first inputs, in order
            assert (
                (tuple(p["shape"]), p["dtype"])
                == (aval.shape, str(aval.dtype))
                == (z[p["name"]].shape, str(z[p["name"]].dtype))
            )
    assert len(exp.in_avals) == len(layout) + 1  # + images


def test_stablehlo_matches_jax_at_any_batch_size(folder, batch):
    images, (ref_map, ref_score) = batch
    f = export.load_stablehlo(folder)
    for n in (5, 1):  # symbolic batch: one exported program for every N
        amap, score = (np.asarray(o) for o in f(images[:n]))
        assert amap.shape == (n, 32, 32) and score.shape == (n,)
        np.testing.assert_allclose(amap, ref_map[:n], atol=1e-5)
        np.testing.assert_allclose(score, ref_score[:n], atol=1e-5)


def test_onnx_matches_jax_in_onnxruntime_at_any_batch_size(folder, batch):
    images, (ref_map, ref_score) = batch
    sess = export.onnx_session(folder)
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("images", ["B", 32, 32, 3])]
    assert [o.name for o in sess.get_outputs()] == ["anomaly_map", "score"]
    for n in (10, 1):  # one ONNX model for every batch size
        amap, score = sess.run(None, {"images": images[:n]})
        assert amap.shape == (n, 32, 32) and score.shape == (n,) and amap.dtype == np.float32
        np.testing.assert_allclose(amap, ref_map[:n], atol=1e-5)
        np.testing.assert_allclose(score, ref_score[:n], atol=1e-5)
    amap, score = export.onnx_predict(sess, images)
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


def _stub_stablehlo(monkeypatch):
    """A stand-in for the StableHLO lowering: these tests are about the folder, not the program."""
    monkeypatch.setattr(export, "export_stablehlo", lambda config, params: (b"program", {"batch": "symbolic N"}))


def _snapshot(folder) -> dict:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def test_export_refuses_a_non_empty_out_and_overwrite_replaces_it_whole(run, tmp_path, monkeypatch):
    _stub_stablehlo(monkeypatch)
    out = tmp_path / "e"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"an older export's model")  # would score differently: must go
    (out / "notes.txt").write_text("not part of an export")
    (tmp_path / ".e.partial-killed").mkdir()  # what a killed export leaves next to --out
    with pytest.raises(UserError, match="not empty"):
        export.export_run(run, str(out), onnx=False, log=lambda *_: None)
    assert sorted(os.listdir(out)) == ["model.onnx", "notes.txt"]
    export.export_run(run, str(out), onnx=False, overwrite=True, log=lambda *_: None)
    assert sorted(os.listdir(out)) == ["config.json", "detector.json", "model.stablehlo", "params.npz"]
    assert sorted(os.listdir(tmp_path)) == ["e"]  # no staging, old or leftover folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        export.export_run(run, str(tmp_path / "file"), onnx=False, overwrite=True, log=lambda *_: None)


def test_an_interrupted_export_leaves_no_folder_or_the_previous_one(run, tmp_path, monkeypatch):
    _stub_stablehlo(monkeypatch)
    out = tmp_path / "e"
    export.export_run(run, str(out), onnx=False, log=lambda *_: None)
    before = _snapshot(out)

    def killed(*_):  # fails after model.stablehlo is written, as a kill would mid-export
        raise KeyboardInterrupt

    monkeypatch.setattr(export.api, "save_params", killed)
    with pytest.raises(KeyboardInterrupt):
        export.export_run(run, str(out), onnx=False, overwrite=True, log=lambda *_: None)
    assert _snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["e"]
    with pytest.raises(KeyboardInterrupt):
        export.export_run(run, str(tmp_path / "new"), onnx=False, log=lambda *_: None)
    assert sorted(os.listdir(tmp_path)) == ["e"]


def test_export_refuses_a_threshold_calibrated_in_another_dtype(run, tmp_path):
    from helpers import copy_run

    copied = copy_run(run, tmp_path / "run")
    path = os.path.join(copied, "detector.json")
    record = json.load(open(path))
    other = "bfloat16" if record["threshold"]["dtype"] == "float32" else "float32"
    record["threshold"]["dtype"] = other
    json.dump(record, open(path, "w"))
    with pytest.raises(UserError, match=f"calibrated on scores computed in {other}"):
        export.export_run(copied, str(tmp_path / "e"), onnx=False, log=lambda *_: None)
    assert not os.path.exists(tmp_path / "e")
