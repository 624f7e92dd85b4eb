"""Checkpoint selection on validation (`train.select_on`): the rule, its persistence across a
resume, the kept checkpoint, and that calibration, evaluate and the Detector use the selected step."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from diff_fastener_jax.config import validate_config
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.training.selection import SELECTION_FILE, Selection


def test_min_metric_selects_lowest_and_ties_go_to_the_later_step():
    s = Selection("val_recon_error")
    assert s.offer(10, {"val_recon_error": 0.30}) is True
    assert s.offer(20, {"val_recon_error": 0.10}) is True
    assert s.offer(30, {"val_recon_error": 0.20}) is False
    assert s.best_step == 20
    assert s.offer(40, {"val_recon_error": 0.10}) is True  # tie: the longer-trained step
    assert s.best == {"step": 40, "value": 0.10}


def test_max_metric_and_missing_metric():
    s = Selection("val_pixel_aupro")
    assert s.offer(5, {"val_pixel_aupro": 0.4}) is True
    assert s.offer(10, {"val_pixel_aupro": 0.2}) is False
    assert s.offer(15, {"val_recon_error": 0.1}) is False  # no such value: not a candidate
    assert s.best_step == 5
    assert [e["step"] for e in s.history] == [5, 10]


def test_last_selects_nothing():
    s = Selection("last")
    assert not s.enabled
    assert s.offer(5, {"val_recon_error": 0.1}) is False
    assert s.best_step is None
    assert s.record(100) == {"select_on": "last", "step": 100}


def test_resume_drops_entries_after_the_restored_step(tmp_path):
    s = Selection("val_image_auroc")
    for step, v in ((2, 0.5), (4, 0.9), (6, 0.7)):
        s.offer(step, {"val_image_auroc": v})
    s.save(str(tmp_path))
    resumed = Selection.load(str(tmp_path), "val_image_auroc", upto=3)  # restored from checkpoint 3
    assert resumed.history == [{"step": 2, "value": 0.5}]
    assert Selection.load(str(tmp_path), "val_image_auroc", upto=6).best_step == 4
    # another metric measured something else: start afresh
    assert Selection.load(str(tmp_path), "val_recon_error", upto=6).history == []
    assert json.load(open(tmp_path / SELECTION_FILE))["select_on"] == "val_image_auroc"


def test_config_refuses_unknown_metric_and_selection_without_validation():
    with pytest.raises(UserError, match="train.select_on"):
        validate_config(tiny_config(**{"train.select_on": "test_auroc"}), num_devices=1)
    with pytest.raises(UserError, match="does not run"):
        validate_config(tiny_config(**{"train.select_on": "val_recon_error", "train.val_batches": 0}), num_devices=1)
    validate_config(tiny_config(**{"train.select_on": "val_recon_error"}), num_devices=1)


def test_checkpointer_keeps_a_protected_step_beyond_keep(tmp_path):
    from diff_fastener_jax.training.checkpoint import Checkpointer

    ckpt = Checkpointer(str(tmp_path / "ck"), keep=1, async_save=False)
    state = {"w": jnp.zeros((2,))}
    for step in (1, 2, 3):
        if step == 2:
            ckpt.protect([2])
        ckpt.save(step, jax.tree_util.tree_map(lambda x, s=step: x + s, state), {"i": step}, {"m": step})
    assert ckpt.all_steps() == [2, 3]
    ckpt.protect([])  # no longer selected: removed at the next save
    ckpt.save(4, state, {"i": 4}, {"m": 4})
    assert ckpt.all_steps() == [4]
    ckpt.close()


def test_training_keeps_calibrates_and_evaluates_the_selected_step(demo_root, tmp_path, monkeypatch):
    """Scripted validation values pick step 4 of 6; with keep_checkpoints=1 and checkpoints only at the
    end, step 4 must still be saved and kept, detector.json calibrated for it, and evaluate / the
    Detector load it by default."""
    from diff_fastener_jax.deploy.detector import Detector
    from diff_fastener_jax.deploy.threshold import calibrate
    from diff_fastener_jax.evaluation.evaluate import evaluate_workdir
    from diff_fastener_jax.training import loop
    from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

    scripted = {2: 0.30, 4: 0.05, 6: 0.20}
    real = loop._validation_scores

    def fake_validation(infer, params, val_batches, mesh=None, unified=False):
        out = real(infer, params, val_batches, mesh, unified)
        fake_validation.step += 2
        return out | {"val_recon_error": scripted[fake_validation.step]}

    fake_validation.step = 0
    monkeypatch.setattr(loop, "_validation_scores", fake_validation)
    workdir = str(tmp_path / "run")
    config = tiny_config(
        **{
            "data.root": demo_root,
            "train.select_on": "val_recon_error",
            "train.eval_every": 2,
            "train.checkpoint_every": 6,
            "train.keep_checkpoints": 1,
        }
    )
    loop.train_and_evaluate(config, workdir, quiet=True)

    assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()) == [4, 6]
    record = json.load(open(os.path.join(workdir, "detector.json")))
    assert record["checkpoint_step"] == 4
    assert record["selection"]["select_on"] == "val_recon_error"
    assert record["selection"]["value"] == pytest.approx(0.05)
    assert [e["step"] for e in record["selection"]["history"]] == [2, 4, 6]
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [x["step"] for x in lines if x.get("selected")] == [2, 4]

    # The stored threshold is the selected step's, not the last step's.
    run_config = load_run_config(workdir)
    params4, step = load_run_params(workdir, run_config)
    assert step == 4
    params6, _ = load_run_params(workdir, run_config, 6)
    assert not all(
        np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(params4), jax.tree_util.tree_leaves(params6))
    )
    assert record["threshold"]["value"] == pytest.approx(calibrate(run_config, params4)[0]["value"], rel=1e-5)

    result = evaluate_workdir(workdir, str(tmp_path / "eval"))
    assert result["threshold"] == pytest.approx(record["threshold"]["value"], rel=1e-6)
    assert "@ step 4" in open(tmp_path / "eval" / "report.html").read()
    assert Detector.load(workdir).threshold == pytest.approx(record["threshold"]["value"])
