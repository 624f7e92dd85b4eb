"""The device's limits: datasheet peaks for GPUs, a measured matmul / streaming roofline elsewhere."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense (no sparsity) vendor-datasheet peaks, matched by substring of `device.device_kind`, most
# specific first ("A100" before "A10", "H100 PCIe" before "H100"):
# (substring, bf16 tensor TFLOP/s, tf32 tensor TFLOP/s, fp32 non-tensor TFLOP/s, memory TB/s).
# float32 convs and matmuls run as TF32 on tensor cores under JAX's default precision on GPUs, so
# the float32 fraction of peak is taken against the TF32 rate.
GPU_SPECS: tuple[tuple[str, float, float, float, float], ...] = (
    ("H100 PCIe", 756.0, 378.0, 51.0, 2.0),
    ("H100 NVL", 835.0, 418.0, 60.0, 3.9),
    ("H200", 989.0, 494.7, 67.0, 4.8),
    ("H100", 989.0, 494.7, 67.0, 3.35),  # SXM5
    ("A100", 312.0, 156.0, 19.5, 2.0),  # SXM4 80 GB (40 GB: 1.56 TB/s)
    ("L40S", 362.0, 183.0, 91.6, 0.864),
    ("RTX 4090", 165.2, 82.6, 82.6, 1.008),
    ("A10", 125.0, 62.5, 31.2, 0.6),
)


def measured_matmul_tflops(dtype=jnp.float32, sizes=(1024, 2048), repeats: int = 5) -> float:
    """Best TFLOP/s of square matmuls (fastest of `repeats` calls, best size): this device's practical
    compute roofline. The fastest call, not the median, because a shared host only ever slows it."""
    best = 0.0
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
        f = jax.jit(lambda x: x @ x)
        jax.block_until_ready(f(a))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(f(a))
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n**3 / min(times) / 1e12)
    return best


def measured_bandwidth_gbs(n: int = 1 << 25, repeats: int = 5) -> float:
    """Best GB/s of an in-place `x = 2x + 1` over n float32 (reads and writes 4n bytes each): the
    memory roofline. The buffer is donated so every call reuses it: a fresh 128 MiB output would be
    page-faulted in on each call and measure the allocator (about 5 GB/s here) instead of DRAM."""
    f = jax.jit(lambda v: 2.0 * v + 1.0, donate_argnums=0)
    x = jax.block_until_ready(f(jnp.ones((n,), jnp.float32)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x = jax.block_until_ready(f(x))
        times.append(time.perf_counter() - t0)
    return 8 * n / min(times) / 1e9


def device_limits(device, dtype_name: str) -> dict:
    """{peak_tflops, bandwidth_gbs, peak_source} for ONE device at compute dtype `dtype_name`.

    GPUs: the datasheet row of GPU_SPECS (bf16 tensor rate for bfloat16/float16, TF32 for float32);
    unknown GPUs give NaN. CPUs and anything else: measured matmul and streaming roofline.
    """
    kind = getattr(device, "device_kind", "")
    if device.platform == "gpu":
        for name, bf16, tf32, _fp32, tbs in GPU_SPECS:
            if name in kind:
                peak = tf32 if dtype_name == "float32" else bf16
                what = "TF32" if dtype_name == "float32" else "bf16"
                return {
                    "peak_tflops": peak,
                    "bandwidth_gbs": 1000 * tbs,
                    "peak_source": f"datasheet {name} dense {what}",
                }
        return {
            "peak_tflops": float("nan"),
            "bandwidth_gbs": float("nan"),
            "peak_source": f"unknown GPU {kind!r} (add it to GPU_SPECS)",
        }
    dtype = jnp.float32 if dtype_name == "float32" else jnp.dtype(dtype_name)
    return {
        "peak_tflops": measured_matmul_tflops(dtype),
        "bandwidth_gbs": measured_bandwidth_gbs(),
        "peak_source": f"measured {dtype_name} matmul (1024², 2048²), in-place 2x+1 stream",
    }
