"""checkpoint.py: an unreadable latest checkpoint falls back to the previous one with a warning."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import SMOKE_CONFIG

from diff_fastener_jax.config import load_config
from diff_fastener_jax.training.checkpoint import (
    Checkpointer,
    IncompatibleCheckpointError,
    param_shapes,
)
from diff_fastener_jax.training.train_step import create_train_state


def _state(v: float):
    return {"params": {"w": jnp.full((3, 2), v, jnp.float32)}, "step": jnp.asarray(int(v), jnp.int32)}


def _save_steps(directory, steps):
    ckpt = Checkpointer(directory, async_save=False)
    for s in steps:
        ckpt.save(s, _state(float(s)), {"pos": s}, {"param_shapes": param_shapes(_state(0.0)["params"])})
    ckpt.close()


def _damage(step_dir):
    """Truncates every file of the state item: the folder looks complete, its bytes are not."""
    for folder, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            with open(os.path.join(folder, name), "r+b") as f:
                f.truncate(0)


def test_unreadable_latest_checkpoint_falls_back_with_a_warning(tmp_path, capsys):
    directory = str(tmp_path / "checkpoints")
    _save_steps(directory, [1, 2])
    _damage(os.path.join(directory, "2"))
    abstract = jax.eval_shape(lambda: _state(0.0))
    ckpt = Checkpointer(directory, async_save=False)
    step, state, data_state = ckpt.restore_latest(abstract, expected_shapes=param_shapes(abstract["params"]))
    assert step == 1 and data_state == {"pos": 1}
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.full((3, 2), 1.0, np.float32))
    err = capsys.readouterr().err
    assert "[warn] checkpoint" in err and f"{directory}/2 is unreadable" in err
    # Set aside, so step 2 can be written again by the resumed run.
    assert ckpt.all_steps() == [1] and os.path.isdir(os.path.join(directory, "unreadable", "2"))
    ckpt.save(2, _state(2.0), {"pos": 2}, {"param_shapes": param_shapes(abstract["params"])})
    ckpt.close()
    assert sorted(Checkpointer(directory).all_steps()) == [1, 2]


def test_missing_pipeline_state_also_falls_back(tmp_path, capsys):
    directory = str(tmp_path / "checkpoints")
    _save_steps(directory, [1, 2])
    os.remove(os.path.join(directory, "data", "2.p0.json"))
    abstract = jax.eval_shape(lambda: _state(0.0))
    step, _, _ = Checkpointer(directory, async_save=False).restore_latest(abstract)
    assert step == 1 and "input-pipeline state" in capsys.readouterr().err


def test_no_checkpoint_and_incompatible_checkpoint(tmp_path):
    directory = str(tmp_path / "checkpoints")
    abstract = jax.eval_shape(lambda: _state(0.0))
    assert Checkpointer(directory).restore_latest(abstract) == (None, None, None)
    _save_steps(directory, [1])
    with pytest.raises(IncompatibleCheckpointError, match="other shapes") as err:
        Checkpointer(directory).restore_latest(abstract, expected_shapes={"w": [4, 2]})
    assert "--workdir" in err.value.hint
    assert Checkpointer(directory).all_steps() == [1]  # an incompatible checkpoint is not set aside


def test_read_only_checkpointer_creates_nothing(tmp_path):
    directory = tmp_path / "checkpoints"
    Checkpointer(str(directory), read_only=True).close()
    assert not directory.exists()


def test_ema_off_carries_no_copy_and_reads_checkpoints_that_did(tmp_path):
    """With EMA off the state holds no second copy of the parameters (the paper config's 0.56 GiB),
    and a checkpoint of the earlier layout (a copy saved as ema_params) still restores."""
    config = load_config(SMOKE_CONFIG)
    assert config.optim.ema_decay == 0
    state = create_train_state(config, jax.random.key(0))
    assert state.ema_params == {} and state.inference_params is state.params

    old_layout = state.replace(ema_params=jax.tree_util.tree_map(jnp.copy, state.params))
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(3, old_layout, {"pos": 3}, {"param_shapes": param_shapes(state.params)})
    ckpt.close()
    abstract = jax.eval_shape(lambda: state)
    step, restored, _ = Checkpointer(directory, read_only=True).restore_latest(
        abstract, expected_shapes=param_shapes(state.params)
    )
    assert step == 3 and restored.ema_params == {}
    for a, b in zip(jax.tree_util.tree_leaves(restored.params), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    config.optim.ema_decay = 0.99
    with_ema = create_train_state(config, jax.random.key(0))
    assert jax.tree_util.tree_structure(with_ema.ema_params) == jax.tree_util.tree_structure(with_ema.params)


def _slice_compiles_while_saving(directory, tree, *, replica_parallel: bool | None) -> int:
    """How many `slice` programs XLA compiles while a Checkpointer saves `tree` (replica_parallel=None:
    the handler the Checkpointer registers; True/False: orbax's handler with that setting)."""
    import logging

    import orbax.checkpoint as ocp

    compiled = []

    class Recorder(logging.Handler):
        def emit(self, record):
            message = record.getMessage()
            if message.startswith("Compiling") and "slice" in message.split(" with ", 1)[0]:
                compiled.append(message)

    ckpt = Checkpointer(directory, async_save=False)
    if replica_parallel is not None:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=replica_parallel), override=True
        )
    recorder, logger = Recorder(), logging.getLogger("jax")
    logger.addHandler(recorder)
    try:
        with jax.log_compiles(True):
            ckpt.save(1, tree, {}, {})
            ckpt.manager.wait_until_finished()
    finally:
        logger.removeHandler(recorder)
        ckpt.close()
    return len(compiled)


def test_replicated_save_on_cpu_compiles_no_per_device_slices(tmp_path):
    """On CPU the Checkpointer saves each replicated array whole. Orbax's default splits it into one
    slice per device, each slice shape a freshly compiled program (131 of them, 20 s of a smoke run)."""
    from diff_fastener_jax import parallel

    assert len(jax.devices()) >= 4, "needs XLA_FLAGS=--xla_force_host_platform_device_count=4"
    mesh = parallel.make_mesh(jax.devices()[:4])
    # Shapes no other test uses (a slice compiled earlier in this process would not be compiled again),
    # with leading axes that split evenly over 4 replicas.
    tree = parallel.replicate({"a": np.ones((8, 13), np.float32), "b": np.ones((12, 3, 7), np.float32)}, mesh)
    try:
        assert _slice_compiles_while_saving(str(tmp_path / "whole"), tree, replica_parallel=None) == 0
        # The counter sees them when orbax does slice: this test can fail.
        assert _slice_compiles_while_saving(str(tmp_path / "sliced"), tree, replica_parallel=True) > 0
    finally:
        Checkpointer(str(tmp_path / "restore_handler"), async_save=False).close()  # registers the CPU handler again
