"""Crash-safe training, proven: a training process SIGKILLed after a checkpoint, or in the middle of one,
resumes with the same command to the same parameters bit for bit as the suite's uninterrupted
smoke run; an unreadable latest checkpoint falls back to the previous one with a warning."""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers import ROOT, SMOKE_CONFIG, copy_run, run_cli, subprocess_env

from diff_fastener_jax.training.run_loading import load_run_config, load_run_params

# The train command with one hook: after checkpoint STEP is handed to orbax, either SIGKILL ourselves at
# once (the asynchronous write is still in flight: "during") or wait for the write, say so on stdout and
# sleep until the test SIGKILLs us ("after").
_KILLABLE_TRAIN = textwrap.dedent("""
    import os, signal, sys, time
    from diff_fastener_jax.training import checkpoint
    from diff_fastener_jax import cli, train

    mode, at_step = sys.argv[1], int(sys.argv[2])
    save = checkpoint.Checkpointer.save

    def hooked(self, step, *args, **kwargs):
        save(self, step, *args, **kwargs)
        if step == at_step:
            if mode == "during":
                os.kill(os.getpid(), signal.SIGKILL)
            self.wait()
            print(f"SAVED {step}", flush=True)
            time.sleep(600)

    checkpoint.Checkpointer.save = hooked
    cli.run(train.main, train.__doc__, define_flags=train.define_flags, argv=[train.__file__] + sys.argv[3:])
""")


def _train_args(demo_root, workdir):
    return ["--config", SMOKE_CONFIG, "--workdir", str(workdir), f"--config.data.root={demo_root}"]


def _params(workdir):
    params, step = load_run_params(workdir, load_run_config(workdir))
    return step, jax.tree_util.tree_leaves(jax.device_get(params))


def _assert_same_params(run_a, run_b):
    step_a, a = _params(run_a)
    step_b, b = _params(run_b)
    assert step_a == step_b == 6
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)  # bit for bit on CPU


def _killable(mode: str, step: int, demo_root, workdir):
    return subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_TRAIN, mode, str(step), *_train_args(demo_root, workdir)],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rerun(demo_root, workdir):
    proc = run_cli("train", *_train_args(demo_root, workdir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sigkill_after_first_checkpoint_then_rerun_equals_uninterrupted(demo_root, smoke_run, tmp_path):
    workdir = tmp_path / "run"
    proc = _killable("after", 3, demo_root, workdir)
    try:
        for line in proc.stdout:  # training log lines, then our marker
            if line.startswith("SAVED 3"):
                break
        else:
            pytest.fail(f"training ended before its first checkpoint: {proc.wait()} {proc.stderr.read()[-3000:]}")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    listing = os.listdir(workdir / "checkpoints")
    assert "3" in listing and "6" not in listing
    rerun = _rerun(demo_root, workdir)
    assert "resumed from step 3" in rerun.stdout
    _assert_same_params(workdir, smoke_run)


def test_sigkill_during_a_save_then_rerun_equals_uninterrupted(demo_root, smoke_run, tmp_path):
    workdir = tmp_path / "run"
    proc = _killable("during", 3, demo_root, workdir)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]
    _rerun(demo_root, workdir)
    _assert_same_params(workdir, smoke_run)


def test_unreadable_latest_checkpoint_resumes_from_the_previous_one(demo_root, smoke_run, tmp_path):
    workdir = copy_run(smoke_run, tmp_path / "run")
    for folder, _, files in os.walk(os.path.join(workdir, "checkpoints", "6", "state")):
        for name in files:
            with open(os.path.join(folder, name), "r+b") as f:
                f.truncate(0)
    rerun = _rerun(demo_root, workdir)
    assert "checkpoint" in rerun.stderr and "6 is unreadable" in rerun.stderr
    assert "resumed from step 3" in rerun.stdout
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "unreadable", "6"))
    _assert_same_params(workdir, smoke_run)
