"""evaluate / crossval end to end on a smoke-trained demo run (predict: test_predict.py)."""

import base64
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from diff_fastener_jax import evaluate
from diff_fastener_jax.train import train_and_evaluate

REQUIRED = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
            "pixel_aupro", "threshold", "precision", "recall", "images_per_second", "num_images"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run") / "demo")
    train_and_evaluate(tiny_config(**{"train.num_steps": 4, "train.eval_every": 0}), workdir, quiet=True)
    return workdir


def _embedded_pngs(html: str) -> list[Image.Image]:
    images = []
    for b64 in re.findall(r"src=['\"]data:image/png;base64,([^'\"]+)['\"]", html):
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        im.load()
        images.append(im)
    return images


def test_evaluate_writes_metrics_and_self_contained_report(trained_run, tmp_path):
    out = str(tmp_path / "eval")
    assert evaluate.main(["--workdir", trained_run, "--out", out]) == 0
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in REQUIRED:
        assert key in metrics, key
    assert metrics["num_images"] == 12 and metrics["images_per_second"] > 0
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert set(metrics["per_defect"]) == {"missing_clip", "broken_clip", "displaced_clip"} & set(
        metrics["per_defect"]) and metrics["per_defect"]
    for entry in metrics["per_defect"].values():
        assert "image_auroc" in entry and "pixel_auroc" in entry
    html = open(os.path.join(out, "report.html")).read()
    assert "http://" not in html and "https://" not in html  # self-contained
    pngs = _embedded_pngs(html)
    assert len(pngs) >= 3 + 5 * 2  # ROC, PR, histograms + at least two 5-image panels
    assert all(im.size[0] > 0 for im in pngs)
    # Deterministic: a second evaluation gives identical scores.
    out2 = str(tmp_path / "eval2")
    evaluate.main(["--workdir", trained_run, "--out", out2])
    assert open(os.path.join(out, "scores.csv")).read() == open(os.path.join(out2, "scores.csv")).read()


def test_evaluate_with_given_threshold_and_bad_override(trained_run, tmp_path):
    out = str(tmp_path / "eval")
    evaluate.main(["--workdir", trained_run, "--out", out, "--config.eval.threshold=0.5"])
    assert json.load(open(os.path.join(out, "metrics.json")))["threshold"] == 0.5
    with pytest.raises(KeyError, match="eval.thresold"):
        evaluate.main(["--workdir", trained_run, "--out", out, "--config.eval.thresold=0.5"])


def test_crossval_two_folds(tmp_path):
    from diff_fastener_jax.crossval import run_crossval

    config = tiny_config(**{"train.num_steps": 2, "train.eval_every": 0, "infer.batch_size": 4})
    workdir = str(tmp_path / "cv")
    os.makedirs(workdir)
    record = run_crossval(config, workdir, folds=2, quiet=True)
    assert [f["fold"] for f in record["per_fold"]] == [0, 1]
    assert "image_auroc" in record["summary"]
    assert os.path.exists(os.path.join(workdir, "crossval.html"))
    summary = json.load(open(os.path.join(workdir, "crossval.json")))["summary"]
    vals = [f["image_auroc"] for f in record["per_fold"]]
    assert summary["image_auroc"]["mean"] == pytest.approx(float(np.mean(vals)))
    shutil.rmtree(workdir)
