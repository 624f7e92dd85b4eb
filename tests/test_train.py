"""The training CLI end to end at a smoke size: metrics, checkpoints, exact resume, config errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from helpers import copy_run, tiny_config

from diff_fastener_jax.config import ConfigError, validate_config
from diff_fastener_jax.training.checkpoint import Checkpointer, IncompatibleCheckpointError
from diff_fastener_jax.training.loop import train_and_evaluate
from diff_fastener_jax.training.run_loading import load_run_config, load_run_params


def _config(demo_root, **kw):
    config = tiny_config(**kw)
    config.data.root = demo_root
    return config


def _params(workdir, step=None):
    config = load_run_config(workdir)
    params, _ = load_run_params(workdir, config, step)
    return jax.tree_util.tree_leaves(jax.device_get(params))


def test_smoke_train_writes_metrics_config_checkpoints(smoke_run):
    workdir = smoke_run  # the suite's shared 6-step smoke run
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    last = [x for x in lines if "total" in x][-1]
    assert np.isfinite(last["total"])
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    train_lines = [x for x in lines if "total" in x]
    assert [x["step"] for x in train_lines] == [2, 4, 6]
    assert all(np.isfinite(x[k]) for x in train_lines for k in ("total", "noise", "focal", "smoothl1"))
    assert all(x["images_per_s"] > 0 and "eta_s" in x for x in train_lines)
    assert any(x.get("event") == "validation" and "val_image_auroc" in x for x in lines)
    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["model"]["base_channels"] == 16
    steps = Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
    assert sorted(steps) == [3, 6]


def test_resume_equals_uninterrupted(demo_root, smoke_run, tmp_path):
    full = smoke_run  # the same config, 6 steps uninterrupted
    part = str(tmp_path / "part")
    train_and_evaluate(_config(demo_root, **{"train.num_steps": 3}), part, quiet=True)
    # "Crash": the process ends after step 3's checkpoint; the same command with more steps resumes.
    last = train_and_evaluate(_config(demo_root, **{"train.num_steps": 6}), part, quiet=True)
    assert last["step"] == 6
    lines = [json.loads(x) for x in open(os.path.join(part, "metrics.jsonl"))]
    assert any(x.get("event") == "resume" and x["step"] == 3 for x in lines)
    keys = [(x.get("event"), x["step"]) for x in lines]  # no line of the first run is written again
    assert len(keys) == len(set(keys)) and [x["step"] for x in lines if x.get("event") == "done"] == [6]
    for a, b in zip(_params(full), _params(part)):
        np.testing.assert_array_equal(a, b)  # bit for bit on CPU


def test_interrupted_save_leaves_previous_checkpoint_usable(demo_root, tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(_config(demo_root, **{"train.num_steps": 3}), workdir, quiet=True)
    ckdir = os.path.join(workdir, "checkpoints")
    # A save that died half way: orbax writes into a temporary folder and renames it only when done,
    # so what a crash leaves behind is an unfinished "<step>.orbax-checkpoint-tmp" folder.
    partial = os.path.join(ckdir, "6.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(ckdir, "3"), partial)
    shutil.rmtree(os.path.join(partial, "state"))
    assert Checkpointer(ckdir).latest_step() == 3
    # Resuming goes on from step 3 and writes a complete step 6 where the partial one was.
    last = train_and_evaluate(_config(demo_root, **{"train.num_steps": 6}), workdir, quiet=True)
    assert last["step"] == 6
    assert sorted(Checkpointer(ckdir).all_steps()) == [3, 6]


def test_resume_with_other_model_shapes_is_refused(demo_root, smoke_run, tmp_path):
    workdir = copy_run(smoke_run, tmp_path / "run")
    before = {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)}
    with pytest.raises(IncompatibleCheckpointError, match="other shapes"):
        train_and_evaluate(_config(demo_root, **{"train.num_steps": 8, "model.base_channels": 32}), workdir, quiet=True)
    # Refused before anything was written: config.json and the checkpoints are untouched.
    assert {n: os.path.getmtime(os.path.join(workdir, n)) for n in os.listdir(workdir)} == before
    assert json.load(open(os.path.join(workdir, "config.json")))["model"]["base_channels"] == 16


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"train.batch_size": 5}, "must be even"),
        ({"train.batch_size": 6}, "not divisible by 2 x 4 devices"),
        ({"diffusion.eval_t_small": 400, "diffusion.eval_t_big": 200}, "t_s < t_b"),
        ({"data.format": "mvtec", "data.root": "/nonexistent/root"}, "data.root"),
        ({"model.activation": "tanh"}, "model.activation"),
        ({"data.image_size": 36, "model.channel_mults": (1, 2, 2, 2)}, "data.image_size"),  # 36 % 8
    ],
)
def test_invalid_configs_fail_before_compiling(overrides, match):
    config = tiny_config(**overrides)
    with pytest.raises(ConfigError, match=match):
        validate_config(config, num_devices=4)


def test_unknown_config_key_is_refused():
    config = tiny_config()
    config.unlock()
    config.train.bacth_size = 4
    with pytest.raises(ConfigError, match="train.bacth_size"):
        validate_config(config, num_devices=1)


def test_non_finite_loss_stops_with_the_step_named():
    from diff_fastener_jax.training.loop import NonFiniteLossError, _check_finite

    nan = float("nan")
    with pytest.raises(NonFiniteLossError, match="step 17"):
        _check_finite(17, {"finite": 0.0, "total": nan, "noise": nan, "focal": 0.1})
    _check_finite(18, {"finite": 1.0, "total": 1.0, "noise": 1.0, "focal": 0.1})  # finite: no error


def test_a_failed_start_writes_nothing(demo_root, tmp_path):
    """Config, data layout and every image are checked before the workdir is touched or anything compiles."""
    from diff_fastener_jax.data.datasets import DatasetError

    root = shutil.copytree(demo_root, tmp_path / "data")
    victim = sorted((root / "fastener" / "train" / "good").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[:60])  # truncated PNG
    workdir = tmp_path / "run"
    with pytest.raises(DatasetError, match=f"cannot decode image {victim}"):
        train_and_evaluate(_config(str(root)), str(workdir), quiet=True)
    with pytest.raises(ConfigError, match="data.root"):
        train_and_evaluate(
            tiny_config(**{"data.format": "mvtec", "data.root": str(tmp_path / "nope")}), str(workdir), quiet=True
        )
    (root / "fastener" / "train" / "good").rename(root / "fastener" / "train" / "elsewhere")
    with pytest.raises(DatasetError, match="train/good"):
        train_and_evaluate(_config(str(root)), str(workdir), quiet=True)
    assert not workdir.exists()


def test_prepare_run_lists_each_split_once(demo_root, tmp_path, monkeypatch):
    from diff_fastener_jax.data import datasets
    from diff_fastener_jax.training.loop import prepare_run

    calls = []
    original = datasets.list_splits
    monkeypatch.setattr(datasets, "list_splits", lambda *a, **k: calls.append(1) or original(*a, **k))
    config, samples = prepare_run(_config(demo_root), str(tmp_path / "run"), num_devices=4)
    assert len(calls) == 1 and set(samples) == {"train", "val", "test", "val_anomalies"}
    assert samples["val_anomalies"] == []  # data.val_anomalies unset
    assert len(samples["train"]) + len(samples["val"]) == 12 and config.data.root == demo_root
    assert not (tmp_path / "run").exists()
