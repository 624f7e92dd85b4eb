"""Resuming a run with settings that change what it trains: refused with one line naming each change,
unless train.allow_resume_changes confirms it; then the run goes on from its checkpoint."""

import json
import os

import pytest
from helpers import SMOKE_CONFIG, run_cli, tiny_config

from diff_fastener_jax.config import ConfigError
from diff_fastener_jax.training.loop import train_and_evaluate

# warm-up + cosine: the rate at a step depends on train.num_steps (the decay horizon)
SCHEDULE = {
    "optim.schedule": "warmup_cosine",
    "optim.warmup_steps": 1,
    "train.eval_every": 0,
    "train.checkpoint_every": 2,
    "train.log_every": 1,
}


def _events(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_with_another_step_count_needs_confirmation(demo_root, tmp_path):
    workdir = str(tmp_path / "run")
    train_and_evaluate(tiny_config(**SCHEDULE, **{"data.root": demo_root, "train.num_steps": 2}), workdir, quiet=True)
    before = _events(workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        saved = f.read()

    longer = tiny_config(**SCHEDULE, **{"data.root": demo_root, "train.num_steps": 4})
    with pytest.raises(ConfigError, match="trained with other settings: train.num_steps 2 -> 4$") as err:
        train_and_evaluate(longer, workdir, quiet=True)
    assert "--config.train.allow_resume_changes=True" in err.value.hint
    assert _events(workdir) == before and open(os.path.join(workdir, "config.json")).read() == saved

    # the command line: one error line naming the change, a hint, exit 2, nothing written
    proc = run_cli(
        "train",
        "--config",
        SMOKE_CONFIG,
        "--workdir",
        workdir,
        f"--config.data.root={demo_root}",
        *(f"--config.{k}={v}" for k, v in SCHEDULE.items()),
        "--config.train.num_steps=4",
        "--config.optim.lr_seg=0.001",
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), lines
    assert "optim.lr_seg 0.0003 -> 0.001, train.num_steps 2 -> 4" in lines[0]
    assert _events(workdir) == before

    longer.train.allow_resume_changes = True
    train_and_evaluate(longer, workdir, quiet=True)
    events = _events(workdir)[len(before) :]
    assert [e["step"] for e in events if e.get("event") == "start"] == [2]  # from the checkpoint
    assert [e["step"] for e in events if "total" in e] == [3, 4]
