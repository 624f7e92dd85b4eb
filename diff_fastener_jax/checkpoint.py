"""Checkpoints: orbax CheckpointManager for the train state + per-process input-pipeline state.

Layout of `<workdir>/checkpoints`:
  <step>/state, <step>/meta   orbax items (written to a temporary folder, renamed when complete, so a
                              crash mid-save leaves the previous checkpoint intact)
  data/<step>.p<i>.json       the Grain iterator state of process i at that step (written atomically
                              with os.replace BEFORE the orbax save starts)
`meta` records the parameter shapes, so resuming with other model shapes is refused with a clear error.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from diff_fastener_jax.errors import UserError


class IncompatibleCheckpointError(UserError, ValueError):
    """The checkpoint on disk was written by a run with different model shapes."""


def param_shapes(params) -> dict[str, list[int]]:
    """{'recon/down0_res0/conv_in/kernel': [3, 3, 32, 32], ...} for compatibility checks."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): list(np.shape(leaf)) for path, leaf in flat}


def _atomic_write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Checkpointer:
    """Periodic (async) saves, keep-last-N, exact resume of state and data iterator."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        os.makedirs(os.path.join(self.directory, "data"), exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def _data_path(self, step: int, process: int | None = None) -> str:
        p = jax.process_index() if process is None else process
        return os.path.join(self.directory, "data", f"{step}.p{p}.json")

    def save(self, step: int, state, data_state: dict | None, meta: dict) -> None:
        """Saves `state` (a pytree of jax arrays) at `step`; returns before the write finishes."""
        _atomic_write_json(self._data_path(step), data_state)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self._prune_data_states()

    def _prune_data_states(self) -> None:
        kept = set(self.all_steps())
        folder = os.path.join(self.directory, "data")
        for name in os.listdir(folder):
            step = name.split(".", 1)[0]
            if step.isdigit() and int(step) not in kept and int(step) < max(kept | {0}):
                try:
                    os.remove(os.path.join(folder, name))
                except FileNotFoundError:
                    pass

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state, expected_shapes: dict | None = None):
        """Returns (state, data_state) at `step`; refuses a checkpoint with other parameter shapes."""
        meta = self.read_meta(step)
        if expected_shapes is not None:
            saved = meta.get("param_shapes", {})
            if saved != expected_shapes:
                diff = sorted(set(saved) ^ set(expected_shapes)) or sorted(
                    k for k in saved if saved[k] != expected_shapes.get(k))
                raise IncompatibleCheckpointError(
                    f"checkpoint {self.directory}/{step} was written by a model with other shapes "
                    f"(first differences: {diff[:3]}); use another --workdir or the run's original config")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        path = self._data_path(step)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint step {step}: input-pipeline state {path} is missing")
        with open(path) as f:
            data_state = json.load(f)
        return restored["state"], data_state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
