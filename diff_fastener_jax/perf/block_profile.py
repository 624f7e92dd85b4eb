"""Where the time goes: each part of the inference program, and every top-level block of both networks,
compiled and timed on its own with the shapes it sees in the full forward pass (`benchmark --profile B`)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from diff_fastener_jax.inference import make_infer_program
from diff_fastener_jax.models import build_models
from diff_fastener_jax.perf import xla_options
from diff_fastener_jax.perf.flop_count import compile_counted
from diff_fastener_jax.perf.xla_stats import compiled_cost, median_seconds


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
        entry = {
            "call": (m.name, m.clone(parent=None, name=None), jax.tree_util.tree_map(_spec, a), dict(kw)),
            "nested": False,
        }
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
    """ms, GFLOP, GB accessed and FLOP/byte of `jax.jit(fn)(*args)` on the default device, compiled with
    the same XLA options as the real programs (`xla_options`). `fn` must not be jitted already."""
    # FLOPs from the jaxpr: XLA:GPU leaves its cuDNN convolutions out of its own count
    compiled, _, flops = compile_counted(jax.jit(fn, compiler_options=xla_options.compiler_options()), args)
    nbytes = compiled_cost(compiled)[1]
    sec = median_seconds(lambda: compiled(*args), repeats)
    return {
        "ms": 1000 * sec,
        "gflops": flops / 1e9,
        "gbytes": nbytes / 1e9,
        "flop_per_byte": flops / nbytes if nbytes else float("nan"),
        "tflops": flops / sec / 1e12,
    }


def profile_blocks(module: nn.Module, params, args: tuple, repeats: int) -> list[dict]:
    """Times every top-level block of `module` on its own, with the shapes it sees in the full forward."""
    rows = []
    for name, sub, specs, kw in top_level_calls(module, params, *args):
        arrays = [i for i, s in enumerate(specs) if isinstance(s, jax.ShapeDtypeStruct)]
        inputs = tuple(
            jax.random.normal(jax.random.key(i), specs[i].shape).astype(specs[i].dtype)
            if jnp.issubdtype(specs[i].dtype, jnp.floating)
            else jnp.zeros(specs[i].shape, specs[i].dtype)
            for i in arrays
        )

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
    t2 = jnp.concatenate(
        [
            jnp.full((batch,), config.diffusion.eval_t_small, jnp.int32),
            jnp.full((batch,), config.diffusion.eval_t_big, jnp.int32),
        ]
    )
    xs = jax.random.uniform(jax.random.key(5), (batch, size, size, 2 * c), minval=-1.0, maxval=1.0)
    infer = make_infer_program(config)  # unjitted: time_program compiles it like make_infer_fn does
    args = (params, x2[:batch])
    out = {"batch": batch}
    out["infer"] = time_program(infer, args, repeats)
    out["recon_unet_2b"] = time_program(
        lambda p, x, t: recon.apply({"params": p}, x, t), (params["recon"], x2, t2), repeats
    )
    out["seg_unet"] = time_program(lambda p, x: seg.apply({"params": p}, x), (params["seg"], xs), repeats)
    out["recon_blocks"] = profile_blocks(recon, params["recon"], (x2, t2), repeats)
    out["seg_blocks"] = profile_blocks(seg, params["seg"], (xs,), repeats)
    return out


def print_profile(p: dict) -> None:
    """The per-component table of `profile_components`."""
    print(f"\nprofile at batch {p['batch']} (each part compiled and timed on its own):")
    for name in ("infer", "recon_unet_2b", "seg_unet"):
        q = p[name]
        print(
            f"  {name:<14} {q['ms']:>9.1f} ms {q['gflops']:>9.2f} GFLOP {q['flop_per_byte']:>7.1f} FLOP/B "
            f"{q['tflops']:>8.4f} TFLOP/s"
        )
    for net in ("recon_blocks", "seg_blocks"):
        total = sum(b["ms"] for b in p[net]) or float("nan")
        print(f"  {net} (share of their summed time):")
        for b in p[net]:
            print(
                f"    {b['block']:<18} {b['type']:<16} {str(tuple(b['input'])):<20} {b['ms']:>8.2f} ms "
                f"{b['ms'] / total:>6.1%} {b['gflops']:>8.3f} GFLOP {b['flop_per_byte']:>6.1f} FLOP/B "
                f"{b['tflops']:>7.4f} TFLOP/s"
            )
