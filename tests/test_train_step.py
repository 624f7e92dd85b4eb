"""The data-parallel train step and the jitted inference function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_same_training_result, tiny_config

from diff_fastener_jax import parallel
from diff_fastener_jax.train_step import (
    create_train_state,
    make_infer_fn,
    make_train_step,
    top_k_count,
)


def _batch(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
    mask = np.zeros((n, size, size, 1), np.float32)
    mask[1::2, 8:20, 10:24] = 1.0  # odd rows are the synthetic half
    return {"image": image, "mask": mask, "is_synthetic": np.tile([0.0, 1.0], n // 2).astype(np.float32)}


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
    config = tiny_config()
    _, metrics, step = _run_steps(config, parallel.make_mesh(jax.devices()[:2]), _batch(4), 3)
    assert step._cache_size() == 1  # no retracing across steps
    for key in ("total", "noise", "focal", "smoothl1", "grad_norm", "lr_recon", "lr_seg"):
        assert np.isfinite(metrics[-1][key]), key
    assert metrics[-1]["finite"] == 1.0
    # total = noise + 5 focal + smoothl1 with the default weights
    m = metrics[-1]
    np.testing.assert_allclose(m["total"], m["noise"] + 5 * m["focal"] + m["smoothl1"], rtol=1e-5)


@pytest.mark.slow  # a 300-step training loop: end to end
def test_loss_falls_on_fixed_batch():
    config = tiny_config(**{"optim.lr_recon": 2e-3, "optim.lr_seg": 2e-3})
    _, metrics, _ = _run_steps(config, parallel.make_mesh(jax.devices()[:1]), _batch(4), 300)
    first = np.mean([m["total"] for m in metrics[:5]])
    last = np.mean([m["total"] for m in metrics[-20:]])
    assert last < first / 5, (first, last)


def test_non_finite_loss_skips_update():
    config = tiny_config()
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


def _trained_params(config):
    state = create_train_state(config, jax.random.key(0))
    # Perturb so the networks produce non-trivial outputs.
    leaves, tree = jax.tree_util.tree_flatten(state.params)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    leaves = [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, leaves)


def test_infer_deterministic_and_top_k_matches_numpy():
    config = tiny_config()
    params = _trained_params(config)
    infer = make_infer_fn(config)
    images = jnp.asarray(_batch(6)["image"])
    idx = jnp.arange(6)
    r1, a1, s1 = infer(params, images, jax.random.key(7), idx)
    r2, a2, s2 = infer(params, images, jax.random.key(7), idx)
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
    assert r1.shape == (6, 32, 32, 3) and a1.shape == (6, 32, 32) and s1.shape == (6,)
    assert float(jnp.min(r1)) >= -1 and float(jnp.max(r1)) <= 1
    k = top_k_count(config, 32, 32)
    assert k == max(1, round(50 * 32 * 32 / 65536))
    flat = np.asarray(a1, np.float64).reshape(6, -1)
    ref = np.sort(flat, axis=1)[:, -k:].mean(axis=1)
    np.testing.assert_allclose(np.asarray(s1), ref, rtol=1e-6)
    # An image's score does not depend on its batch-mates (noise is keyed by the index).
    _, _, s_single = infer(params, images[2:3], jax.random.key(7), idx[2:3])
    np.testing.assert_allclose(np.asarray(s_single)[0], np.asarray(s1)[2], rtol=1e-5)


def test_infer_recon_error_map_and_sharded():
    config = tiny_config(**{"infer.map": "recon_error"})
    params = _trained_params(config)
    infer = make_infer_fn(config)
    images = _batch(8)["image"]
    recon, amap, score = infer(params, jnp.asarray(images), jax.random.key(0), jnp.arange(8))
    np.testing.assert_allclose(np.asarray(amap), np.abs(images - np.asarray(recon)).mean(-1) / 2, atol=1e-6)
    mesh = parallel.make_mesh(jax.devices()[:4])
    sh = parallel.data_sharding(mesh)
    _, _, score4 = infer(params, jax.device_put(jnp.asarray(images), sh), jax.random.key(0),
                         jax.device_put(jnp.arange(8), sh))
    np.testing.assert_allclose(np.asarray(score4), np.asarray(score), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["one_step", "ddim", "ddpm"])
def test_infer_ablation_methods(method):
    config = tiny_config(**{"infer.method": method, "infer.ddim_steps": 3, "diffusion.eval_t_small": 10,
                            "diffusion.eval_t_big": 20})
    params = _trained_params(config)
    infer = make_infer_fn(config)
    images = jnp.asarray(_batch(2)["image"])
    r1, a1, s1 = infer(params, images, jax.random.key(0), jnp.arange(2))
    r2, _, s2 = infer(params, images, jax.random.key(0), jnp.arange(2))
    assert r1.shape == images.shape and a1.shape == (2, 32, 32)
    np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
    assert float(jnp.max(jnp.abs(r1))) <= 1.0


def test_unknown_infer_method_is_refused():
    with pytest.raises(ValueError, match="infer.method"):
        make_infer_fn(tiny_config(**{"infer.method": "magic"}))
