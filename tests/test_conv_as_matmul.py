"""benchmarks/conv_as_matmul.py compares like with like: its matmul forms of a 3x3 convolution give the
convolution's values and gradients, and its second option set adds YNNPACK dots to the package's own."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT

from diff_fastener_jax.perf.xla_options import compiler_options


@pytest.fixture(scope="module")
def probe():
    path = os.path.join(ROOT, "benchmarks", "conv_as_matmul.py")
    spec = importlib.util.spec_from_file_location("conv_as_matmul", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("form", ["conv_im2col", "conv_three_rows"])
def test_matmul_forms_equal_the_convolution(probe, form):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 7, 5, 4)), jnp.float32)  # (B, H, W, C), odd and non-square
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 6)), jnp.float32)  # (3, 3, C, O)
    conv = getattr(probe, form)
    np.testing.assert_allclose(conv(x, w), probe.conv_float32(x, w), rtol=1e-5, atol=1e-5)
    assert conv(x, w).shape == (2, 7, 5, 6)
    loss = lambda f: lambda x_, w_: jnp.sum(jnp.sin(f(x_, w_)))  # noqa: E731
    got = jax.grad(loss(conv), argnums=(0, 1))(x, w)
    want = jax.grad(loss(probe.conv_float32), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4)


def test_option_sets_add_ynnpack_dots_to_the_package_options(probe):
    (label_a, package), (label_b, with_dots) = probe.option_sets()
    assert (label_a, label_b) == ("package", "package+ynn_dots")
    assert package == compiler_options()
    types = with_dots[probe.YNN_OPTION].split(",")
    assert types[-1] == probe.YNN_DOT and probe.YNN_DOT not in (package or {}).get(probe.YNN_OPTION, "")
    assert {k: v for k, v in with_dots.items() if k != probe.YNN_OPTION} == {
        k: v for k, v in (package or {}).items() if k != probe.YNN_OPTION
    }
