"""A run and an export written by the flat module layout (before training/, evaluation/ and deploy/)
still load with the current package and give the same scores.

tests/data/legacy_run is a 2-step `configs/demo.py:smoke` run as that code wrote it (config.json,
detector.json, metrics.jsonl, checkpoint 2; its demo data left out), tests/data/legacy_export its
`export --noonnx` folder, and tests/data/legacy_probe/expected.json the scores and threshold that code's
`Detector` gave on the three probe images beside it (legacy_probe/expected.json says how all of it was
made). A change that renames a config key, a parameter path or a file of a run breaks these tests.
"""

import json
import os

import jax
import numpy as np
import pytest
from helpers import ROOT

from diff_fastener_jax import Detector
from diff_fastener_jax.deploy.detector import PARAMS_FILE, load_params
from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

DATA = os.path.join(ROOT, "tests", "data")
LEGACY_RUN = os.path.join(DATA, "legacy_run")
LEGACY_EXPORT = os.path.join(DATA, "legacy_export")
PROBE = os.path.join(DATA, "legacy_probe")


def _expected() -> dict:
    with open(os.path.join(PROBE, "expected.json")) as f:
        return json.load(f)


def test_run_checkpoint_loads_to_the_exported_params():
    """evaluate's run loading reads the legacy run's config and checkpoint 2, and its parameters are
    bit for bit the ones that the legacy export wrote (no compile)."""
    config = load_run_config(LEGACY_RUN)
    assert (config.data.image_size, config.train.num_steps) == (32, 2)
    params, step = load_run_params(LEGACY_RUN, config)
    assert step == 2
    exported = load_params(os.path.join(LEGACY_EXPORT, PARAMS_FILE))
    got = jax.tree_util.tree_leaves_with_path(jax.device_get(params))
    want = dict(jax.tree_util.tree_leaves_with_path(exported))
    assert len(got) == len(want) > 0
    for path, leaf in got:
        np.testing.assert_array_equal(np.asarray(leaf), want[path], err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("folder", [LEGACY_RUN, LEGACY_EXPORT], ids=["run", "export"])
def test_detector_loads_with_the_legacy_threshold(folder):
    """detector.json (format, contract, calibrated threshold) reads as written (no compile)."""
    det = Detector.load(folder)
    assert (det.height, det.width) == (32, 32)
    assert det.threshold == pytest.approx(_expected()["threshold"], abs=1e-6)


@pytest.mark.parametrize("folder", [LEGACY_RUN, LEGACY_EXPORT], ids=["run", "export"])
def test_detector_scores_equal_the_legacy_code(folder):
    expected = _expected()
    out = Detector.load(folder).predict([os.path.join(PROBE, name) for name in expected["images"]])
    assert out.threshold == pytest.approx(expected["threshold"], abs=1e-6)
    np.testing.assert_allclose(out.scores, expected["scores"], rtol=0, atol=1e-5)
    np.testing.assert_allclose([float(np.mean(m)) for m in out.anomaly_maps], expected["map_means"], rtol=0, atol=1e-5)
    # The three probes score apart by far more than the tolerance, so a mixed-up order would fail.
    assert min(abs(a - b) for i, a in enumerate(expected["scores"]) for b in expected["scores"][i + 1 :]) > 1e-3
