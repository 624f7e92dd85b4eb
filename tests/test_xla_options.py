"""Per-program XLA:CPU options (xla_options.py): applied on the CPU, numerically neutral, and dropped
when this XLA does not know them."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diff_fastener_jax import xla_options


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
    y = sum(np.einsum("bhwc,co->bhwo", xp[:, i:i + 16, j:j + 16], w64[i, j]) for i in range(3) for j in range(3))
    g = 2 * np.tanh(y) * (1 - np.tanh(y) ** 2)
    ref = np.stack([np.stack([np.einsum("bhwc,bhwo->co", xp[:, i:i + 16, j:j + 16], g) for j in range(3)])
                    for i in range(3)])
    for value, grad in (default, with_options):
        np.testing.assert_allclose(float(value), np.sum(np.tanh(y) ** 2), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(grad), ref, rtol=1e-4, atol=1e-5)


def test_an_unknown_option_falls_back_to_xla_defaults(monkeypatch):
    monkeypatch.setattr(xla_options, "CPU_OPTIONS", {"xla_cpu_no_such_option_in_any_release": "1"})
    xla_options._cpu_options_supported.cache_clear()
    try:
        assert xla_options.compiler_options("cpu") is None
    finally:
        monkeypatch.undo()
        xla_options._cpu_options_supported.cache_clear()
    assert xla_options.compiler_options("cpu") == xla_options.CPU_OPTIONS
