"""Matrix-unit FLOPs of a JAX program, counted from its jaxpr: the same number on every backend.

XLA's cost analysis cannot be the numerator of a GPU's fraction of peak: XLA:GPU turns convolutions
into cuDNN custom calls and does not count them. On an H200 it reported 30.6 GFLOP per image for the
paper config's inference, whose convolutions and matmuls do 1057 (docs/performance.md). The
jaxpr is what the program computes before any backend rewrites it. Counted here: every convolution,
every dot_general and the fused attention primitives (as the matmuls they replace), 2 FLOPs per
multiply-add, through nested programs (jit, remat, custom derivatives), `scan` times its length,
`shard_map` times its mesh size, the larger branch of a `cond`, and one iteration of a `while`.
Element-wise work (norms, activations, the optimizer) is not counted: it does not run on the matrix
units. Taps that fall on a convolution's zero padding are counted, as the kernels compute them;
XLA's cost analysis leaves them out. Net of the two, the count is within 0.1% of XLA:CPU's at the
paper config (1054.7 against 1054.9 GFLOP per inferred image) and 8% below at the
8-channel smoke config (tests/test_flop_count.py).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax


def _jaxprs_in(value) -> list:
    """The (closed or open) jaxprs held by one equation parameter, if any."""
    if hasattr(value, "eqns"):
        return [value]
    if hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        return [value.jaxpr]
    if isinstance(value, (list, tuple)):
        return [j for v in value for j in _jaxprs_in(v)]
    return []


def _shape(var) -> tuple[int, ...]:
    return tuple(var.aval.shape)


def conv_flops(eqn) -> float:
    """2 x output elements x (kernel taps x input features per group) of one conv_general_dilated."""
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, spatial...)
    kernel = _shape(eqn.invars[1])
    taps = math.prod(kernel[d] for d in rhs_spec[2:]) * kernel[rhs_spec[1]]
    return 2.0 * math.prod(_shape(eqn.outvars[0])) * taps


def dot_flops(eqn) -> float:
    """2 x output elements x contracted size of one dot_general."""
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = _shape(eqn.invars[0])
    return 2.0 * math.prod(_shape(eqn.outvars[0])) * math.prod(lhs[d] for d in lhs_contract)


def attention_flops(eqn, matmuls: int) -> float:
    """cuDNN's fused attention: `matmuls` products of (B, N, T, H) x (B, N, S, H) size each, i.e.
    QK^T and PV forward (2), dV, dP, dQ, dK backward (4), as XLA's composed attention computes them."""
    layout = eqn.params.get("layout", 0)
    layout = getattr(layout, "value", layout)  # an enum or its value: 0 = BTNH, 1 = BNTH
    if layout == 1:
        b, n, t, h = _shape(eqn.invars[0])  # query (B, N, T, H)
        s = _shape(eqn.invars[1])[2]
    else:
        b, t, n, h = _shape(eqn.invars[0])  # query (B, T, N, H)
        s = _shape(eqn.invars[1])[1]  # key (B, S, N, H)
    return matmuls * 2.0 * b * n * t * s * h


def jaxpr_flops(jaxpr) -> float:
    """Matrix-unit FLOPs of one run of `jaxpr` (a Jaxpr or ClosedJaxpr); see the module docstring."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += conv_flops(eqn)
        elif name == "dot_general":
            total += dot_flops(eqn)
        elif name.startswith("dot_product_attention_fwd"):
            total += attention_flops(eqn, 2)
        elif name.startswith("dot_product_attention_bwd"):
            total += attention_flops(eqn, 4)
        else:
            subs = [j for v in eqn.params.values() for j in _jaxprs_in(v)]
            if not subs:
                continue
            if name == "cond":
                total += max(jaxpr_flops(j) for j in subs)
            elif name == "scan":
                total += eqn.params["length"] * sum(jaxpr_flops(j) for j in subs)
            elif name == "shard_map":
                total += eqn.params["mesh"].size * sum(jaxpr_flops(j) for j in subs)
            else:  # jit, remat, custom_jvp/vjp, while (one iteration), ...
                total += sum(jaxpr_flops(j) for j in subs)
    return total


def program_flops(fn: Callable, *args: Any) -> float:
    """Matrix-unit FLOPs of one call `fn(*args)`; args may be arrays or jax.ShapeDtypeStruct.
    A jitted `fn` is traced as it is (its compiler options would forbid nesting it in another jit)."""
    if hasattr(fn, "trace"):
        return jaxpr_flops(fn.trace(*args).jaxpr)
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def compile_counted(jitted, args) -> tuple[Any, float, float]:
    """Compiles `jitted` for `args` from one trace: (compiled program, seconds to trace + lower +
    compile, its matrix-unit FLOPs from that trace's jaxpr)."""
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    compiled = traced.lower().compile()
    return compiled, time.perf_counter() - t0, jaxpr_flops(traced.jaxpr)
