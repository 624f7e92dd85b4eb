"""DACM, the Dilated Attention Convolution Module of Diff-Fastener.

CBAM channel attention, then CBAM spatial attention, then a 3x3 convolution with dilation 2
(padding 2) -> GroupNorm -> GELU, added back to the input. `use_cbam` / `use_dilated` switch the two
halves off to reproduce the paper's ablation rows (with both off the module is the identity).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from diff_fastener_jax.models.layers import Conv, Dense, Dtype, GroupNorm32, get_activation


class ChannelAttention(nn.Module):
    """Avg- and max-pooled channel descriptors -> shared MLP (reduction r) -> sigmoid gate."""

    reduction: int = 16
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        hidden = max(c // self.reduction, 1)
        fc1 = Dense(hidden, use_bias=False, dtype=self.dtype, name="fc1")
        fc2 = Dense(c, use_bias=False, dtype=self.dtype, name="fc2")
        avg = jnp.mean(x, axis=(1, 2))  # (B, C)
        mx = jnp.max(x, axis=(1, 2))  # (B, C)
        gate = jax.nn.sigmoid(fc2(jax.nn.relu(fc1(avg))) + fc2(jax.nn.relu(fc1(mx))))
        return x * gate[:, None, None, :].astype(x.dtype)


class SpatialAttention(nn.Module):
    """Channel-mean and channel-max maps -> 7x7 conv -> sigmoid gate over positions."""

    kernel_size: int = 7
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        desc = jnp.concatenate([jnp.mean(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)], axis=-1)
        k = self.kernel_size
        gate = Conv(1, (k, k), padding=k // 2, use_bias=False, dtype=self.dtype, name="conv")(desc)
        return x * jax.nn.sigmoid(gate)  # (B, H, W, C) * (B, H, W, 1)


class DACM(nn.Module):
    """Dilated Attention Convolution Module. Shape-preserving: (B, H, W, C) -> (B, H, W, C)."""

    use_cbam: bool = True
    use_dilated: bool = True
    reduction: int = 16
    dilation: int = 2
    groups: int = 32
    activation: str = "gelu"
    dtype: Dtype = jnp.float32
    groupnorm: str = "flax"  # GroupNorm32's implementation (models.backend)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        if self.use_cbam:
            h = ChannelAttention(self.reduction, self.dtype, name="channel_attention")(h)
            h = SpatialAttention(dtype=self.dtype, name="spatial_attention")(h)
        if self.use_dilated:
            d = self.dilation
            h = Conv(x.shape[-1], (3, 3), padding=d, kernel_dilation=(d, d), dtype=self.dtype, name="dilated_conv")(h)
            h = get_activation(self.activation)(GroupNorm32(self.groups, self.dtype, self.groupnorm)(h))
        if not (self.use_cbam or self.use_dilated):
            return x
        return x + h
