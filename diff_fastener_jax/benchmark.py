r"""Speed and memory of the jitted inference and train step, against the hardware's limit.

  python -m diff_fastener_jax.benchmark --config configs/default.py --batch-sizes 1,8,32 \
      --dtype bfloat16 --out benchmarks/h100_bf16.json

Inference = the whole one-step norm-guided pipeline (two U-Net passes fused into one batched call,
segmentation net, top-K score) as one XLA program; training = the whole data-parallel train step
(forward, losses, backward, Adam). Timings: compile first (timed separately), one warm-up call, then
the median of `--repeats` calls, each ended by `block_until_ready`. FLOPs and bytes come from XLA's
cost analysis of the compiled program (per device for a sharded program, so they are multiplied by the
device count). Achieved TFLOP/s over the device's peak (a datasheet table for GPUs, a measured matmul
roofline on CPUs) is the fraction of peak. `--profile` adds per-component timings: one U-Net pass,
the segmentation net, and every top-level block of both networks compiled and timed on its own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diff_fastener_jax import parallel
from diff_fastener_jax.config import apply_overrides, load_config, parse_set_overrides
from diff_fastener_jax.inference import make_infer_fn
from diff_fastener_jax.models import build_models, count_params, init_params
from diff_fastener_jax.train_step import create_train_state, make_train_step

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

REQUIRED_KEYS = ("device", "dtype", "image_size", "infer", "train", "gflops_per_image_infer",
                 "achieved_tflops", "fraction_of_peak", "compile_s", "params_recon", "params_seg")


# ----------------------------------------------------------------------------- timing and XLA costs

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


# ----------------------------------------------------------------------------- the device's limits

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
                return {"peak_tflops": peak, "bandwidth_gbs": 1000 * tbs,
                        "peak_source": f"datasheet {name} dense {what}"}
        return {"peak_tflops": float("nan"), "bandwidth_gbs": float("nan"),
                "peak_source": f"unknown GPU {kind!r} (add it to GPU_SPECS)"}
    dtype = jnp.float32 if dtype_name == "float32" else jnp.dtype(dtype_name)
    return {"peak_tflops": measured_matmul_tflops(dtype), "bandwidth_gbs": measured_bandwidth_gbs(),
            "peak_source": f"measured {dtype_name} matmul (1024², 2048²), in-place 2x+1 stream"}


# ----------------------------------------------------------------------------- the two programs

def _put(x, sharding):
    return jax.device_put(x, sharding) if sharding is not None else x


def bench_infer(config, params, batch: int, repeats: int, mesh=None) -> tuple[dict, float]:
    """One inference row at `batch` images (data-parallel over `mesh` when given) and its compile seconds."""
    size, c = config.data.image_size, config.model.in_channels
    partitions = 1 if mesh is None else mesh.devices.size
    images = jax.random.uniform(jax.random.key(2), (batch, size, size, c), minval=-1.0, maxval=1.0)
    if mesh is not None:
        params = _put(params, parallel.replicated(mesh))
        images = _put(images, parallel.data_sharding(mesh))
    infer = make_infer_fn(config)
    t0 = time.perf_counter()
    compiled = infer.lower(params, images).compile()
    compile_s = time.perf_counter() - t0
    flops, nbytes = compiled_cost(compiled, partitions)
    sec = median_seconds(lambda: compiled(params, images), repeats)
    row = {"batch": batch, "devices": partitions, "images_per_s": batch / sec, "ms_per_image": 1000 * sec / batch,
           "gflops_per_image": flops / batch / 1e9, "gbytes_per_image": nbytes / batch / 1e9,
           "tflops": flops / sec / 1e12, "xla_peak_memory_bytes": compiled_memory_bytes(compiled)}
    return row, compile_s


def synthetic_train_batch(batch: int, size: int, channels: int, seed: int = 0) -> dict:
    """A host batch shaped like the data pipeline's: alternating normal / synthetic rows, sparse masks."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (batch, size, size, channels)).astype(np.float32)
    return {"image": image, "clean": image.copy(),
            "mask": (rng.uniform(size=(batch, size, size, 1)) > 0.9).astype(np.float32),
            "is_synthetic": np.tile([0.0, 1.0], (batch + 1) // 2)[:batch].astype(np.float32)}


def bench_train(config, batch: int, repeats: int) -> tuple[dict, float]:
    """The full train step at global `batch` (over every device when it divides, else one) and its compile s."""
    devices = jax.devices()
    used = devices if batch % len(devices) == 0 else devices[:1]
    mesh = parallel.make_mesh(used)
    config = config.copy_and_resolve_references()
    config.train.batch_size = batch
    step = make_train_step(config, mesh)
    state = parallel.replicate(create_train_state(config, jax.random.key(0)), mesh)
    host = synthetic_train_batch(batch, config.data.image_size, config.model.in_channels)
    data = parallel.shard_batch(host, mesh)
    key = jax.random.key(3)
    t0 = time.perf_counter()
    compiled = step.lower(state, data, key).compile()
    compile_s = time.perf_counter() - t0
    flops, nbytes = compiled_cost(compiled, len(used))
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], data, key)  # old state is donated
        return holder["state"], metrics

    sec = median_seconds(one, repeats)
    row = {"batch": batch, "devices": len(used), "images_per_s": batch / sec, "ms_per_image": 1000 * sec / batch,
           "gflops_per_image": flops / batch / 1e9, "gbytes_per_image": nbytes / batch / 1e9,
           "tflops": flops / sec / 1e12, "xla_peak_memory_bytes": compiled_memory_bytes(compiled)}
    return row, compile_s


# ----------------------------------------------------------------------------- per-component profile

def _spec(a):
    return jax.ShapeDtypeStruct(a.shape, a.dtype) if hasattr(a, "shape") and hasattr(a, "dtype") else a


def top_level_calls(module: nn.Module, params, *args, **kwargs) -> list[tuple[str, nn.Module, tuple, dict]]:
    """Every direct submodule call of `module.apply({'params': params}, *args)` (abstractly traced, so
    arrays or `jax.ShapeDtypeStruct`s both do):
    (name, unbound copy of the submodule, argument specs, keyword arguments).

    A container whose layers belong to `module` itself (an `nn.Sequential` built from modules created
    in the parent) owns no parameters; its inner calls are listed instead of it.
    """
    calls, open_calls = [], []

    def interceptor(next_fun, a, kw, context):
        m = context.module
        if not (context.method_name == "__call__" and m.scope is not None and len(m.scope.path) == 1):
            return next_fun(*a, **kw)
        entry = {"call": (m.name, m.clone(parent=None, name=None), jax.tree_util.tree_map(_spec, a), dict(kw)),
                 "nested": False}
        if open_calls:
            open_calls[-1]["nested"] = True
        open_calls.append(entry)
        position = len(calls)
        out = next_fun(*a, **kw)
        open_calls.pop()
        if not entry["nested"]:
            calls.insert(position, entry["call"])
        return out

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda p, *a: module.apply({"params": p}, *a, **kwargs), params, *args)
    return calls


def time_program(fn: Callable, args: tuple, repeats: int) -> dict:
    """ms, GFLOP, GB accessed and FLOP/byte of `jax.jit(fn)(*args)` on the default device."""
    compiled = jax.jit(fn).lower(*args).compile()
    flops, nbytes = compiled_cost(compiled)
    sec = median_seconds(lambda: compiled(*args), repeats)
    return {"ms": 1000 * sec, "gflops": flops / 1e9, "gbytes": nbytes / 1e9,
            "flop_per_byte": flops / nbytes if nbytes else float("nan"), "tflops": flops / sec / 1e12}


def profile_blocks(module: nn.Module, params, args: tuple, repeats: int) -> list[dict]:
    """Times every top-level block of `module` on its own, with the shapes it sees in the full forward."""
    rows = []
    for name, sub, specs, kw in top_level_calls(module, params, *args):
        arrays = [i for i, s in enumerate(specs) if isinstance(s, jax.ShapeDtypeStruct)]
        inputs = tuple(jax.random.normal(jax.random.key(i), specs[i].shape).astype(specs[i].dtype)
                       if jnp.issubdtype(specs[i].dtype, jnp.floating) else jnp.zeros(specs[i].shape, specs[i].dtype)
                       for i in arrays)

        def call(p, *xs, sub=sub, specs=specs, kw=kw, arrays=arrays):
            full = list(specs)
            for i, x in zip(arrays, xs):
                full[i] = x
            return sub.apply({"params": p}, *full, **kw)

        row = time_program(call, (params.get(name, {}), *inputs), repeats)
        shape = specs[0].shape if arrays else ()
        rows.append({"block": name, "type": type(sub).__name__, "input": list(shape), **row})
    return rows


def profile_components(config, params, batch: int, repeats: int) -> dict:
    """Where the inference time goes at `batch` images: the whole program, one fused U-Net pass on the
    2*batch noised images, the segmentation net, and every top-level block of both networks."""
    recon, seg = build_models(config)
    size, c = config.data.image_size, config.model.in_channels
    x2 = jax.random.uniform(jax.random.key(4), (2 * batch, size, size, c), minval=-1.0, maxval=1.0)
    t2 = jnp.concatenate([jnp.full((batch,), config.diffusion.eval_t_small, jnp.int32),
                          jnp.full((batch,), config.diffusion.eval_t_big, jnp.int32)])
    xs = jax.random.uniform(jax.random.key(5), (batch, size, size, 2 * c), minval=-1.0, maxval=1.0)
    infer = make_infer_fn(config)
    images = x2[:batch]
    out = {"batch": batch}
    out["infer"] = time_program(infer, (params, images), repeats)
    out["recon_unet_2b"] = time_program(lambda p, x, t: recon.apply({"params": p}, x, t), (params["recon"], x2, t2),
                                        repeats)
    out["seg_unet"] = time_program(lambda p, x: seg.apply({"params": p}, x), (params["seg"], xs), repeats)
    out["recon_blocks"] = profile_blocks(recon, params["recon"], (x2, t2), repeats)
    out["seg_blocks"] = profile_blocks(seg, params["seg"], (xs,), repeats)
    return out


# ----------------------------------------------------------------------------- the whole benchmark

def run_benchmark(config, batch_sizes, train_batch: int | None, repeats: int = 5,
                  profile_batch: int | None = None) -> dict:
    """Measures inference per batch size and one training configuration; returns the JSON record."""
    devices = jax.devices()
    device = devices[0]
    n_dev = len(devices)
    params = init_params(config, jax.random.key(0))  # float32 whatever the compute dtype
    limits = device_limits(device, config.model.dtype)
    # A CPU's simulated devices share the cores the roofline was measured on; GPUs add up.
    scale = (lambda k: k) if device.platform == "gpu" else (lambda k: 1)  # noqa: E731
    result = {
        "date": datetime.date.today().isoformat(),
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')} x{n_dev}",
        "dtype": config.model.dtype,
        "image_size": config.data.image_size,
        "params_recon": count_params(params["recon"]),
        "params_seg": count_params(params["seg"]),
        "peak_tflops_per_device": limits["peak_tflops"],
        "bandwidth_gbs_per_device": limits["bandwidth_gbs"],
        "peak_source": limits["peak_source"],
        "host_cpus": os.cpu_count(),
        "host_load_avg_1min_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "infer": [],
        "train": None,
    }
    compile_s = {}
    mesh = parallel.make_mesh()
    for b in batch_sizes:
        row, compile_s[f"infer_b{b}"] = bench_infer(config, params, b, repeats, mesh if b % n_dev == 0 else None)
        row["fraction_of_peak"] = row["tflops"] / (limits["peak_tflops"] * scale(row["devices"]))
        result["infer"].append(row)
    best = max(result["infer"], key=lambda r: r["images_per_s"])
    result["gflops_per_image_infer"] = best["gflops_per_image"]
    result["achieved_tflops"] = best["tflops"]
    result["fraction_of_peak"] = best["fraction_of_peak"]

    if train_batch:
        row, compile_s["train"] = bench_train(config, train_batch, repeats)
        row["fraction_of_peak"] = row["tflops"] / (limits["peak_tflops"] * scale(row["devices"]))
        result["train"] = row
    result["compile_s"] = compile_s
    result["peak_memory_bytes"] = peak_memory_bytes(device)
    if profile_batch:
        result["profile"] = profile_components(config, params, profile_batch, repeats)
    result["host_load_avg_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


def json_safe(x):
    """NaN / inf floats -> None, recursively, so the record is strict JSON."""
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def print_table(r: dict) -> None:
    """Human-readable summary of a `run_benchmark` record."""
    print(f"device {r['device']} | dtype {r['dtype']} | {r['image_size']}² | params recon "
          f"{r['params_recon'] / 1e6:.2f} M, seg {r['params_seg'] / 1e6:.2f} M")
    print(f"peak {r['peak_tflops_per_device']:.3f} TFLOP/s, {r['bandwidth_gbs_per_device']:.0f} GB/s per device "
          f"({r['peak_source']})")
    head = f"{'':>6} {'batch':>5} {'img/s':>9} {'ms/img':>9} {'GFLOP/img':>10} {'FLOP/B':>7} {'TFLOP/s':>8} " \
           f"{'of peak':>8} {'XLA mem GiB':>11}"
    print(head)
    rows = [("infer", row) for row in r["infer"]] + ([("train", r["train"])] if r.get("train") else [])
    for what, row in rows:
        intensity = row["gflops_per_image"] / row["gbytes_per_image"] if row["gbytes_per_image"] else float("nan")
        print(f"{what:>6} {row['batch']:>5} {row['images_per_s']:>9.2f} {row['ms_per_image']:>9.2f} "
              f"{row['gflops_per_image']:>10.2f} {intensity:>7.1f} {row['tflops']:>8.4f} "
              f"{row['fraction_of_peak']:>8.1%} {_gib(row['xla_peak_memory_bytes']):>11}")
    print("compile s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["compile_s"].items()))
    if r["peak_memory_bytes"] is not None:
        print(f"peak device memory (runtime): {r['peak_memory_bytes'] / 2**30:.2f} GiB")
    if "profile" in r:
        print_profile(r["profile"])


def print_profile(p: dict) -> None:
    """The per-component table of `profile_components`."""
    print(f"\nprofile at batch {p['batch']} (each part compiled and timed on its own):")
    for name in ("infer", "recon_unet_2b", "seg_unet"):
        q = p[name]
        print(f"  {name:<14} {q['ms']:>9.1f} ms {q['gflops']:>9.2f} GFLOP {q['flop_per_byte']:>7.1f} FLOP/B "
              f"{q['tflops']:>8.4f} TFLOP/s")
    for net in ("recon_blocks", "seg_blocks"):
        total = sum(b["ms"] for b in p[net]) or float("nan")
        print(f"  {net} (share of their summed time):")
        for b in p[net]:
            print(f"    {b['block']:<18} {b['type']:<16} {str(tuple(b['input'])):<20} {b['ms']:>8.2f} ms "
                  f"{b['ms'] / total:>6.1%} {b['gflops']:>8.3f} GFLOP {b['flop_per_byte']:>6.1f} FLOP/B "
                  f"{b['tflops']:>7.4f} TFLOP/s")


def main(argv=None) -> int:
    """CLI entry point; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/<x>.py[:arg]")
    p.add_argument("--batch-sizes", default="1,8,32", help="inference batch sizes, comma separated")
    p.add_argument("--train-batch", type=int, default=None,
                   help="global train batch (default: train.batch_size; 0 skips the train step)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype (model.dtype)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per program (median)")
    p.add_argument("--profile", type=int, default=0, metavar="BATCH",
                   help="also time the components (U-Net pass, seg net, each block) at this batch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--out", help="write the JSON record here")
    args = p.parse_args(argv)
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if not batch_sizes or min(batch_sizes) < 1:
        p.error(f"--batch-sizes needs at least one positive batch size, got {args.batch_sizes!r}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    config = load_config(args.config)
    try:
        overrides = parse_set_overrides(args.set)
    except ValueError as e:
        p.error(str(e))
    if args.dtype:
        overrides["model.dtype"] = args.dtype
    apply_overrides(config, overrides)
    train_batch = config.train.batch_size if args.train_batch is None else args.train_batch
    if train_batch < 0:
        p.error(f"--train-batch must be >= 0, got {train_batch}")
    result = run_benchmark(config, batch_sizes, train_batch or None, repeats=args.repeats,
                           profile_batch=args.profile or None)
    result["config"] = args.config
    result["command"] = "python -m diff_fastener_jax.benchmark " + " ".join(sys.argv[1:] if argv is None else argv)
    print_table(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(json_safe(result), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
