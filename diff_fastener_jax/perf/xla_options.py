"""Per-program XLA compiler options for the hot programs (train step, inference), by backend.

XLA:CPU in jaxlib 0.10 hands several kinds of fusion to YNNPACK ("__ynn_fusion"), chosen by
`xla_cpu_experimental_ynn_fusion_type`. The two that matter here pull in opposite directions
(docs/performance.md has the measurements):

- **Convolutions: keep them off.** YNNPACK's filter-gradient convolution (a 'valid' conv whose
  window is the whole H x W feature map) runs at about 5 GFLOP/s, 10-15x slower than the forward
  conv; in the demo train step those gradients were 54% of the step's op time. Without them XLA:CPU
  uses its own (Eigen) convolutions: the demo train step ran 1.76x faster, inference 1.24-1.27x.
- **Reductions: keep them on.** XLA:CPU's own lowering of a sum that keeps the minor (channel) axis
  is a strided `reduce-window` loop that streams well under 1 GB/s; YNNPACK's reduction does the same
  sum over (8, 128, 128, 64) in 2 ms instead of 40-65 ms, bitwise repeatable from call to call. Conv
  bias gradients, GroupNorm statistics and the softmax sums are all such reductions: the dense
  reference train step got 11-22% faster (two interleaved A/Bs) when they went back to YNNPACK.

So the CPU option names the reduction type alone. A YNNPACK reduction fusion may take in the
convolution or dot that feeds the reduction (in the train step: the input gradients of the
up-sampling convs with the 2x2 sum after them, and the attention logits with the softmax); in a
one-core trace the largest ran at 68 GFLOP/s, about Eigen's rate. Filter gradients feed no
reduction and stay Eigen's (tests/test_xla_options.py checks that).

The options are passed per program (`jax.jit(..., compiler_options=...)`), not through XLA_FLAGS,
so nothing changes for other backends or for other programs in the process. An XLA that does not
know the reduction type gets the option with no types (all of XLA:CPU's own kernels); one that does
not know the option at all gets none (probed once).

Parameter initialisation is a different kind of program: thousands of small fusions of random bit
generation and `erf_inv`, run once, where XLA:CPU's compile is the whole cost. `init_compiler_options`
asks LLVM for optimisation level 1 there: the two-level smoke config's initialisation compiled in 10 s instead of
26 s at the default level 3, with bit-identical parameters (level 0 changes the last bit of some).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np

# YNNPACK for reductions (with any conv or dot it fuses into one); the filter gradients and the other
# convolutions and dots stay XLA:CPU's own (Eigen).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
# For an XLA that knows the option but not that value: no YNNPACK fusions at all.
CPU_FALLBACK_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def _compiles_with(options: dict) -> bool:
    try:
        jax.jit(lambda x: x.sum(), compiler_options=options).lower(np.zeros(4, np.float32)).compile()
        return True
    except Exception:  # noqa: BLE001 - XLA rejects unknown options and values with assorted errors
        return False


@functools.cache
def _cpu_options() -> dict | None:
    """The first of CPU_OPTIONS, CPU_FALLBACK_OPTIONS that this jaxlib's XLA:CPU accepts (each probed
    by compiling a one-op program), or None."""
    for options in (CPU_OPTIONS, CPU_FALLBACK_OPTIONS):
        if _compiles_with(options):
            return options
    return None


def compiler_options(backend: str | None = None) -> dict | None:
    """Options for `jax.jit(..., compiler_options=...)` on `backend` (default: JAX's default backend).

    None (XLA's defaults) off the CPU, when this XLA knows neither option set, or when
    DFJ_XLA_DEFAULTS=1 is set (to compare against).
    """
    if not _tuning_cpu(backend):
        return None
    options = _cpu_options()
    return None if options is None else dict(options)


# LLVM level 1 for the one-off initialisation programs: same bits as level 3, a third of the compile.
INIT_CPU_OPTIONS = {"xla_backend_optimization_level": 1}


def init_compiler_options(backend: str | None = None) -> dict | None:
    """Options for the jitted parameter / train-state initialisation on `backend`: INIT_CPU_OPTIONS on
    XLA:CPU (unless DFJ_XLA_DEFAULTS=1), None (XLA's defaults) elsewhere."""
    return dict(INIT_CPU_OPTIONS) if _tuning_cpu(backend) else None


def _tuning_cpu(backend: str | None) -> bool:
    """Whether `backend` (default: JAX's) is XLA:CPU and DFJ_XLA_DEFAULTS=1 does not ask for XLA's defaults."""
    return os.environ.get("DFJ_XLA_DEFAULTS") != "1" and (backend or jax.default_backend()) == "cpu"
