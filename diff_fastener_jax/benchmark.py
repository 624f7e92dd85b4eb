r"""Speed and memory of the jitted inference and train step, against the hardware's limit.

  python -m diff_fastener_jax.benchmark --config configs/default.py --batch-sizes 1,8,32 \
      --config.model.dtype=bfloat16 --out benchmarks/h100_bf16.json
  python -m diff_fastener_jax.benchmark --config configs/default.py --batch-sizes 4 --train-batch 4 \
      --config.model.remat=blocks --compile-only        # XLA's planned memory, FLOPs; runs nothing

Inference = the whole one-step norm-guided pipeline (two U-Net passes fused into one batched call,
segmentation net, top-K score) as one XLA program; training = the whole data-parallel train step
(forward, losses, backward, Adam). Timings: compile first (timed separately), one warm-up call, then
the median of `--repeats` calls, each ended by `block_until_ready`. FLOPs and bytes come from XLA's
cost analysis of the compiled program (per device for a sharded program, so they are multiplied by the
device count). Achieved TFLOP/s over the device's peak (a datasheet table for GPUs, a measured matmul
roofline on CPUs) is the fraction of peak. `--profile B` adds per-component timings
(`perf/block_profile.py`). `--compile-only` compiles every requested program from abstract inputs
and records compile time, FLOPs and `xla_peak_memory_bytes` without allocating or running anything.
Config overrides: `--config.a.b=v` (ml_collections); `--set a.b=v` is a deprecated alias.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import warnings

import jax
import numpy as np

from diff_fastener_jax import parallel
from diff_fastener_jax.models import count_params, init_params, resolve_dtype_name
from diff_fastener_jax.perf.block_profile import print_profile, profile_components
from diff_fastener_jax.perf.hardware import device_limits
from diff_fastener_jax.perf.programs import bench_infer, bench_train, compile_infer, compile_train
from diff_fastener_jax.perf.xla_stats import peak_memory_bytes

REQUIRED_KEYS = ("device", "dtype", "image_size", "infer", "train", "gflops_per_image_infer",
                 "achieved_tflops", "fraction_of_peak", "compile_s", "params_recon", "params_seg")


def _record_head(config, devices) -> dict:
    device = devices[0]
    m = config.model
    return {
        "date": datetime.date.today().isoformat(),
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')} x{len(devices)}",
        "jax": jax.__version__,
        "dtype": resolve_dtype_name(m.dtype),
        "dtype_setting": m.dtype,
        "attention": m.get("attention", "auto"),
        "remat": m.get("remat", "none"),
        "image_size": config.data.image_size,
        "host_cpus": os.cpu_count(),
        "host_load_avg_1min_before": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "infer": [],
        "train": None,
    }


def run_benchmark(config, batch_sizes, train_batch: int | None, repeats: int = 5,
                  profile_batch: int | None = None) -> dict:
    """Measures inference per batch size and one training configuration; returns the JSON record."""
    devices = jax.devices()
    device = devices[0]
    n_dev = len(devices)
    params = init_params(config, jax.random.key(0))  # float32 whatever the compute dtype
    result = _record_head(config, devices)
    limits = device_limits(device, result["dtype"])
    # A CPU's simulated devices share the cores the roofline was measured on; GPUs add up.
    scale = (lambda k: k) if device.platform == "gpu" else (lambda k: 1)  # noqa: E731
    result.update({"params_recon": count_params(params["recon"]), "params_seg": count_params(params["seg"]),
                   "peak_tflops_per_device": limits["peak_tflops"],
                   "bandwidth_gbs_per_device": limits["bandwidth_gbs"], "peak_source": limits["peak_source"]})
    compile_s = {}
    mesh = parallel.make_mesh()
    for b in batch_sizes:
        row, compile_s[f"infer_b{b}"] = bench_infer(config, params, b, repeats, mesh if b % n_dev == 0 else None)
        row["fraction_of_peak"] = row["tflops"] / (limits["peak_tflops"] * scale(row["devices"]))
        result["infer"].append(row)
    best = max(result["infer"], key=lambda r: r["images_per_s"], default={})
    result["gflops_per_image_infer"] = best.get("gflops_per_image")
    result["achieved_tflops"] = best.get("tflops")
    result["fraction_of_peak"] = best.get("fraction_of_peak")

    if train_batch:
        del params  # the train step makes its own state; free the inference copy first
        row, compile_s["train"] = bench_train(config, train_batch, repeats)
        row["fraction_of_peak"] = row["tflops"] / (limits["peak_tflops"] * scale(row["devices"]))
        result["train"] = row
    result["compile_s"] = compile_s
    result["peak_memory_bytes"] = peak_memory_bytes(device)
    if profile_batch:
        result["profile"] = profile_components(config, init_params(config, jax.random.key(0)), profile_batch, repeats)
    result["host_load_avg_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
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
    print(f"device {r['device']} | dtype {r['dtype']} | attention {r['attention']} | remat {r['remat']} | "
          f"{r['image_size']}² | params recon {r['params_recon'] / 1e6:.2f} M, seg {r['params_seg'] / 1e6:.2f} M")
    if "peak_tflops_per_device" in r:
        print(f"peak {r['peak_tflops_per_device']:.3f} TFLOP/s, {r['bandwidth_gbs_per_device']:.0f} GB/s per device "
              f"({r['peak_source']})")
    print(f"{'':>6} {'batch':>5} {'img/s':>9} {'ms/img':>9} {'GFLOP/img':>10} {'FLOP/B':>7} {'TFLOP/s':>8} "
          f"{'of peak':>8} {'XLA mem GiB':>11}")
    rows = [("infer", row) for row in r["infer"]] + ([("train", r["train"])] if r.get("train") else [])
    for what, row in rows:
        intensity = row["gflops_per_image"] / row["gbytes_per_image"] if row["gbytes_per_image"] else float("nan")
        print(f"{what:>6} {row['batch']:>5} {_num(row, 'images_per_s', '9.2f'):>9} "
              f"{_num(row, 'ms_per_image', '9.2f'):>9} {row['gflops_per_image']:>10.2f} {intensity:>7.1f} "
              f"{_num(row, 'tflops', '8.4f'):>8} {_num(row, 'fraction_of_peak', '8.1%'):>8} "
              f"{_gib(row['xla_peak_memory_bytes']):>11}")
    print("compile s: " + ", ".join(f"{k} {v:.1f}" for k, v in r["compile_s"].items()))
    if r.get("peak_memory_bytes") is not None:
        print(f"peak device memory (runtime): {r['peak_memory_bytes'] / 2**30:.2f} GiB")
    if "profile" in r:
        print_profile(r["profile"])


def _load_config(parser: argparse.ArgumentParser, path: str, overrides: list[str]):
    """`--config path[:arg]` plus `--config.a.b=v` overrides through ml_collections' config_flags."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["benchmark", f"--config={path}", *overrides]
    values = flags.FlagValues()  # private: main() may run several times in one process (tests)
    config_flags.DEFINE_config_file("config", default=None, flag_values=values, lock_config=False, sys_argv=argv)
    try:
        values(argv)
        return values.config
    except (flags.Error, AttributeError, KeyError, ValueError, OSError, TypeError) as e:
        msg = str(e).strip().strip("'\"")
        parser.error(f"--config {path} {' '.join(overrides)}: {type(e).__name__}: {msg}")


def _set_to_override(item: str) -> str:
    """Deprecated `--set a.b=v` -> `--config.a.b=v`."""
    if "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    return f"--config.{key.removeprefix('config.')}={value}"


def main(argv=None) -> int:
    """CLI entry point; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m diff_fastener_jax.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--config", required=True, help="configs/<x>.py[:arg]; override keys with --config.a.b=v")
    p.add_argument("--batch-sizes", default="1,8,32",
                   help="inference batch sizes, comma separated ('' or 0: no inference, train step only)")
    p.add_argument("--train-batch", type=int, default=None,
                   help="global train batch (default: train.batch_size; 0 skips the train step)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="compute dtype (sets model.dtype; auto = bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per program (median)")
    p.add_argument("--profile", type=int, default=0, metavar="BATCH",
                   help="also time the components (U-Net pass, seg net, each block) at this batch")
    p.add_argument("--compile-only", action="store_true",
                   help="only compile the programs: compile seconds, FLOPs, XLA's planned memory; runs nothing")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="deprecated alias of --config.KEY=VALUE")
    p.add_argument("--out", help="write the JSON record here")
    args, rest = p.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (config overrides look like --config.model.dtype=bfloat16)")
    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip() and b.strip() != "0"]
    except ValueError:
        p.error(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    if batch_sizes and min(batch_sizes) < 1:
        p.error(f"--batch-sizes must be positive, got {args.batch_sizes!r}")
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.set:
        warnings.warn("benchmark: --set KEY=VALUE is deprecated; use --config.KEY=VALUE", DeprecationWarning,
                      stacklevel=1)
        print("warning: --set KEY=VALUE is deprecated; use --config.KEY=VALUE", file=sys.stderr)
    try:
        overrides = [_set_to_override(s) for s in args.set] + rest
    except ValueError as e:
        p.error(str(e))
    if args.dtype:
        overrides.append(f"--config.model.dtype={args.dtype}")
    config = _load_config(p, args.config, overrides)
    train_batch = config.train.batch_size if args.train_batch is None else args.train_batch
    if train_batch < 0:
        p.error(f"--train-batch must be >= 0, got {train_batch}")
    if not batch_sizes and not train_batch:
        p.error("nothing to measure: give --batch-sizes and/or a --train-batch > 0")
    if args.compile_only:
        result = run_compile_only(config, batch_sizes, train_batch or None)
    else:
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
