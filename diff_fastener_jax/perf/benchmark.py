"""Benchmark internals: timed train and inference programs, FLOPs, planned memory, the JSON record and its table."""

from __future__ import annotations

import datetime
import os
import sys
import warnings

import jax
import numpy as np

from diff_fastener_jax import parallel
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.models import (
    attention_levels,
    count_params,
    init_params,
    resolve_implementations,
)
from diff_fastener_jax.perf import xla_options
from diff_fastener_jax.perf.block_profile import print_profile, profile_components
from diff_fastener_jax.perf.hardware import device_limits
from diff_fastener_jax.perf.programs import bench_infer, bench_train, compile_infer, compile_train
from diff_fastener_jax.perf.xla_stats import blocked_seconds, peak_memory_bytes
from diff_fastener_jax.training.train_step import create_train_state

REQUIRED_KEYS = (
    "device",
    "dtype",
    "image_size",
    "infer",
    "train",
    "gflops_per_image_infer",
    "achieved_tflops",
    "fraction_of_peak",
    "compile_s",
    "params_recon",
    "params_seg",
)


def _attention_chunks(config, impl) -> dict:
    size = config.data.image_size
    positions = sorted({(size // 2**level) ** 2 for level in attention_levels(config)}, reverse=True)
    return {str(n): impl.query_chunk(n) if impl.attention is None else None for n in positions}


def _record_head(config, devices) -> dict:
    device = devices[0]
    m = config.model
    impl = resolve_implementations(config, device.platform)
    return {
        "date": datetime.date.today().isoformat(),
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')} x{len(devices)}",
        "jax": jax.__version__,
        "dtype": impl.dtype,
        "dtype_setting": m.dtype,
        "attention": m.get("attention", "auto"),
        "remat": m.get("remat", "none"),
        "group_norm": impl.groupnorm,
        "upsample_conv": impl.upsample_conv,
        # Inference attention blocks, positions N -> query rows per chunk (None: the batched form).
        "attention_query_chunk": _attention_chunks(config, impl),
        # The per-program compiler options of the timed programs (None: XLA's defaults).
        "xla_options": xla_options.compiler_options(device.platform),
        "image_size": config.data.image_size,
        # > 0: the train step runs on P x P crops (data.patch_size), inference on whole images by tiles
        "patch_size": int(config.data.get("patch_size", 0)),
        "host_cpus": os.cpu_count(),
        "host_load_avg_1min_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "infer": [],
        "train": None,
    }


def _progress(message: str) -> None:
    # Compiles can take minutes (XLA:GPU autotunes every convolution): say what is running, on stderr
    # so that stdout keeps only the summary.
    print(f"[benchmark {datetime.datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_benchmark(
    config, batch_sizes, train_batch: int | None, repeats: int = 5, profile_batch: int | None = None
) -> dict:
    """Measures inference per batch size and one training configuration; returns the JSON record."""
    devices = jax.devices()
    device = devices[0]
    n_dev = len(devices)
    _progress("initialising parameters")
    # float32 whatever the compute dtype. A train-only run needs just their shapes (for the counts):
    # the train step initialises its own state.
    init = lambda k: init_params(config, k)  # noqa: E731
    result = _record_head(config, devices)
    if batch_sizes:  # compile (off CPU) + run: what every inference process pays before its first image
        params, seconds = blocked_seconds(lambda: init(jax.random.key(0)))
        result["init_s"] = {"params": seconds}
    else:
        params = jax.eval_shape(init, jax.random.key(0))
    _progress("measuring the device's matmul peak and bandwidth")
    limits = device_limits(device, result["dtype"])
    # A CPU's simulated devices share the cores the roofline was measured on; GPUs add up.
    scale = (lambda k: k) if device.platform == "gpu" else (lambda k: 1)  # noqa: E731
    result.update(
        {
            "params_recon": count_params(params["recon"]),
            "params_seg": count_params(params["seg"]),
            "peak_tflops_per_device": limits["peak_tflops"],
            "bandwidth_gbs_per_device": limits["bandwidth_gbs"],
            "peak_source": limits["peak_source"],
        }
    )
    compile_s = {}
    mesh = parallel.make_mesh()
    for b in batch_sizes:
        _progress(f"inference, batch {b}: compiling, then {repeats} timed repeats")
        row, compile_s[f"infer_b{b}"] = bench_infer(config, params, b, repeats, mesh if b % n_dev == 0 else None)
        _progress(
            f"inference, batch {b}: {row['images_per_s']:.2f} img/s (compiled in {compile_s[f'infer_b{b}']:.1f} s)"
        )
        row["fraction_of_peak"] = row["tflops"] / (limits["peak_tflops"] * scale(row["devices"]))
        result["infer"].append(row)
    best = max(result["infer"], key=lambda r: r["images_per_s"], default={})
    result["gflops_per_image_infer"] = best.get("gflops_per_image")
    result["achieved_tflops"] = best.get("tflops")
    result["fraction_of_peak"] = best.get("fraction_of_peak")

    if train_batch:
        del params  # the train step makes its own state; free the inference copy first
        _progress(f"train step, batch {train_batch}: compiling, then {repeats} timed repeats")
        row, compile_s["train"] = bench_train(config, train_batch, repeats)
        _progress(
            f"train step, batch {train_batch}: {row['images_per_s']:.2f} img/s (compiled in {compile_s['train']:.1f} s)"
        )
        row["fraction_of_peak"] = row["tflops"] / (limits["peak_tflops"] * scale(row["devices"]))
        result["train"] = row
    result["compile_s"] = compile_s
    result["peak_memory_bytes"] = peak_memory_bytes(device)
    if profile_batch:
        result["profile"] = profile_components(config, init_params(config, jax.random.key(0)), profile_batch, repeats)
    result["host_load_avg_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return result


def run_init_only(config) -> dict:
    """Initialises the parameters and the train state as a real run does (one jitted program each off
    CPU) and times both. With a persistent compilation cache (`JAX_COMPILATION_CACHE_DIR`) this stores
    both programs for later processes: `benchmarks/gpu.sh` runs it next to the `--compile_only` runs."""
    devices = jax.devices()
    result = _record_head(config, devices)
    result["init_only"] = True
    params, params_s = blocked_seconds(lambda: init_params(config, jax.random.key(0)))
    result.update({"params_recon": count_params(params["recon"]), "params_seg": count_params(params["seg"])})
    del params
    _, state_s = blocked_seconds(lambda: create_train_state(config, jax.random.key(0)))
    result.update({"init_s": {"params": params_s, "train_state": state_s}, "compile_s": {}})
    return result


def run_compile_only(config, batch_sizes, train_batch: int | None) -> dict:
    """Compiles every requested program from abstract inputs; records compile seconds, FLOPs and XLA's
    planned memory per program. Nothing is allocated on the device or run."""
    devices = jax.devices()
    n_dev = len(devices)
    result = _record_head(config, devices)
    result["compile_only"] = True
    params = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    result.update({"params_recon": count_params(params["recon"]), "params_seg": count_params(params["seg"])})
    compile_s = {}
    mesh = parallel.make_mesh()
    for b in batch_sizes:
        row, compile_s[f"infer_b{b}"] = compile_infer(config, b, mesh if b % n_dev == 0 else None)
        result["infer"].append(row)
    if train_batch:
        result["train"], compile_s["train"] = compile_train(config, train_batch)
    result["compile_s"] = compile_s
    result["gflops_per_image_infer"] = result["infer"][0]["gflops_per_image"] if result["infer"] else None
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


def _num(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    return "-" if v is None else format(v, fmt)


def print_table(r: dict) -> None:
    """Human-readable summary of a `run_benchmark` / `run_compile_only` record."""
    print(
        f"device {r['device']} | dtype {r['dtype']} | attention {r['attention']} | remat {r['remat']} | "
        f"{r['image_size']}²{f' (train on {p}² crops)' if (p := r.get('patch_size')) else ''} | params recon {r['params_recon'] / 1e6:.2f} M, seg {r['params_seg'] / 1e6:.2f} M"
    )
    if r.get("host_setup"):
        host = r["host_setup"]
        print(
            f"malloc huge pages {'on' if host['malloc_hugepages'] else 'off'} (THP '{host['thp_mode']}'; see hostenv.py)"
        )
    if "peak_tflops_per_device" in r:
        print(
            f"peak {r['peak_tflops_per_device']:.3f} TFLOP/s, {r['bandwidth_gbs_per_device']:.0f} GB/s per device "
            f"({r['peak_source']})"
        )
    print(
        f"{'':>6} {'batch':>5} {'img/s':>9} {'ms/img':>9} {'GFLOP/img':>10} {'FLOP/B':>7} {'TFLOP/s':>8} "
        f"{'of peak':>8} {'XLA mem GiB':>11}"
    )
    rows = [("infer", row) for row in r["infer"]] + ([("train", r["train"])] if r.get("train") else [])
    for what, row in rows:
        intensity = row["gflops_per_image"] / row["gbytes_per_image"] if row["gbytes_per_image"] else float("nan")
        print(
            f"{what:>6} {row['batch']:>5} {_num(row, 'images_per_s', '9.2f'):>9} "
            f"{_num(row, 'ms_per_image', '9.2f'):>9} {row['gflops_per_image']:>10.2f} {intensity:>7.1f} "
            f"{_num(row, 'tflops', '8.4f'):>8} {_num(row, 'fraction_of_peak', '8.1%'):>8} "
            f"{_gib(row['xla_peak_memory_bytes']):>11}"
        )
    print("compile s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["compile_s"].items()))
    if r.get("init_s"):
        print("init s (compile + run): " + ", ".join(f"{k} {v:.1f}" for k, v in r["init_s"].items()))
    if r.get("peak_memory_bytes") is not None:
        print(f"peak device memory (runtime): {r['peak_memory_bytes'] / 2**30:.2f} GiB")
    if "profile" in r:
        print_profile(r["profile"])


LEGACY_SPELLINGS = {
    "--batch-sizes": "--batch_sizes",
    "--train-batch": "--train_batch",
    "--compile-only": "--compile_only",
}


def modern_argv(argv: list[str]) -> list[str]:
    """Rewrites the older spellings (`--batch-sizes`, `--train-batch`, `--compile-only`, and the
    deprecated `--set KEY=VALUE`) to today's flags, so scripts written for them keep working."""
    out, i, warned = [], 0, False
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in LEGACY_SPELLINGS:
            out.append(LEGACY_SPELLINGS[name] + eq + value)
        elif name == "--set":
            item = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 0 if eq else 1
            if "=" not in item:
                raise UserError(f"--set expects KEY=VALUE, got {item!r}", hint="write --config.KEY=VALUE")
            key, val = item.split("=", 1)
            out.append(f"--config.{key.removeprefix('config.')}={val}")
            if not warned:
                warnings.warn(
                    "benchmark: --set KEY=VALUE is deprecated; use --config.KEY=VALUE", DeprecationWarning, stacklevel=2
                )
                print("warning: --set KEY=VALUE is deprecated; use --config.KEY=VALUE", file=sys.stderr)
                warned = True
        else:
            out.append(a)
        i += 1
    return out


def parse_batch_sizes(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; '' or '0' -> [] (no inference rows)."""
    try:
        sizes = [int(b) for b in text.split(",") if b.strip() and b.strip() != "0"]
    except ValueError:
        raise UserError(f"--batch_sizes must be comma-separated integers, got {text!r}") from None
    if sizes and min(sizes) < 1:
        raise UserError(f"--batch_sizes must be positive, got {text!r}")
    return sizes


def measure(
    config,
    batch_sizes: list[int],
    train_batch: int | None,
    *,
    compile_only: bool = False,
    repeats: int = 5,
    profile_batch: int | None = None,
    init_only: bool = False,
) -> dict:
    """The benchmark record for `config` (what the command prints and writes)."""
    if init_only:
        if compile_only:
            raise UserError("--init_only and --compile_only exclude each other: init_only runs the init programs")
        return run_init_only(config)
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    if train_batch is not None and train_batch < 0:
        raise UserError(f"--train_batch must be >= 0, got {train_batch}")
    if not batch_sizes and not train_batch:
        raise UserError("nothing to measure: give --batch_sizes and/or a --train_batch > 0")
    if compile_only:
        return run_compile_only(config, batch_sizes, train_batch or None)
    return run_benchmark(config, batch_sizes, train_batch or None, repeats=repeats, profile_batch=profile_batch or None)
