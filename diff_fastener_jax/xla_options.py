"""Per-program XLA compiler options for the hot programs (train step, inference), by backend.

XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK ("__ynn_fusion"). Its filter-gradient
convolution (a 'valid' conv whose window is the whole H x W feature map) runs at about 5 GFLOP/s
there, 10-15x slower than the forward conv: in the demo train step those gradients were 54% of the
step's op time (per-op trace, benchmarks/RESULTS.md). With YNNPACK's fusions switched off XLA:CPU
uses its own (Eigen) convolutions: the demo train step ran 1.76x faster and inference 1.24-1.27x
(interleaved A/B in one process). The options are passed per program (`jax.jit(...,
compiler_options=...)`), not through XLA_FLAGS, so nothing changes for other backends or for other
programs in the process. An XLA that does not know the option gets none (probed once).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

# Empty = no YNNPACK fusion types: XLA:CPU's own (Eigen) convolutions and dots.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.cache
def _cpu_options_supported() -> bool:
    """Whether this jaxlib's XLA:CPU accepts CPU_OPTIONS (compiles a one-op program once)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_OPTIONS).lower(np.float32(0)).compile()
        return True
    except Exception:  # noqa: BLE001 - an unknown option: keep XLA's defaults
        return False


def compiler_options(backend: str | None = None) -> dict | None:
    """Options for `jax.jit(..., compiler_options=...)` on `backend` (default: JAX's default backend).

    None (XLA's defaults) off the CPU, when this XLA does not know the options, or when
    DFJ_XLA_DEFAULTS=1 is set (to compare against).
    """
    if os.environ.get("DFJ_XLA_DEFAULTS") == "1":
        return None
    if (backend or jax.default_backend()) != "cpu" or not _cpu_options_supported():
        return None
    return dict(CPU_OPTIONS)
