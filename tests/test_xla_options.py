"""Per-program XLA:CPU options (xla_options.py): applied on the CPU, numerically neutral, and dropped
when this XLA does not know them."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diff_fastener_jax.perf import xla_options


def _conv_loss_grad(x, w):
    def loss(w):
        y = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(jnp.tanh(y) ** 2)

    return jax.value_and_grad(loss)(w)


def test_cpu_gets_the_options_and_other_backends_none(monkeypatch):
    assert xla_options.compiler_options("cpu") == xla_options.CPU_OPTIONS
    assert xla_options.compiler_options("gpu") is None
    monkeypatch.setenv("DFJ_XLA_DEFAULTS", "1")
    assert xla_options.compiler_options("cpu") is None


def test_options_do_not_change_the_numbers():
    """The filter gradient (the op the option re-routes) with and without it, against float64 numpy."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 8)).astype(np.float32)
    w = (0.1 * rng.standard_normal((3, 3, 8, 4))).astype(np.float32)
    default = jax.jit(_conv_loss_grad)(x, w)
    with_options = jax.jit(_conv_loss_grad, compiler_options=xla_options.compiler_options("cpu"))(x, w)
    # float64 reference: y = sum over the 3x3 window; dL/dw = sum_{b,h,w} xpad * 2 tanh(y) (1 - tanh(y)^2)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    xp = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = sum(np.einsum("bhwc,co->bhwo", xp[:, i : i + 16, j : j + 16], w64[i, j]) for i in range(3) for j in range(3))
    g = 2 * np.tanh(y) * (1 - np.tanh(y) ** 2)
    ref = np.stack(
        [np.stack([np.einsum("bhwc,bhwo->co", xp[:, i : i + 16, j : j + 16], g) for j in range(3)]) for i in range(3)]
    )
    for value, grad in (default, with_options):
        np.testing.assert_allclose(float(value), np.sum(np.tanh(y) ** 2), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-4, atol=1e-5)


def _reduce_and_conv_grad(x, w):
    """A channel sum that keeps nothing but the minor axis (a conv bias gradient) and a filter gradient."""
    return x.sum(axis=(0, 1, 2)), _conv_loss_grad(x, w)[1]


def test_reductions_go_to_ynnpack_and_filter_gradients_stay_eigen():
    """What the options are for: YNNPACK runs the reductions (XLA:CPU's own are strided loops, 20x
    slower), XLA:CPU's Eigen runs the filter gradients (YNNPACK's are 10x slower). A YNNPACK reduction
    fusion may absorb the convolution or dot that feeds it; a filter gradient feeds none."""
    if xla_options.compiler_options("cpu") != xla_options.CPU_OPTIONS:
        pytest.skip("this XLA:CPU does not know YNNPACK's reduction fusion type")
    # 32 channels: large enough that XLA's defaults would hand these convolutions to YNNPACK.
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 32, 32, 32)).astype(np.float32)
    w = (0.1 * rng.standard_normal((3, 3, 32, 32))).astype(np.float32)
    compiled = (
        jax.jit(_reduce_and_conv_grad, compiler_options=xla_options.compiler_options("cpu")).lower(x, w).compile()
    )
    hlo = compiled.as_text()
    bodies = {}  # computation name -> its text
    for block in hlo.split("\n\n"):
        m = re.match(r"\s*(?:ENTRY )?%(\S+) ", block)
        if m:
            bodies[m.group(1)] = block
    ynn_called = [bodies[name] for name in re.findall(r"calls=%(\S+?),[^\n]*__ynn_fusion", hlo)]
    assert any(" reduce(" in body for body in ynn_called), "the channel sum is not a YNNPACK fusion"
    # The filter gradient: a convolution whose window is the whole 32 x 32 feature map.
    assert re.search(r"convolution\([^\n]*window=\{size=32x32", hlo), "no filter-gradient convolution found"
    assert not any(re.search(r"convolution\([^\n]*window=\{size=32x32", body) for body in ynn_called), (
        "a filter gradient went to YNNPACK"
    )
    total, grad = compiled(x, w)
    np.testing.assert_allclose(np.asarray(total), x.astype(np.float64).sum(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.jit(_conv_loss_grad)(x, w)[1]), rtol=1e-4, atol=1e-2)
    # Bitwise the same from call to call (resume-equals-uninterrupted depends on it).
    again = compiled(x, w)
    assert np.array_equal(np.asarray(total), np.asarray(again[0]))


def test_unknown_options_fall_back_in_order(monkeypatch):
    """An XLA without the reduction type gets the option with no types; one without the option, none."""
    unknown = {"xla_cpu_no_such_option_in_any_release": "1"}
    try:
        monkeypatch.setattr(xla_options, "CPU_OPTIONS", unknown)
        xla_options._cpu_options.cache_clear()
        assert xla_options.compiler_options("cpu") == xla_options.CPU_FALLBACK_OPTIONS
        monkeypatch.setattr(xla_options, "CPU_FALLBACK_OPTIONS", unknown)
        xla_options._cpu_options.cache_clear()
        assert xla_options.compiler_options("cpu") is None
    finally:
        monkeypatch.undo()
        xla_options._cpu_options.cache_clear()
    assert xla_options.compiler_options("cpu") == xla_options.CPU_OPTIONS
