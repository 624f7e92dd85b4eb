"""Per-program XLA compiler options for the hot programs (train step, inference), by backend.

XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK ("__ynn_fusion"). Its filter-gradient
convolution (a 'valid' conv whose window is the whole H x W feature map) is slow there: for a 3x3 conv
at 4x64x64x64 the forward + both backward convolutions took 100-200 ms with YNNPACK fusions switched
off against 410-420 ms with them (interleaved, same process; benchmarks/RESULTS.md). The options are
passed per program (`jax.jit(..., compiler_options=...)`), not through XLA_FLAGS, so nothing changes
for other backends or for other programs in the process, and an XLA that does not know the option
fails only when compiling for the CPU.
"""

from __future__ import annotations

import os

import jax

# Empty = no YNNPACK fusion types: XLA:CPU's own (Eigen) convolutions and dots.
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(backend: str | None = None) -> dict | None:
    """Options for `jax.jit(..., compiler_options=...)` on `backend` (default: JAX's default backend).

    None (XLA's defaults) off the CPU, or when DFJ_XLA_DEFAULTS=1 is set (to compare against).
    """
    if os.environ.get("DFJ_XLA_DEFAULTS") == "1":
        return None
    return dict(CPU_OPTIONS) if (backend or jax.default_backend()) == "cpu" else None
