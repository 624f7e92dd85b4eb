"""Shared test fixtures: simulated devices, tiny configs, absl flags for grain workers."""

import os
import sys

# Four simulated CPU devices for the data-parallel paths; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402


def tiny_config(**overrides):
    """configs/demo.py:smoke (32 px, tiny widths) with dotted-key overrides."""
    from diff_fastener_jax.config_utils import apply_overrides, load_config

    config = load_config(os.path.join(ROOT, "configs", "demo.py") + ":smoke")
    return apply_overrides(config, overrides)


@pytest.fixture
def tiny():
    return tiny_config()
