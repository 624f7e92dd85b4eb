"""Train from normal images alone (folder layout without abnormal/), calibrate, evaluate what can be."""

import json
import os

import numpy as np
from helpers import tiny_config
from PIL import Image

from diff_fastener_jax.data.demo import render_scene
from diff_fastener_jax.evaluation import evaluate
from diff_fastener_jax.training.loop import train_and_evaluate


def test_normal_only_folder_trains_calibrates_and_evaluates(tmp_path):
    normal = tmp_path / "data" / "line7" / "normal"
    normal.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(render_scene(32, rng)[0]).save(normal / f"{i:02d}.png")
    config = tiny_config(
        **{
            "data.format": "folder",
            "data.root": str(tmp_path / "data"),
            "data.category": "line7",
            "data.val_fraction": 0.25,
            "train.num_steps": 2,
            "train.eval_every": 2,
            "train.checkpoint_every": 2,
        }
    )
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir, quiet=True)
    out = str(tmp_path / "eval")
    result = evaluate.evaluate_workdir(workdir, out, show_progress=False)
    text = open(os.path.join(out, "metrics.json")).read()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: undefined metrics are null
    m = json.loads(text)
    assert result["num_images"] == m["num_images"]
    assert m["num_anomalous"] == 0 and m["num_images"] == 3  # 20% of the 16 normals held out as test
    assert m["has_masks"] is False and m["per_defect"] == {}
    assert m["image_auroc"] is None and any("image metrics undefined" in w for w in m["warnings"])
    # The threshold comes from the held-out validation normals; the false alarms on the test normals
    # are what a normal-only set can report.
    assert "held-out normal" in m["threshold_source"] and m["tp"] == 0 and m["fn"] == 0
    assert m["fp"] + m["tn"] == 3
    assert os.path.exists(os.path.join(out, "report.html"))
