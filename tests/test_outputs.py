"""The machine-read outputs: strict JSON (no NaN/Infinity) and scores.csv paths relative to a root."""

import json
import os

import numpy as np

from diff_fastener_jax.deploy.predict import output_stems
from diff_fastener_jax.evaluation import outputs


def test_metrics_json_is_strict(tmp_path):
    path = str(tmp_path / "metrics.json")
    outputs.write_json(
        path,
        {
            "image_auroc": float("nan"),
            "pixel_ap": np.float32("inf"),
            "n": np.int64(3),
            "per_defect": {"crack": [np.nan, 0.5]},
            "map": np.array([1.0, -np.inf]),
        },
    )
    text = open(path).read()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {
        "image_auroc": None,
        "pixel_ap": None,
        "n": 3,
        "per_defect": {"crack": [None, 0.5]},
        "map": [1.0, None],
    }
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_paths_are_relative_to_their_root_and_stems_unique(tmp_path):
    root = tmp_path / "data"
    assert outputs.relative_path(str(root / "a" / "img.png"), str(root)) == "a/img.png"
    outside = str(tmp_path / "elsewhere" / "img.png")
    assert outputs.relative_path(outside, str(root)) == outside
    assert output_stems(["a/img.png", "b/img.png", "c.png"]) == ["a/img", "b/img", "c"]
    assert output_stems(["img.png", "img.tif"]) == ["img_png", "img_tif"]
