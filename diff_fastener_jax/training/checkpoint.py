"""Checkpoints: orbax CheckpointManager for the train state + per-process input-pipeline state.

Layout of `<workdir>/checkpoints`:
  <step>/state, <step>/meta   orbax items (written to a temporary folder, renamed when complete, so a
                              crash mid-save leaves the previous checkpoint intact)
  data/<step>.p<i>.json       the Grain iterator state of process i at that step (written atomically
                              with os.replace BEFORE the orbax save starts)
`meta` records the parameter shapes, so resuming with other model shapes is refused with a clear error.

Crash safety: a process killed at any moment leaves either a complete checkpoint or an unfinished
temporary folder that orbax ignores and removes. A checkpoint that is complete on disk but cannot be
read back (a damaged disk, a truncated copy) is moved to `checkpoints/unreadable/<step>` by
`restore_latest`, which warns and falls back to the previous checkpoint.

On CPU, arrays are saved whole (`_save_whole_arrays_on_cpu`). By default orbax splits each replicated
array into one slice per device replica, and every slice shape is an eagerly dispatched `slice` that
XLA compiles on its first use: 131 compiles and 20 s of a 50 s smoke training run's two saves (every
leaf x 4 simulated devices), for devices that share one memory anyway. Orbax already saves whole
arrays on GPUs. The files on disk are the same either way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
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


def atomic_write_json(path: str, obj: Any) -> None:
    """Writes `obj` as JSON to `path` via a temporary file and os.replace: never half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


_WHOLE_ARRAY_HANDLER = None  # created on first use: orbax's handler without replica-parallel saving


def _save_whole_arrays_on_cpu() -> None:
    """Registers orbax's jax.Array handler without replica-parallel saving, on the CPU backend only.

    Once per process unless something registered another handler since: orbax logs a warning for every
    override, which would otherwise reach every training run's stderr.
    """
    global _WHOLE_ARRAY_HANDLER
    if jax.default_backend() != "cpu":
        return
    if _WHOLE_ARRAY_HANDLER is None:
        _WHOLE_ARRAY_HANDLER = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
    if ocp.type_handlers.get_type_handler(jax.Array) is _WHOLE_ARRAY_HANDLER:
        return
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # the override is intended: no warning about it
    try:
        ocp.type_handlers.register_type_handler(jax.Array, _WHOLE_ARRAY_HANDLER, override=True)
    finally:
        absl_logger.setLevel(level)


@dataclasses.dataclass
class _KeepSteps:
    """orbax preservation policy: keep the checkpoints whose step is in `steps` (a live, mutable set)."""

    steps: set

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [info.step in self.steps for info in checkpoints]


class Checkpointer:
    """Periodic (async) saves, keep-last-N, exact resume of state and data iterator."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False):
        """`read_only`: for loading (evaluate, compatibility checks): creates, cleans and saves nothing."""
        self.directory = os.path.abspath(directory)
        if not read_only:
            os.makedirs(os.path.join(self.directory, "data"), exist_ok=True)
            _save_whole_arrays_on_cpu()
        self.protected: set[int] = set()  # steps kept whatever their age (the selected step)
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [ocp.checkpoint_managers.LatestN(n=keep), _KeepSteps(self.protected)]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            create=not read_only,
            enable_async_checkpointing=async_save and not read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def protect(self, steps) -> None:
        """From now on keep exactly `steps` (besides the last `keep`): an unprotected older step is
        removed at the next save."""
        self.protected.clear()
        self.protected.update(int(s) for s in steps)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def _data_path(self, step: int, process: int | None = None) -> str:
        p = jax.process_index() if process is None else process
        return os.path.join(self.directory, "data", f"{step}.p{p}.json")

    def save(self, step: int, state, data_state: dict | None, meta: dict) -> None:
        """Saves `state` (a pytree of jax arrays) at `step`; returns before the write finishes."""
        atomic_write_json(self._data_path(step), data_state)
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        )
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

    def check_shapes(self, step: int, expected_shapes: dict) -> None:
        """Raises IncompatibleCheckpointError when checkpoint `step` holds parameters of other shapes."""
        saved = self.read_meta(step).get("param_shapes", {})
        if saved != expected_shapes:
            diff = sorted(set(saved) ^ set(expected_shapes)) or sorted(
                k for k in saved if saved[k] != expected_shapes.get(k)
            )
            raise IncompatibleCheckpointError(
                f"checkpoint {self.directory}/{step} was written by a model with other shapes "
                f"(first differences: {diff[:3]})",
                hint="use another --workdir, or the run's original config (its config.json)",
            )

    def restore(self, step: int, abstract_state, expected_shapes: dict | None = None):
        """Returns (state, data_state) at `step`; refuses a checkpoint with other parameter shapes."""
        if expected_shapes is not None:
            self.check_shapes(step, expected_shapes)
        try:
            state = self._restore_state(step, abstract_state)
        except ValueError as e:
            # Checkpoints of earlier versions carry a copy of the parameters as `ema_params`
            # even with EMA off; read them with that layout and drop the copy.
            if "do not match" not in str(e) or getattr(abstract_state, "ema_params", None) != {}:
                raise
            state = self._restore_state(step, abstract_state.replace(ema_params=abstract_state.params))
            state = state.replace(ema_params={})
        path = self._data_path(step)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint step {step}: input-pipeline state {path} is missing")
        with open(path) as f:
            data_state = json.load(f)
        return state, data_state

    def _restore_state(self, step: int, abstract_state):
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
            "state"
        ]

    def restore_latest(self, abstract_state, expected_shapes: dict | None = None):
        """(step, state, data_state) of the newest checkpoint that reads back, or (None, None, None).

        An unreadable checkpoint is moved to `unreadable/<step>` with a warning on stderr and the
        previous one is tried; a checkpoint of another model raises IncompatibleCheckpointError.
        """
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(step, abstract_state, expected_shapes)
                return step, state, data_state
            except IncompatibleCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any read failure: fall back to the previous step
                if jax.process_index() == 0:
                    print(
                        f"[warn] checkpoint {self.directory}/{step} is unreadable ({type(e).__name__}: "
                        f"{str(e)[:200]}); moved to {self.directory}/unreadable/{step}, falling back to "
                        f"the previous checkpoint",
                        file=sys.stderr,
                        flush=True,
                    )
                self._set_aside(step)
        return None, None, None

    def _set_aside(self, step: int) -> None:
        """Moves checkpoint `step` out of orbax's sight so the step can be saved again."""
        if jax.process_index() == 0:
            aside = os.path.join(self.directory, "unreadable")
            os.makedirs(aside, exist_ok=True)
            target = os.path.join(aside, str(step))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(os.path.join(self.directory, str(step)), target)
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
