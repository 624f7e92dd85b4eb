"""evaluate / crossval end to end on a smoke-trained demo run (predict: test_predict.py)."""

import base64
import dataclasses
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
from helpers import run_cli, tiny_config
from PIL import Image

from diff_fastener_jax.data import datasets
from diff_fastener_jax.deploy import threshold
from diff_fastener_jax.evaluation import evaluate, outputs
from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

REQUIRED = [
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
    "threshold",
    "precision",
    "recall",
    "images_per_second",
    "num_images",
]


@pytest.fixture
def trained_run(smoke_run):
    return smoke_run


def _embedded_pngs(html: str) -> list[Image.Image]:
    images = []
    for b64 in re.findall(r"src=['\"]data:image/png;base64,([^'\"]+)['\"]", html):
        im = Image.open(io.BytesIO(base64.b64decode(b64)))
        im.load()
        images.append(im)
    return images


def test_evaluate_writes_metrics_and_self_contained_report(trained_run, tmp_path):
    out = str(tmp_path / "eval")
    proc = run_cli("evaluate", "--workdir", trained_run, "--out", out)
    assert proc.returncode == 0, proc.stderr
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    for key in REQUIRED:
        assert key in metrics, key
    assert "identical_test_images" not in metrics  # the demo's test images are all different
    assert metrics["num_images"] == 12 and metrics["images_per_second"] > 0
    for key in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        assert 0.0 <= metrics[key] <= 1.0
    assert (
        set(metrics["per_defect"]) == {"missing_clip", "broken_clip", "displaced_clip"} & set(metrics["per_defect"])
        and metrics["per_defect"]
    )
    for entry in metrics["per_defect"].values():
        assert "image_auroc" in entry and "pixel_auroc" in entry
    html = open(os.path.join(out, "report.html")).read()
    assert "http://" not in html and "https://" not in html  # self-contained
    pngs = _embedded_pngs(html)
    assert len(pngs) >= 3 + 5 * 2  # ROC, PR, histograms + at least two 5-image panels
    assert all(im.size[0] > 0 for im in pngs)
    # Deterministic: a second evaluation (in-process, same function as the CLI) gives identical scores.
    out2 = str(tmp_path / "eval2")
    evaluate.evaluate_workdir(trained_run, out2, show_progress=False)
    assert open(os.path.join(out, "scores.csv")).read() == open(os.path.join(out2, "scores.csv")).read()
    import csv

    rows = list(csv.DictReader(open(os.path.join(out, "scores.csv"))))
    root = load_run_config(trained_run).data.root  # paths are relative to it
    assert len(rows) == 12 and all(not os.path.isabs(r["path"]) for r in rows)
    assert all(os.path.isfile(os.path.join(root, r["path"])) for r in rows)
    assert tuple(rows[0]) == outputs.SCORE_COLUMNS
    assert all(int(r["predicted_label"]) == int(float(r["score"]) > float(r["threshold"])) for r in rows)
    assert {r["true_label"] for r in rows} == {"0", "1"}
    t_big = load_run_config(trained_run).diffusion.eval_t_big  # norm-guided starts every image there
    assert {int(r["denoise_step"]) for r in rows} == {t_big}
    assert [float(r["score"]) for r in rows] == pytest.approx(
        [float(r["score"]) for r in csv.DictReader(open(os.path.join(out2, "scores.csv")))]
    )


def test_evaluate_names_byte_identical_test_images(trained_run, tmp_path, capsys):
    """Test images with a byte-identical copy (counted twice in every metric) or a copy among the
    training normals (seen in training) are named in metrics.json, its warnings, the report and one
    stderr line."""
    config = load_run_config(trained_run)
    samples = datasets.list_samples(config.data, "test", seed=config.seed)[:5]
    train = datasets.list_samples(config.data, "train", seed=config.seed)
    copy = tmp_path / "copy.png"
    shutil.copyfile(samples[0].path, copy)
    samples.append(dataclasses.replace(samples[0], path=str(copy)))
    leaked = tmp_path / "leaked.png"
    shutil.copyfile(train[2].path, leaked)
    samples.append(dataclasses.replace(samples[1], path=str(leaked)))
    params, step = load_run_params(trained_run, config)
    out = tmp_path / "eval"
    evaluate.evaluate_run(
        config,
        params,
        str(out),
        show_progress=False,
        test_samples=samples,
        stored_threshold=threshold.stored_threshold(trained_run, step, config),
    )
    metrics = json.load(open(out / "metrics.json"))
    rel = [outputs.relative_path(p, config.data.root) for p in (samples[0].path, train[2].path)]
    groups = [[rel[0], str(copy)], [str(leaked), rel[1]]]
    assert metrics["identical_test_images"] == groups and metrics["num_images"] == 7
    line = evaluate.identical_images_warning(groups)
    assert line.startswith("2 group(s) of byte-identical files hold test images (4 files): ")
    assert f"{rel[0]} = {copy}; {leaked} = {rel[1]} (" in line
    assert line in metrics["warnings"]
    assert [x for x in capsys.readouterr().err.splitlines() if "byte-identical" in x] == [f"warning: {line}"]
    assert "byte-identical" in open(out / "report.html").read()


def test_evaluate_with_given_threshold_and_bad_override(trained_run, tmp_path):
    out = str(tmp_path / "eval")
    config = load_run_config(trained_run, {"eval.threshold": "0.5"})
    evaluate.evaluate_workdir(trained_run, out, config=config, show_progress=False)
    assert json.load(open(os.path.join(out, "metrics.json")))["threshold"] == 0.5
    bad_out = tmp_path / "bad"
    proc = run_cli("evaluate", "--workdir", trained_run, "--out", bad_out, "--config.eval.thresold=0.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "error: unknown config key eval.thresold (--config.eval.thresold)",
        "hint: did you mean eval.threshold?",
    ]
    assert not bad_out.exists()


def test_crossval_two_folds(tmp_path):
    from diff_fastener_jax.evaluation.crossval import run_crossval

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
    import csv

    rows = list(csv.DictReader(open(os.path.join(workdir, "crossval.csv"))))
    assert [int(r["fold"]) for r in rows] == [0, 1]
    assert float(rows[1]["image_auroc"]) == pytest.approx(vals[1])
    shutil.rmtree(workdir)


def test_per_defect_pixel_metrics_use_every_normal_image(trained_run, tmp_path, monkeypatch):
    """Sorted test folders put 'good' before 'missing_clip': with batches of 8, missing clips first
    appear in the last batch, after most normal images. Each defect's pixel metrics must still cover
    that defect's images plus every normal image, checked against sklearn on the same maps."""
    from sklearn.metrics import roc_auc_score

    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    seen = {}  # test index -> (anomaly map, mask)
    real = evaluate.score_in_batches

    def recording(*args, on_batch=None, **kwargs):
        def record(i0, images, out, *extra):
            if extra:  # the test split carries masks; calibration batches do not
                for j in range(images.shape[0]):
                    seen[i0 + j] = (np.asarray(out.anomaly_map[j]), np.asarray(extra[0][j]))
            if on_batch is not None:
                on_batch(i0, images, out, *extra)

        return real(*args, on_batch=record, **kwargs)

    monkeypatch.setattr(evaluate, "score_in_batches", recording)
    config = load_run_config(trained_run, {"infer.batch_size": "8"})
    params, _ = load_run_params(trained_run, config)
    result = evaluate.evaluate_run(config, params, str(tmp_path / "eval"), show_progress=False)
    import csv

    defects = [r["defect"] for r in csv.DictReader(open(tmp_path / "eval" / "scores.csv"))]
    assert set(result["per_defect"]) == set(defects) - {"good"} == {"missing_clip", "broken_clip", "displaced_clip"}
    assert sorted(seen) == list(range(len(defects)))
    for name, entry in result["per_defect"].items():
        sel = [i for i, d in enumerate(defects) if d in (name, "good")]
        assert entry["num_images"] == sum(d == name for d in defects)
        assert entry["pixel_num_pixels"] == len(sel) * seen[0][0].size  # every normal image's pixels
        maps = np.stack([seen[i][0] for i in sel]).astype(np.float32)
        masks = np.stack([seen[i][1] for i in sel]) > 0.5
        assert entry["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9), name
