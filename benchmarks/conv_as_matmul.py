"""3x3 convolutions in float32 against the same convolutions written as bf16 matmuls, on this CPU.

    python benchmarks/conv_as_matmul.py [--repeats 5]

One JSON line per plain matmul (GFLOP/s) and per (shape, form): GFLOP/s of the jitted forward and of
forward + both gradients (counted as three times the forward's FLOPs). Everything is compiled twice:
with the package's CPU compiler options, and with YNNPACK dot fusions added. On a CPU with AMX a bf16
matmul then runs several times faster than a float32 one; the question this answers is whether the
copies that turn a convolution into matmuls leave any of that gain (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from diff_fastener_jax.perf.xla_options import compiler_options

# (batch, side, channels in, channels out): the recipe's U-Net levels at a 128 px patch, batch 8.
SHAPES = ((8, 128, 32, 32), (8, 64, 64, 64), (8, 32, 96, 96), (8, 16, 128, 128))


def conv_float32(x, w):  # (B, H, W, C), (3, 3, C, O) -> (B, H, W, O)
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x, w):
    """Nine shifted copies side by side (B, H, W, 9C), one matmul against the (9C, O) kernel."""
    b, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i : i + h, j : j + wd] for i in range(3) for j in range(3)], axis=-1)
    out = jnp.dot(cols.reshape(-1, 9 * c), w.reshape(9 * c, -1), preferred_element_type=jnp.float32)
    return out.astype(x.dtype).reshape(b, h, wd, -1)


def conv_three_rows(x, w):
    """Three column-shifted copies (B, H + 2, W, 3C); each kernel row is one matmul on a row-shifted view."""
    b, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, :, j : j + wd] for j in range(3)], axis=-1)
    out = sum(
        jnp.dot(cols[:, i : i + h].reshape(-1, 3 * c), w[i].reshape(3 * c, -1), preferred_element_type=jnp.float32)
        for i in range(3)
    )
    return out.astype(x.dtype).reshape(b, h, wd, -1)


# Plain matmuls (M, K, N): the im2col product of the 64² level at batch 4, and a square one.
MATMULS = ((16384, 576, 64), (2048, 2048, 2048))

# XLA:CPU hands a dot to YNNPACK (and a bf16 one to AMX) only when this option names dots.
YNN_OPTION, YNN_DOT = "xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"

FORMS = (
    ("float32_conv", conv_float32, jnp.float32),
    ("bf16_im2col", conv_im2col, jnp.bfloat16),
    ("bf16_three_rows", conv_three_rows, jnp.bfloat16),
)


def seconds_per_call(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for label, options in option_sets():
        measure(label, options, args.repeats)


def option_sets() -> list[tuple[str, dict | None]]:
    """The package's CPU compiler options, and the same with YNNPACK taking every dot (where XLA:CPU
    sends bf16 matmuls to AMX)."""
    package = compiler_options() or {}
    types = [t for t in package.get(YNN_OPTION, "").split(",") if t]
    return [("package", package or None), ("package+ynn_dots", {**package, YNN_OPTION: ",".join([*types, YNN_DOT])})]


def measure(label: str, options: dict | None, repeats: int) -> None:
    rng = np.random.default_rng(0)
    for m, k, n in MATMULS:
        for dtype in (jnp.float32, jnp.bfloat16):
            lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
            rhs = jnp.asarray(rng.standard_normal((k, n)), dtype)
            product = jax.jit(lambda u, v: jnp.dot(u, v, preferred_element_type=jnp.float32), compiler_options=options)
            t = seconds_per_call(product, (lhs, rhs), repeats)
            record = {
                "options": label,
                "matmul": [m, k, n],
                "dtype": jnp.dtype(dtype).name,
                "gflops": round(2 * m * k * n / t / 1e9, 1),
            }
            print(json.dumps(record), flush=True)
    for b, side, c, o in SHAPES:
        x = rng.standard_normal((b, side, side, c), np.float32)
        w = (rng.standard_normal((3, 3, c, o)) / np.sqrt(9 * c)).astype(np.float32)
        flops = 2 * b * side * side * c * o * 9
        for name, conv, dtype in FORMS:
            xs, ws = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
            forward = jax.jit(conv, compiler_options=options)
            loss = lambda x_, w_, conv=conv: jnp.sum(jnp.square(conv(x_, w_).astype(jnp.float32)))  # noqa: E731
            both = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=options)
            t_fwd = seconds_per_call(forward, (xs, ws), repeats)
            t_both = seconds_per_call(both, (xs, ws), repeats)
            print(
                json.dumps(
                    {
                        "options": label,
                        "shape": [b, side, side, c, o],
                        "form": name,
                        "forward_gflops": round(flops / t_fwd / 1e9, 1),
                        "forward_backward_gflops": round(3 * flops / t_both / 1e9, 1),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
