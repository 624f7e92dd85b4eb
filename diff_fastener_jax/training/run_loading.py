"""Loading a finished (or running) training run: its config and the parameters of a checkpoint."""

from __future__ import annotations

import os

import jax
import ml_collections

from diff_fastener_jax.config import apply_overrides, config_from_json
from diff_fastener_jax.deploy import normal_map, threshold  # threshold: the one reader of detector.json
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.training.checkpoint import Checkpointer, param_shapes
from diff_fastener_jax.training.train_step import create_train_state


def load_run_config(workdir: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
    """The run's saved config.json with CLI overrides applied."""
    config = config_from_json(os.path.join(workdir, "config.json"))
    return apply_overrides(config, overrides or {})


def default_step(workdir: str, steps: list[int]) -> int:
    """The step a run stands for: the one selected on validation (`train.select_on`, recorded in
    detector.json at the end of training) when there is one and it is on disk, else the latest."""
    try:
        record = threshold.read(workdir)
    except UserError:  # none yet (a running run) or unreadable: the latest step
        record = {}
    selected = (record.get("selection") or {}).get("select_on", "last") != "last"
    if selected and record.get("checkpoint_step") in steps:
        return int(record["checkpoint_step"])
    return max(steps)


def load_run_params(workdir: str, config: ml_collections.ConfigDict, step: int | None = None):
    """(params, step): the checkpoint's EMA params when EMA was on, else its raw params, with the run's
    normal map attached where `infer.normal_map` fits one and one was fitted for this step
    (`threshold.stored_normal_map`). `step` defaults to `default_step` (the selected checkpoint of a
    finished run)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        raise UserError(f"no checkpoints in {directory}", hint="train first: python -m diff_fastener_jax.train")
    ckpt = Checkpointer(directory, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        ckpt.close()
        raise UserError(f"no checkpoints in {directory}", hint="train first: python -m diff_fastener_jax.train")
    step = default_step(workdir, steps) if step is None else step
    if step not in steps:
        ckpt.close()
        raise UserError(
            f"--checkpoint {step}: no such step in {directory}",
            hint=f"available steps: {', '.join(map(str, sorted(steps)))}",
        )
    # Restore onto this process's first device whatever topology saved it (e.g. 2 hosts x 4 GPUs).
    on_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=on_device),
        jax.eval_shape(lambda: create_train_state(config, jax.random.key(0))),
    )
    state, _ = ckpt.restore(step, abstract, expected_shapes=param_shapes(abstract.params))
    ckpt.close()
    params = state.inference_params
    fitted = threshold.stored_normal_map(workdir, step, config)
    if fitted is not None:
        params = normal_map.attach(params, fitted)
    return params, step
