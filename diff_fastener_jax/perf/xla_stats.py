"""Timing a compiled program and reading XLA's own numbers for it (FLOPs, bytes, planned memory)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def blocked_seconds(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), wall seconds until its result is ready): one call, compile included if it compiles."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn()` over `repeats` calls after `warmup` calls; each call is blocked on."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compiled_cost(compiled, partitions: int = 1) -> tuple[float, float]:
    """(FLOPs, bytes accessed) of a compiled program, summed over its `partitions` devices.

    XLA reports the cost of ONE partition of an SPMD program, hence the factor. NaN where the
    backend reports nothing.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per device
        cost = cost[0] if cost else None
    cost = cost or {}
    flops = float(cost.get("flops", float("nan")))
    nbytes = float(cost.get("bytes accessed", float("nan")))
    return flops * partitions, nbytes * partitions


def compiled_memory_bytes(compiled) -> int | None:
    """XLA's planned peak memory of one partition (arguments + outputs + temporaries), if reported."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if m is None:
        return None
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    # `peak_memory_in_bytes` leaves the temporaries out on XLA:CPU; take whichever is larger.
    return int(max(total, getattr(m, "peak_memory_in_bytes", 0) or 0))


def peak_memory_bytes(device) -> int | None:
    """The runtime's high-water mark of device memory for this process (GPU/TPU); None on CPU."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None
