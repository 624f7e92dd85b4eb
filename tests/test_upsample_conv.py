"""The up-sampling conv computed at the low resolution (`models/upsample_conv.py`): values and gradients
against a float64 nearest-upsample-then-conv reference, and the two implementations of the
up-sampling ResBlock sharing parameters and values."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diff_fastener_jax.models.backend import Implementations
from diff_fastener_jax.models.layers import ResBlock
from diff_fastener_jax.models.upsample_conv import UpsampleConv3x3, upsample_conv3x3


def _upsampled_padded(x):
    """(B, H, W, C) -> (B, 2H+2, 2W+2, C) float64: nearest 2x, then one zero pixel around."""
    up = np.repeat(np.repeat(np.asarray(x, np.float64), 2, axis=1), 2, axis=2)
    return np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _reference(x, kernel, grad_out):
    """float64 y = conv3x3(upsample(x)), and the gradients of sum(y * grad_out) by x and by the kernel."""
    up = _upsampled_padded(x)
    k = np.asarray(kernel, np.float64)
    g = np.asarray(grad_out, np.float64)
    hh, ww = g.shape[1:3]
    y = np.zeros(g.shape)
    dk = np.zeros(k.shape)
    dup = np.zeros(up.shape)
    for u in range(3):
        for v in range(3):
            window = up[:, u : u + hh, v : v + ww]  # (B, 2H, 2W, C)
            y += np.einsum("bhwc,co->bhwo", window, k[u, v])
            dk[u, v] = np.einsum("bhwc,bhwo->co", window, g)
            dup[:, u : u + hh, v : v + ww] += np.einsum("bhwo,co->bhwc", g, k[u, v])
    inner = dup[:, 1:-1, 1:-1]  # (B, 2H, 2W, C): each low-res pixel gets its 2 x 2 copies' gradients
    b, h, w, c = np.shape(x)
    dx = inner.reshape(b, h, 2, w, 2, c).sum(axis=(2, 4))
    return y, dx, dk


@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 6), (1, 1, 1, 3, 2), (1, 4, 4, 8, 8)])
def test_values_and_gradients_match_float64_upsample_then_conv(shape):
    b, h, w, c, o = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    kernel = rng.standard_normal((3, 3, c, o)).astype(np.float32)
    grad_out = rng.standard_normal((b, 2 * h, 2 * w, o)).astype(np.float32)
    y_ref, dx_ref, dk_ref = _reference(x, kernel, grad_out)

    y, vjp = jax.vjp(upsample_conv3x3, jnp.asarray(x), jnp.asarray(kernel))
    dx, dk = vjp(jnp.asarray(grad_out))
    assert y.shape == (b, 2 * h, 2 * w, o) and dx.shape == x.shape and dk.shape == kernel.shape
    for got, want in ((y, y_ref), (dx, dx_ref), (dk, dk_ref)):
        np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_the_module_holds_a_3x3_convs_parameters_and_initialises_them_alike():
    import flax.linen as nn

    x = jnp.ones((1, 4, 4, 3))
    phases = UpsampleConv3x3(5).init(jax.random.key(7), x)
    plain = nn.Conv(5, (3, 3), padding=1).init(jax.random.key(7), jnp.ones((1, 8, 8, 3)))
    assert jax.tree_util.tree_map(jnp.shape, phases) == jax.tree_util.tree_map(jnp.shape, plain)
    for a, b in zip(jax.tree_util.tree_leaves(phases), jax.tree_util.tree_leaves(plain)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_both_upsampling_resblocks_share_parameters_and_values(dtype):
    """The up-sampling ResBlock with `upsample_conv='phases'` is the 'resize' one: the same parameter
    tree (a checkpoint loads into either) and the same outputs and parameter gradients."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 6, 4, 32)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    blocks = {
        name: ResBlock(32, resample="up", dtype=dtype, impl=dataclasses.replace(Implementations(), upsample_conv=name))
        for name in ("resize", "phases")
    }
    params = blocks["resize"].init(jax.random.key(0), x, temb)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        blocks["phases"].init(jax.random.key(0), x, temb)
    )
    # conv_out starts at zero: perturb every leaf so the residual path counts.
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)

    def run(block):
        def loss(p):
            y = block.apply(p, x, temb)
            return jnp.sum(y.astype(jnp.float32) ** 2), y

        (_, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return np.asarray(y, np.float32), grads

    y_resize, g_resize = run(blocks["resize"])
    y_phases, g_phases = run(blocks["phases"])
    assert y_phases.shape == (2, 12, 8, 32)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(y_phases, y_resize, rtol=tol, atol=tol * np.abs(y_resize).max())
    # The biases before a GroupNorm have a zero gradient up to rounding: compare every leaf on the
    # scale of the largest gradient.
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(g_resize))
    for a, b in zip(jax.tree_util.tree_leaves(g_phases), jax.tree_util.tree_leaves(g_resize)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0, atol=tol * scale)


def test_the_reconstruction_unet_gives_the_same_numbers_with_either_upsampling_conv():
    """A two-level U-Net (one up-sampling block): the same parameter tree, the phases path in the
    program, and in float32 the same output to 1e-5."""
    from helpers import perturbed, tiny_config

    from diff_fastener_jax.models import build_models, init_params

    config = tiny_config(**{"model.dtype": "float32", "model.channel_mults": (1, 2)})
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    t = jnp.array([3, 500], jnp.int32)
    params = perturbed(init_params(config, jax.random.key(1)), 2)  # conv_out starts at zero
    outputs, trees = {}, {}
    for name in ("resize", "phases"):
        recon, _ = build_models(config, Implementations(upsample_conv=name))
        forward = lambda p, recon=recon: recon.apply({"params": p["recon"]}, x, t)  # noqa: E731
        trees[name] = jax.tree_util.tree_structure(
            jax.eval_shape(lambda k, r=recon: r.init(k, x, t), jax.random.key(0))
        )
        assert ("name=conv2x2" in str(jax.make_jaxpr(forward)(params))) == (name == "phases")
        outputs[name] = np.asarray(jax.jit(forward)(params))
    assert trees["resize"] == trees["phases"]
    assert outputs["phases"].shape == (2, 32, 32, 3)
    np.testing.assert_allclose(outputs["phases"], outputs["resize"], rtol=1e-5, atol=1e-5)
