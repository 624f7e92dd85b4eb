"""The data-parallel train step."""

import jax
import numpy as np
import pytest
from helpers import assert_same_training_result, tiny_config

from diff_fastener_jax import parallel
from diff_fastener_jax.training.train_step import create_train_state, make_train_step


def _batch(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    mask = np.zeros((n, size, size, 1), np.float32)
    mask[1::2, 8:20, 10:24] = 1.0  # odd rows are the synthetic half
    return {"image": image, "mask": mask, "is_synthetic": np.tile([0.0, 1.0], n // 2).astype(np.float32)}


# The tests below share compiled train steps where their point allows (a cold compile of the smoke
# model's step takes 15-25 s on the 2-core CI machine; a repeat is a persistent-cache hit):
# (1 device, 8 rows), (4 devices, 2 rows each), and (1 device, 4 rows) at the fast learning rate.
FAST_LR = {"optim.lr_recon": 2e-3, "optim.lr_seg": 2e-3}


def _run_steps(config, mesh, batch, n_steps, seed=0):
    state = parallel.replicate(create_train_state(config, jax.random.key(seed)), mesh)
    step = make_train_step(config, mesh)
    key = jax.random.key(42)
    sharded = parallel.shard_batch(batch, mesh)
    metrics = []
    for _ in range(n_steps):
        state, m = step(state, sharded, key)
        metrics.append(jax.device_get(m))
    return state, metrics, step


def test_train_step_draws_timesteps_from_the_configured_window(monkeypatch):
    from diff_fastener_jax.training import train_step as TS

    seen = []
    real = TS.example_noise

    def recording(keys, shape, small, big):
        seen.append((small, big))
        return real(keys, shape, small, big)

    monkeypatch.setattr(TS, "example_noise", recording)
    mesh = parallel.make_mesh(jax.devices()[:1])
    config = tiny_config(**{"diffusion.train_t_window": 20})
    state = jax.eval_shape(lambda: create_train_state(config, jax.random.key(0)))  # shapes: nothing runs
    make_train_step(config, mesh).lower(state, parallel.shard_batch(_batch(2), mesh), jax.random.key(1))  # trace only
    assert seen == [((180, 221), (380, 421))]  # eval steps 200 / 400, each +- 20


def test_one_device_equals_four_devices():
    assert len(jax.devices()) >= 4, "needs XLA_FLAGS=--xla_force_host_platform_device_count=4"
    config = tiny_config()
    config.train.batch_size = 8
    batch = _batch(8)
    s1, m1, _ = _run_steps(config, parallel.make_mesh(jax.devices()[:1]), batch, 2)
    s4, m4, _ = _run_steps(config, parallel.make_mesh(jax.devices()[:4]), batch, 2)
    for key in ("total", "noise", "focal", "smoothl1", "grad_norm"):
        np.testing.assert_allclose(m1[-1][key], m4[-1][key], rtol=1e-4, err_msg=key)
    assert_same_training_result(s1.params, s4.params, config.optim.lr_recon, 2)
    assert int(s4.step) == 2


def test_step_compiles_once_and_reports_metrics():
    config = tiny_config(**{"train.batch_size": 8})
    _, metrics, step = _run_steps(config, parallel.make_mesh(jax.devices()[:4]), _batch(8), 3)
    assert step._cache_size() == 1  # no retracing across steps
    for key in ("total", "noise", "focal", "smoothl1", "grad_norm", "lr_recon", "lr_seg"):
        assert np.isfinite(metrics[-1][key]), key
    assert metrics[-1]["finite"] == 1.0
    # total = noise + 5 focal + smoothl1 with the default weights
    m = metrics[-1]
    np.testing.assert_allclose(m["total"], m["noise"] + 5 * m["focal"] + m["smoothl1"], rtol=1e-5)


def test_loss_falls_on_fixed_batch():
    config = tiny_config(**FAST_LR)
    # 50 steps: the mean total loss of the last 10 falls to about 1/2.4 of the first 5 (1/3.3 after
    # 80 steps, 1/3.7 after 300), so requiring 1/2 leaves room without a long
    # loop (each step is about 0.25 s of the suite's time).
    _, metrics, _ = _run_steps(config, parallel.make_mesh(jax.devices()[:1]), _batch(4), 50)
    first = np.mean([m["total"] for m in metrics[:5]])
    last = np.mean([m["total"] for m in metrics[-10:]])
    assert last < first / 2.0, (first, last)


def test_non_finite_loss_skips_update():
    config = tiny_config(**FAST_LR)
    batch = _batch(4)
    batch["image"][0, 0, 0, 0] = np.nan
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = parallel.replicate(create_train_state(config, jax.random.key(0)), mesh)
    before = jax.tree_util.tree_map(np.asarray, state.params)
    new_state, m = make_train_step(config, mesh)(state, parallel.shard_batch(batch, mesh), jax.random.key(1))
    assert float(m["finite"]) == 0.0
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(new_state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_batch_not_divisible_by_devices_is_refused():
    with pytest.raises(ValueError, match="train.batch_size=6"):
        parallel.check_global_batch(6, parallel.make_mesh(jax.devices()[:4]))


def test_microbatches_give_the_whole_batch_update():
    """train.microbatch=2 on 2 devices accumulates 2 microbatches of 2 rows per device: the same losses,
    gradient norm and parameters as the whole batch on one device at once."""
    config = tiny_config()
    config.train.batch_size = 8
    batch = _batch(8)
    one = parallel.make_mesh(jax.devices()[:1])
    whole, m_whole, whole_step = _run_steps(config, one, batch, 2)
    config.train.microbatch = 2
    two = parallel.make_mesh(jax.devices()[:2])
    micro, m_micro, micro_step = _run_steps(config, two, batch, 2)

    def loops(step, state, mesh):  # while loops in the lowered program
        return (
            step.lower(state, parallel.shard_batch(batch, mesh), jax.random.key(42)).as_text().count("stablehlo.while")
        )

    # The accumulation loop is there: equal results alone would not show it (the step without
    # microbatches has loops of its own).
    assert loops(micro_step, micro, two) == loops(whole_step, whole, one) + 1
    for key in ("total", "noise", "focal", "smoothl1", "grad_norm"):
        np.testing.assert_allclose(m_micro[-1][key], m_whole[-1][key], rtol=1e-4, err_msg=key)
    assert_same_training_result(whole.params, micro.params, config.optim.lr_recon, 2)


def test_microbatch_must_split_each_devices_rows_evenly():
    from diff_fastener_jax.config import validate_config
    from diff_fastener_jax.errors import UserError

    for bad in (3, 6, -2):  # odd; not a divisor of 4 rows per device; negative
        with pytest.raises(UserError, match="train.microbatch"):
            validate_config(tiny_config(**{"train.batch_size": 8, "train.microbatch": bad}), num_devices=2)
    validate_config(tiny_config(**{"train.batch_size": 8, "train.microbatch": 2}), num_devices=2)


def test_demo_recipe_trains_from_the_pipeline(demo_root):
    """configs/demo.py's synthesis and loss (cut-paste + anomaly-oriented noise + timestep window) end to
    end: pipeline batches carry the clean rows the loss needs, and two steps on 4 devices give finite losses."""
    from diff_fastener_jax.data import pipeline

    config = tiny_config(
        **{
            "data.root": demo_root,
            "data.cutpaste_prob": 0.5,
            "loss.anomaly_oriented_noise": True,
            "diffusion.train_t_window": 50,
        }
    )
    mesh = parallel.make_mesh()
    it = pipeline.make_train_iterator(config, seed=0)
    state = parallel.replicate(create_train_state(config, jax.random.key(0)), mesh)
    step = make_train_step(config, mesh)
    for _ in range(2):
        batch = next(it)
        assert "clean" in batch
        state, m = step(state, parallel.shard_batch(batch, mesh), jax.random.key(1))
        assert float(m["finite"]) == 1.0 and np.isfinite(float(m["noise"])) and float(m["noise"]) > 0
    it.close()
