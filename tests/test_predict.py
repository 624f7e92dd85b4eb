"""predict: scores new images from an export folder (no training data), reports corrupt files by name."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT
from PIL import Image
from ship_support import smoke_export, smoke_test_images

from diff_fastener_jax import Detector, predict
from diff_fastener_jax.errors import UserError


@pytest.fixture(scope="module")
def folder(tmp_path_factory, smoke_run):
    return smoke_export(tmp_path_factory, smoke_run)


@pytest.fixture(scope="module")
def incoming(tmp_path_factory, smoke_run):
    """Two test images at another size (one as 16-bit grey), a comma in a name, and a corrupt file."""
    run = smoke_run
    d = tmp_path_factory.mktemp("incoming")
    src = smoke_test_images(run)
    a, b = src[0], src[-1]
    Image.open(a).resize((50, 40)).save(d / "a,comma.png")
    grey = np.asarray(Image.open(b).convert("L").resize((36, 30)), np.uint16) * 257
    Image.fromarray(grey).save(d / "b16.png")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return d


def test_predict_writes_scores_maps_masks_and_reports_the_corrupt_file(folder, incoming, tmp_path):
    det = Detector.load(folder)
    paths = predict.find_images(str(incoming))
    out = str(tmp_path / "pred")
    res = predict.predict(det, paths, out, show_progress=False)
    assert res["scored"] == 2 and [os.path.basename(p) for p, _ in res["errors"]] == ["broken.png"]
    with open(os.path.join(out, "scores.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert [os.path.basename(r["path"]) for r in rows] == ["a,comma.png", "b16.png"]  # csv quotes the comma
    ref = det.predict([str(incoming / "a,comma.png"), str(incoming / "b16.png")])
    for r, s, lab, step in zip(rows, ref.scores, ref.labels, ref.denoise_steps):
        assert int(r["denoise_step"]) == int(step) == det.config.diffusion.eval_t_big
        assert float(r["score"]) == pytest.approx(float(s), abs=1e-6)
        assert int(r["predicted_label"]) == int(lab) == int(float(r["score"]) > float(r["threshold"]))
        assert r["path"] in ("a,comma.png", "b16.png") and r["true_label"] == "" and r["defect"] == ""
    assert float(rows[0]["threshold"]) == pytest.approx(det.threshold, abs=1e-6)
    # Per-image outputs at each input's own size.
    assert Image.open(os.path.join(out, "a,comma_overlay.png")).size == (50, 40)
    raw = np.asarray(Image.open(os.path.join(out, "b16_map.png")))
    assert raw.dtype == np.uint16 and raw.shape == (30, 36)
    np.testing.assert_allclose(raw / 65535.0, ref.anomaly_maps[1], atol=1e-4)
    mask = np.asarray(Image.open(os.path.join(out, "b16_mask.png")))
    np.testing.assert_array_equal(mask > 0, ref.masks[1])
    with open(os.path.join(out, "errors.csv"), newline="") as f:
        assert "broken.png" in f.read()


def test_predict_npy_maps_and_missing_images(folder, incoming, tmp_path):
    det = Detector.load(folder)
    out = str(tmp_path / "npy")
    predict.predict(det, [str(incoming / "b16.png")], out, maps="npy", show_progress=False)
    amap = np.load(os.path.join(out, "b16_map.npy"))
    assert amap.dtype == np.float32 and amap.shape == (30, 36)
    with pytest.raises(UserError, match="no image files"):
        predict.find_images(str(tmp_path / "nothing*.png"))


def test_predict_cli_with_only_the_export_folder(folder, incoming, tmp_path):
    out = str(tmp_path / "cli")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        [sys.executable, "-m", "diff_fastener_jax.predict", "--model", folder, "--images", str(incoming), "--out", out],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]  # one unreadable file
    assert "broken.png" in proc.stderr and "scored 2 image(s)" in proc.stdout
    assert os.path.isfile(os.path.join(out, "scores.csv"))


def test_equal_names_in_two_folders_stay_apart(folder, incoming, tmp_path):
    """site/a/img.png and site/b/img.png: scores.csv tells them apart by their path relative to the
    --images root, and each gets its own output files (derived from that path)."""
    import shutil

    from diff_fastener_jax.evaluation import outputs

    det = Detector.load(folder)
    for sub, src in (("a", "a,comma.png"), ("b", "b16.png")):
        (tmp_path / "site" / sub).mkdir(parents=True)
        shutil.copy(incoming / src, tmp_path / "site" / sub / "img.png")
    spec = str(tmp_path / "site" / "*" / "*.png")
    out = tmp_path / "pred"
    predict.predict(det, predict.find_images(spec), str(out), show_progress=False, root=predict.images_root(spec))
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == outputs.SCORE_COLUMNS  # the columns of evaluate's scores.csv
    assert [r["path"] for r in rows] == ["a/img.png", "b/img.png"]
    assert Image.open(out / "a" / "img_overlay.png").size == (50, 40)
    assert Image.open(out / "b" / "img_overlay.png").size == (36, 30)
    assert predict.images_root(str(tmp_path / "site")) == str(tmp_path / "site")
