"""Shared test fixtures: simulated devices, tiny configs, the session's demo data and smoke run.

`demo_root` (the smoke config's synthetic demo data) and `smoke_run` (ONE 6-step smoke training run on
it, checkpoints at steps 3 and 6) are generated once per test session and shared read-only by the
end-to-end tests; a test that writes into a run copies it first (`copy_run`). Every test that needs
the trained run is end-to-end by definition and is marked `slow` here, so `pytest -m "not slow"`
(the inner loop) never trains.
"""

import os
import sys

# Four simulated CPU devices for the data-parallel paths; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Many tests build the same tiny programs (each train run makes a fresh jitted step); a persistent
# compilation cache shared by the session turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "DFJ_TEST_JAX_CACHE", os.path.join(os.environ.get("TMPDIR", "/tmp"), "dfj_test_jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


SMOKE_CONFIG = os.path.join(ROOT, "configs", "demo.py") + ":smoke"


def pytest_collection_modifyitems(config, items):
    """Tests that need the trained smoke run (directly or through another fixture) are `slow`."""
    for item in items:
        if "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


def tiny_config(**overrides):
    """configs/demo.py:smoke (32 px, tiny widths) with dotted-key overrides."""
    from diff_fastener_jax.config import apply_overrides, load_config

    config = load_config(SMOKE_CONFIG)
    return apply_overrides(config, overrides)


# The smoke model is one U-Net level (compiles in half the time of two). Tests of what only a second
# level has (down- and up-sampling, an image side that must divide by 2) add these overrides.
TWO_LEVELS = {"model.channel_mults": (1, 2), "model.attention_resolutions": (16,), "model.seg_channels": (8, 16)}


def perturbed(params, seed: int, scale: float = 0.05):
    """`params` plus `scale` x N(0, 1) noise (numpy, from `seed`), so that zero-initialised output layers
    are not zero.

    Drawn with numpy: with jax.random every distinct leaf shape was its own small XLA compile (about 6 s
    for the smoke model's 85 leaves), and one jitted draw for the whole tree compiled for 28 s.
    """
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: (np.asarray(x) + scale * rng.standard_normal(x.shape)).astype(x.dtype), params)


@pytest.fixture
def tiny():
    return tiny_config()


def shared_once(tmp_path_factory, name: str, build) -> str:
    """`<session temp>/<name>`, built by `build(path)` once per test session, across pytest-xdist workers.

    Every xdist worker runs its own session-scoped fixtures, so the suite's `-n 2` would train the
    smoke model twice. Here the first worker to ask builds it under a file lock and the others wait
    and reuse it (all of them share the parent of their temp folders). A build that failed leaves no
    `.done` marker: the next worker to ask starts again from an empty folder.
    """
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's, shared by its workers
    path, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(str(path))
            done.touch()
    return str(path)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """The smoke config's demo dataset, generated once for the whole session (treat as read-only)."""
    from diff_fastener_jax.data.demo import ensure_demo_data

    return shared_once(tmp_path_factory, "demo_data", lambda path: ensure_demo_data(tiny_config().data, path))


@pytest.fixture(scope="session")
def smoke_run(demo_root, tmp_path_factory):
    """ONE trained smoke run (6 steps, checkpoints 3 and 6) shared by the end-to-end tests of every
    worker (read-only)."""
    from diff_fastener_jax.training.loop import train_and_evaluate

    return shared_once(tmp_path_factory, "smoke_run",
                       lambda path: train_and_evaluate(tiny_config(**{"data.root": demo_root}), path, quiet=True))


def copy_run(run: str, dst) -> str:
    """A private copy of a run folder (for tests that write into it)."""
    import shutil

    return shutil.copytree(run, str(dst))


def subprocess_env(**extra) -> dict:
    """Environment for a `python -m diff_fastener_jax.<cmd>` subprocess: this checkout first on the
    path, the same 4 simulated devices, the session's compilation cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.pop("DFJ_VERBOSE", None)
    env.update(extra)
    return env


def run_cli(command: str, *args, env=None, timeout: float = 600):
    """Runs `python -m diff_fastener_jax.<command> args...`; returns the CompletedProcess (text)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", f"diff_fastener_jax.{command}", *map(str, args)],
                          cwd=ROOT, env=env or subprocess_env(), capture_output=True, text=True, timeout=timeout)


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

