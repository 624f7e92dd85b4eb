"""Helpers shared by the test modules: the smoke config, perturbed parameters, the once-per-run build of
shared folders, and running the `python -m diff_fastener_jax.<command>` mains in a subprocess.

Test modules import them as `from helpers import ...` (pyproject's `[tool.pytest.ini_options]
pythonpath` puts tests/ on the import path); the fixtures themselves live in conftest.py.
"""

import os
import sys

# The repository root: configs/ and the package sources live under it.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE_CONFIG = os.path.join(ROOT, "configs", "demo.py") + ":smoke"

# The smoke model is one U-Net level (compiles in half the time of two). Tests of what only a second
# level has (down- and up-sampling, an image side that must divide by 2) add these overrides.
TWO_LEVELS = {"model.channel_mults": (1, 2), "model.attention_resolutions": (16,), "model.seg_channels": (8, 16)}


def tiny_config(**overrides):
    """configs/demo.py:smoke (32 px, tiny widths) with dotted-key overrides."""
    from diff_fastener_jax.config import apply_overrides, load_config

    config = load_config(SMOKE_CONFIG)
    return apply_overrides(config, overrides)


def perturbed(params, seed: int, scale: float = 0.05):
    """`params` plus `scale` x N(0, 1) noise (numpy, from `seed`), so that zero-initialised output layers
    are not zero.

    Drawn with numpy: with jax.random every distinct leaf shape is its own small XLA compile (about 6 s
    for the smoke model's 85 leaves), and one jitted draw for the whole tree compiles for 28 s.
    """
    import jax
    import numpy as np

    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda x: (np.asarray(x) + scale * rng.standard_normal(x.shape)).astype(x.dtype), params
    )


def shared_once(tmp_path_factory, name: str, build) -> str:
    """`<pytest's temp root>/<name>`, built by `build(path)` once per pytest run, across xdist workers.

    Every pytest-xdist worker is a pytest run of its own, so the suite's `-n 2` would train the smoke
    model twice. Here the first worker to ask builds it under a file lock and the others wait and reuse
    it (all of them share the parent of their temp folders). A build that failed leaves no `.done`
    marker: the next worker to ask starts again from an empty folder. Later calls cost one lock.
    """
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's, shared by its workers
    path, done = base / name, base / f"{name}.done"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            build(str(path))
            done.touch()
    return str(path)


def copy_run(run: str, dst) -> str:
    """A private copy of a run folder (for tests that write into it)."""
    import shutil

    return shutil.copytree(run, str(dst))


def subprocess_env(**extra) -> dict:
    """Environment for a `python -m diff_fastener_jax.<cmd>` subprocess: this checkout first on the
    path, the same 4 simulated devices, the suite's compilation cache."""
    import jax

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

    return subprocess.run(
        [sys.executable, "-m", f"diff_fastener_jax.{command}", *map(str, args)],
        cwd=ROOT,
        env=env or subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
