"""The hand-written GroupNorm (models/norm.py): values and gradients against float64 numpy and against
flax's nn.GroupNorm, and the switch between the two implementations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diff_fastener_jax.models import layers, norm


def _np_group_norm(x, scale, bias, groups, eps=1e-5):
    """float64 reference: (B, H, W, C) normalised per (image, group of channels)."""
    b, h, w, c = x.shape
    xg = x.reshape(b, h, w, groups, c // groups).astype(np.float64)
    mean = xg.mean(axis=(1, 2, 4), keepdims=True)
    var = xg.var(axis=(1, 2, 4), keepdims=True)
    y = ((xg - mean) / np.sqrt(var + eps)).reshape(b, h, w, c)
    return y * scale + bias


def _inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = (rng.normal(size=shape) * 2.0 + 0.5).astype(np.float32)
    scale = rng.normal(1.0, 0.3, size=c).astype(np.float32)
    bias = rng.normal(0.0, 0.3, size=c).astype(np.float32)
    return x, scale, bias


@pytest.mark.parametrize("shape", [(2, 8, 8, 16), (3, 6, 10, 12), (1, 5, 7, 8)])
def test_spatial_sums_match_numpy(shape):
    """Every spatial size, including ones that 64 positions do not divide, sums to numpy's float64 sum."""
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    got = np.asarray(jax.jit(norm.spatial_sums)(x))
    np.testing.assert_allclose(got, x.astype(np.float64).sum(axis=(1, 2)), rtol=1e-5, atol=1e-5)
    assert got.shape == (shape[0], shape[-1])


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 16), 4), ((3, 6, 10, 12), 3), ((2, 16, 16, 32), 32)])
def test_group_norm_forward_matches_float64_reference(shape, groups):
    x, scale, bias = _inputs(shape)
    got = np.asarray(jax.jit(norm.group_norm, static_argnums=(3, 4))(x, scale, bias, groups, 1e-5))
    np.testing.assert_allclose(got, _np_group_norm(x, scale, bias, groups), rtol=1e-4, atol=1e-4)


def test_group_norm_gradient_matches_float64_finite_differences():
    """d/d(x, scale, bias) of sum(w * GN(x)) against central differences of the float64 reference."""
    shape, groups = (2, 4, 6, 8), 4
    x, scale, bias = _inputs(shape, seed=2)
    w = np.random.default_rng(3).normal(size=shape)

    def ref_loss(x64, s64, b64):
        return float(np.sum(w * _np_group_norm(x64, s64, b64, groups)))

    gx, gs, gb = jax.grad(
        lambda x, s, b: jnp.sum(jnp.asarray(w, jnp.float32) * norm.group_norm(x, s, b, groups, 1e-5)), argnums=(0, 1, 2)
    )(x, scale, bias)
    h = 1e-4
    x64, s64, b64 = x.astype(np.float64), scale.astype(np.float64), bias.astype(np.float64)
    rng = np.random.default_rng(4)
    for _ in range(12):  # random coordinates of x
        i = tuple(rng.integers(0, n) for n in shape)
        xp, xm = x64.copy(), x64.copy()
        xp[i] += h
        xm[i] -= h
        fd = (ref_loss(xp, s64, b64) - ref_loss(xm, s64, b64)) / (2 * h)
        assert abs(float(gx[i]) - fd) < 2e-3 * (1 + abs(fd)), (i, float(gx[i]), fd)
    for ch in range(shape[-1]):
        e = np.zeros(shape[-1])
        e[ch] = h
        fd_s = (ref_loss(x64, s64 + e, b64) - ref_loss(x64, s64 - e, b64)) / (2 * h)
        fd_b = (ref_loss(x64, s64, b64 + e) - ref_loss(x64, s64, b64 - e)) / (2 * h)
        assert abs(float(gs[ch]) - fd_s) < 2e-3 * (1 + abs(fd_s))
        assert abs(float(gb[ch]) - fd_b) < 2e-3 * (1 + abs(fd_b))


def test_group_norm_matches_flax_values_and_gradients():
    """Same outputs and gradients as autodiff through flax's nn.GroupNorm (float32, both)."""
    shape, groups = (2, 8, 8, 16), 8
    x, scale, bias = _inputs(shape, seed=5)
    w = jnp.asarray(np.random.default_rng(6).normal(size=shape), jnp.float32)
    flax_gn = nn.GroupNorm(num_groups=groups, epsilon=1e-5)

    def loss_flax(x, s, b):
        return jnp.sum(w * jax.nn.silu(flax_gn.apply({"params": {"scale": s, "bias": b}}, x)))

    def loss_ours(x, s, b):
        return jnp.sum(w * jax.nn.silu(norm.group_norm(x, s, b, groups, 1e-5)))

    for a, b in zip(
        jax.grad(loss_flax, argnums=(0, 1, 2))(x, scale, bias), jax.grad(loss_ours, argnums=(0, 1, 2))(x, scale, bias)
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(loss_ours(x, scale, bias), loss_flax(x, scale, bias), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_group_norm32_implementations_share_parameters_and_values(dtype):
    """The switch changes neither the parameter tree (checkpoints move between backends) nor the output."""
    x = jnp.asarray(_inputs((2, 8, 8, 64))[0])
    out, trees = {}, {}
    for impl in ("flax", "hand_written"):
        module = layers.GroupNorm32(groups=32, dtype=dtype, implementation=impl)
        variables = module.init(jax.random.key(0), x)
        trees[impl] = jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), variables)
        out[impl] = np.asarray(module.apply(variables, x).astype(jnp.float32))
        assert module.apply(variables, x).dtype == dtype
    assert trees["flax"] == trees["hand_written"]
    assert list(trees["flax"]["params"]) == ["GroupNorm_0"]
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(out["hand_written"], out["flax"], rtol=tol, atol=tol)


def test_group_norm_switch_follows_backend_and_rejects_unknown_values():
    from diff_fastener_jax.models.backend import groupnorm_impl

    assert groupnorm_impl("cpu", environ={}) == "hand_written"
    assert groupnorm_impl("gpu", environ={}) == "flax"
    assert groupnorm_impl("cpu", environ={"DFJ_GROUPNORM": "flax"}) == "flax"
    assert groupnorm_impl("gpu", environ={"DFJ_GROUPNORM": "hand_written"}) == "hand_written"
    with pytest.raises(ValueError, match="DFJ_GROUPNORM='fast'"):
        groupnorm_impl("cpu", environ={"DFJ_GROUPNORM": "fast"})
