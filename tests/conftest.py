"""Shared test fixtures: simulated devices, tiny configs, absl flags for grain workers."""

import os
import sys

# Four simulated CPU devices for the data-parallel paths; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests build the same tiny programs (each train run makes a fresh jitted step); a persistent
# compilation cache shared by the session turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "DFJ_TEST_JAX_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "dfj_test_jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def tiny_config(**overrides):
    """configs/demo.py:smoke (32 px, tiny widths) with dotted-key overrides."""
    from diff_fastener_jax.config import apply_overrides, load_config

    config = load_config(os.path.join(ROOT, "configs", "demo.py") + ":smoke")
    return apply_overrides(config, overrides)


@pytest.fixture
def tiny():
    return tiny_config()


def assert_same_training_result(params_a, params_b, lr: float, steps: int):
    """Params from two runs that differ only in float summation order (device count, process count).

    Adam's first steps move each weight by about lr * sign(grad), so a weight whose gradient is at the
    1e-8 level (Adam's epsilon) can move by a different fraction of lr when the summation order changes.
    Nearly every weight must agree to float32 tolerance; none may differ by more than the steps allow.
    """
    import jax
    import numpy as np

    a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(jax.device_get(params_a))])
    b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(jax.device_get(params_b))])
    assert a.shape == b.shape
    diff = np.abs(a - b)
    close = diff <= 1e-6 + 1e-4 * np.abs(b)
    assert close.mean() > 0.999, f"only {close.mean():.5f} of the weights agree"
    assert diff.max() <= 2 * lr * steps + 1e-6, diff.max()
