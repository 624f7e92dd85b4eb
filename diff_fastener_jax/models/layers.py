"""Building blocks shared by the reconstruction U-Net: norms, time embedding, res blocks, attention.

All modules take a compute `dtype`; parameters stay float32 (flax's `param_dtype` default) and the
GroupNorm statistics are always computed in float32 so bf16 compute does not drift. Where a layer has
several implementations (GroupNorm, the up-sampling conv, attention), the choice arrives as a module
field, made once per model build by `models.backend.resolve_implementations`; nothing here reads the
environment or asks which backend runs.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from diff_fastener_jax.config_schema import REMAT_MODES
from diff_fastener_jax.models import norm
from diff_fastener_jax.models.backend import GROUPNORM_IMPLS, Implementations
from diff_fastener_jax.models.upsample_conv import UpsampleConv3x3

Dtype = Any


def _promote_keep_bias_f32(*args, dtype=None, inexact=True):
    """Like flax's promotion, but the bias stays float32.

    With flax's default the bias add runs in the compute dtype, so in bf16 the bias gradient (a sum
    over B*H*W positions) is accumulated in bf16 and loses most of its size. Keeping the bias float32
    makes the add, and that sum, float32; the layer output is cast back to the compute dtype.
    """
    inputs, kernel, *rest = args
    inputs, kernel = promote_dtype(inputs, kernel, dtype=dtype, inexact=inexact)
    return (inputs, kernel, *rest)


class Conv(nn.Conv):
    """nn.Conv with a float32 bias add (see `_promote_keep_bias_f32`); same parameter names."""

    promote_dtype: Any = _promote_keep_bias_f32

    def __call__(self, inputs):
        y = super().__call__(inputs)
        return y if self.dtype is None else y.astype(self.dtype)


class Dense(nn.Dense):
    """nn.Dense with a float32 bias add (see `_promote_keep_bias_f32`); same parameter names."""

    promote_dtype: Any = _promote_keep_bias_f32

    def __call__(self, inputs):
        y = super().__call__(inputs)
        return y if self.dtype is None else y.astype(self.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
    """GELU's exact form x * Phi(x), Phi the normal CDF, written with erf: (...) -> (...), same dtype.

    `jax.nn.gelu(approximate=False)` writes Phi with erfc, which XLA:CPU evaluates as two piecewise
    polynomials and an exp, and whose derivative needs another exp. erf is one rational polynomial,
    so the recipe's train step runs 3-10% faster and its inference 7% faster. The erfc form is more
    accurate in relative terms far out on the negative tail, where GELU is below 1e-5 anyway; in
    absolute terms both are within 1.3e-6 of the float64 function. The Python-float constants keep a
    bfloat16 input bfloat16.
    """
    return 0.5 * x * (1.0 + lax.erf(x * 0.7071067811865476))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # The paper swaps SiLU for GELU everywhere; the exact form, as in PyTorch's default.
    "gelu": gelu_exact,
    # GELU's tanh form: within 5e-4 of the exact form everywhere; its train step is about 5% faster
    # on XLA:CPU.
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called `name` ('gelu', 'gelu_tanh', 'silu' or 'relu')."""
    if name not in ACTIVATIONS:
        raise ValueError(f"model.activation: unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def num_groups_for(channels: int, groups: int) -> int:
    """Largest group count <= `groups` that divides `channels` (tiny test widths need fewer than 32)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


class GroupNorm32(nn.Module):
    """GroupNorm whose statistics are computed in float32 whatever the compute dtype.

    `implementation`: 'flax' (flax's nn.GroupNorm) or 'hand_written' (`norm.GroupNorm`: hand-written
    sums and gradient, faster on XLA:CPU) for 4-d inputs. Parameters live under 'GroupNorm_0'
    ('scale', 'bias') with either implementation, so checkpoints move freely between backends.
    """

    groups: int = 32
    dtype: Dtype = jnp.float32
    implementation: str = "flax"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.implementation not in GROUPNORM_IMPLS:
            raise ValueError(
                f"GroupNorm32: unknown implementation {self.implementation!r}; choose one of {GROUPNORM_IMPLS}"
            )
        g = num_groups_for(x.shape[-1], self.groups)
        if x.ndim == 4 and self.implementation == "hand_written":
            y = norm.GroupNorm(num_groups=g, epsilon=1e-5, name="GroupNorm_0")(x.astype(jnp.float32))
        else:
            y = nn.GroupNorm(num_groups=g, epsilon=1e-5, dtype=jnp.float32)(x.astype(jnp.float32))
        return y.astype(self.dtype)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of integer timesteps. t: (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # (B, half)
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2. (B, H, W, C) -> (B, H/2, W/2, C)."""
    return nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))


def upsample_nearest2(x: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x upsampling. (B, H, W, C) -> (B, 2H, 2W, C)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def upsample_bilinear2(x: jax.Array) -> jax.Array:
    """Bilinear 2x upsampling with half-pixel centres and clamped edges. (B, H, W, C) -> (B, 2H, 2W, C).

    The same values as `jax.image.resize(x, (B, 2H, 2W, C), 'bilinear', antialias=False)`, which
    lowers to two dense (2n, n) interpolation matmuls (about 2 GFLOP per 256 px image in the
    segmentation net). At a factor of 2 every output is a fixed two-tap stencil:
    out[2i] = 0.75 x[i] + 0.25 x[i-1] and out[2i+1] = 0.75 x[i] + 0.25 x[i+1], with x[-1] = x[0]
    and x[n] = x[n-1]; element-wise work that XLA fuses. Computed in float32, returned in x's dtype.
    """
    dtype = x.dtype
    y = x.astype(jnp.promote_types(dtype, jnp.float32))
    for axis in (1, 2):
        n = y.shape[axis]
        # Clamped neighbours by concatenation: jnp.pad(mode='edge') gives the same forward, but its
        # gradient runs 3-5x slower on XLA:CPU (at (4, 64, 64, 128): 135 against 44 ms).
        before = jnp.concatenate([lax.slice_in_dim(y, 0, 1, axis=axis), lax.slice_in_dim(y, 0, n - 1, axis=axis)], axis)
        after = jnp.concatenate([lax.slice_in_dim(y, 1, n, axis=axis), lax.slice_in_dim(y, n - 1, n, axis=axis)], axis)
        pair = jnp.stack([0.75 * y + 0.25 * before, 0.75 * y + 0.25 * after], axis=axis + 1)  # (.., n, 2, ..)
        y = pair.reshape(y.shape[:axis] + (2 * n,) + y.shape[axis + 1 :])
    return y.astype(dtype)


class ResBlock(nn.Module):
    """GN-act-conv, + time projection, GN-act-dropout-conv(zero init), with a 1x1 skip if widths change.

    `resample` = 'down' / 'up' makes it a BigGAN-style resampling block: both the residual path (after
    the first activation) and the skip path are average-pooled / nearest-upsampled. With
    `impl.upsample_conv='phases'` the residual path's upsample and first conv run as one conv at the
    low resolution (`models/upsample_conv.py`), with the same parameters.
    """

    out_channels: int
    activation: str = "gelu"
    dropout: float = 0.0
    groups: int = 32
    resample: str | None = None  # None | 'down' | 'up'
    dtype: Dtype = jnp.float32
    impl: Implementations = Implementations()

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool = False) -> jax.Array:
        act = get_activation(self.activation)
        resize = {None: lambda a: a, "down": avg_pool2, "up": upsample_nearest2}[self.resample]
        h = act(GroupNorm32(self.groups, self.dtype, self.impl.groupnorm)(x))
        x = resize(x)
        if self.resample == "up" and self.impl.upsample_conv == "phases":
            h = UpsampleConv3x3(self.out_channels, dtype=self.dtype, name="conv_in")(h)  # the same parameters
        else:
            h = Conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_in")(resize(h))
        # (B, 4*base) -> (B, 1, 1, C): the timestep shifts every channel.
        emb = Dense(self.out_channels, dtype=self.dtype, name="temb_proj")(act(temb.astype(self.dtype)))
        h = h + emb[:, None, None, :]
        h = act(GroupNorm32(self.groups, self.dtype, self.impl.groupnorm)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv(
            self.out_channels, (3, 3), padding=1, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="conv_out"
        )(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


def remat_block(cls, mode: str, static_argnums: tuple[int, ...] = ()):
    """`cls` itself for `model.remat='none'`; for 'blocks', a subclass whose backward pass recomputes
    the block from its inputs, after the block's output gradient is known.

    With 'blocks' the backward pass keeps only each block's inputs and recomputes everything inside
    the block (convs, GroupNorm, activations) from them: one extra forward pass of compute for a train
    step whose stored activations shrink to the block inputs. `static_argnums` counts `self` as 0
    (flax's convention), e.g. (3,) for `ResBlock(x, temb, train)`. Module names must be given
    explicitly by the caller so the parameter tree does not depend on the mode.

    Why not plain `nn.remat`: a recomputation depends only on saved inputs, so XLA's scheduler is free
    to run every block's recomputation early, and XLA:CPU did: its plan for the paper config held
    all of them at once and was no smaller than without remat. `jax.checkpoint`'s optimization
    barriers do not stop this (the optimised XLA:CPU program has none left). Here the saved inputs pass
    through `_after(cotangent)` first, a data dependency that no scheduler can reorder.
    """
    if mode not in REMAT_MODES:
        raise ValueError(f"model.remat: unknown mode {mode!r}; choose one of {REMAT_MODES}")
    if mode == "none":
        return cls

    class Recomputed(cls):
        def __call__(self, *args):
            static = {i: a for i, a in enumerate(args, 1) if i in static_argnums}
            dynamic = tuple(a for i, a in enumerate(args, 1) if i not in static_argnums)

            def all_args(dyn):
                it = iter(dyn)
                return [static[i] if i in static else next(it) for i in range(1, len(args) + 1)]

            block = nn.checkpoint(
                lambda mdl, *dyn: cls.__call__(mdl, *all_args(dyn)), policy=jax.checkpoint_policies.nothing_saveable
            )

            def forward(mdl, *dyn):
                return nn.vjp(block, mdl, *dyn)  # the pullback holds only the block's inputs and params

            def backward(pullback, cotangent):
                return _after(pullback, cotangent)(cotangent)

            return nn.custom_vjp(block, forward_fn=forward, backward_fn=backward)(self, *dynamic)

    Recomputed.__name__ = cls.__name__
    Recomputed.__qualname__ = cls.__qualname__
    return Recomputed


def _after(tree, cotangent):
    """`tree` with every float leaf made to depend on `cotangent` (adds 0 * one of its elements).

    XLA does not fold `x * 0` for floats (NaN * 0 is NaN), so the dependency survives optimisation.
    """
    zero = jax.tree_util.tree_leaves(cotangent)[0].ravel()[0] * 0
    return jax.tree_util.tree_map(
        lambda r: r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.floating) else r, tree
    )


def composed_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Softmax attention from XLA ops: (B, N, heads, D) x3 -> (B, N, heads, D).

    The same function as `jax.nn.dot_product_attention(..., implementation=None)`, arranged for
    speed on XLA:CPU. Heads go before positions, so both matmuls and their gradients are plain
    batched matmuls over (heads, N, N). The softmax is normalised after the value matmul, on the
    (N, D) output rather than the (N, N) weights. The max shift carries no gradient, because the
    softmax does not depend on it. Logits, exponentials and sums are float32 whatever the compute
    dtype. Fwd+bwd at B=8, N=1024, 4 heads of 64: 642 ms against jax's 1273 ms (2-core CPU).
    """
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # (B, heads, N, D)
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum(
        "bhqd,bhkd->bhqk", q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32
    )  # (B, heads, N, N)
    weights = jnp.exp(logits - lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum(
        "bhqk,bhkd->bhqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )  # (B, heads, N, D)
    out = out / jnp.sum(weights, axis=-1, keepdims=True)
    return jnp.swapaxes(out, 1, 2).astype(v.dtype)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, rows: int) -> jax.Array:
    """`composed_attention`, `rows` queries of one image and head at a time (a `lax.map` over chunks).

    Why: at N = 1024 the batched form writes and re-reads (B, heads, N, N) logits and weights through
    main memory four times; a (rows, N) chunk stays in cache from one matmul to the next. On XLA:CPU
    the forward runs about 2x faster on one core (docs/performance.md). Same maths and precision
    rules as `composed_attention`. (B, N, heads, D) x3 -> (B, N, heads, D).
    """
    b, n, heads, d = q.shape
    chunks = n // rows
    scale = jnp.asarray(1.0 / math.sqrt(d), q.dtype)
    q = (jnp.swapaxes(q, 1, 2) * scale).reshape(b * heads * chunks, rows, d)  # (B*heads*chunks, rows, D)
    # every chunk carries its head's keys and values, so that one map step reads one contiguous slab
    k, v = (jnp.repeat(jnp.swapaxes(a, 1, 2).reshape(b * heads, n, d), chunks, axis=0) for a in (k, v))

    def one_chunk(args):
        qc, kc, vc = args  # (rows, D), (N, D), (N, D)
        logits = jnp.dot(qc, kc.T, preferred_element_type=jnp.float32)  # (rows, N)
        weights = jnp.exp(logits - lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
        out = jnp.dot(weights.astype(vc.dtype), vc, preferred_element_type=jnp.float32)  # (rows, D)
        return out / jnp.sum(weights, axis=-1, keepdims=True)

    out = lax.map(one_chunk, (q, k, v))  # (B*heads*chunks, rows, D)
    return jnp.swapaxes(out.reshape(b, heads, n, d), 1, 2).astype(v.dtype)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialised output projection.

    `impl.attention`: None = XLA ops: `composed_attention` (materialises the (B, heads, N, N)
    logits), or outside training, where `impl.query_chunk(N)` gives a chunk (on XLA:CPU when those
    logits outgrow the cache), `chunked_attention`; 'cudnn' = `jax.nn.dot_product_attention`'s cuDNN
    fused kernel (GPU, bf16/fp16). `build_models` resolves `impl` (`models.backend`).
    """

    num_heads: int = 4
    groups: int = 32
    dtype: Dtype = jnp.float32
    impl: Implementations = Implementations()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, hgt, wid, c = x.shape
        if c % self.num_heads:
            raise ValueError(f"model.num_heads={self.num_heads} does not divide the {c} channels of an attention block")
        head_dim = c // self.num_heads
        h = GroupNorm32(self.groups, self.dtype, self.impl.groupnorm)(x).reshape(b, hgt * wid, c)  # (B, N, C)
        qkv = Dense(3 * c, dtype=self.dtype, name="qkv")(h)  # (B, N, 3C)
        q, k, v = jnp.split(qkv.reshape(b, hgt * wid, 3, self.num_heads, head_dim), 3, axis=2)
        # Chunked queries only outside training: differentiated, the chunked form measured no faster
        # than the batched one on 2 CPU threads (its backward loses what its forward gains).
        kernel = self.impl.attention
        rows = self.impl.query_chunk(hgt * wid) if kernel is None and not train else None
        if rows:
            out = chunked_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], rows)  # (B, N, heads, D)
        elif kernel is None:
            out = composed_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])  # (B, N, heads, D)
        else:
            out = jax.nn.dot_product_attention(
                q[:, :, 0], k[:, :, 0], v[:, :, 0], implementation=kernel
            )  # (B, N, heads, D)
        out = out.reshape(b, hgt * wid, c)
        out = Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(out)
        return x + out.reshape(b, hgt, wid, c)
