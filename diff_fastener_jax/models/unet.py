"""Reconstruction U-Net: predicts the noise eps from (x_t, t) (DiffusionAD's, with Diff-Fastener's changes).

Wiring (guided-diffusion / AnoDDPM family): a stem conv; per encoder level `num_res_blocks` res blocks
(+ self-attention at the attention levels) then, except at the last level, a BigGAN-style downsampling
res block. The stem and every encoder block output are skip candidates (1 + L*R + (L-1) of them).
Each decoder level has R + 1 res blocks, each popping one candidate; the top block of each level but
the first is followed by an upsampling res block. Middle: res, attention, DACM, res.

Sparse-Skip keeps only every `skip_every`-th candidate (candidate i is kept iff (i + 1) % k == 0, so
k = R + 1 keeps exactly the last res-block output of each encoder level); a decoder block whose
candidate is dropped sees only the upstream features, which is where the savings come from.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diff_fastener_jax.models.backend import Implementations
from diff_fastener_jax.models.dacm import DACM
from diff_fastener_jax.models.layers import (
    AttentionBlock,
    Conv,
    Dense,
    Dtype,
    GroupNorm32,
    ResBlock,
    get_activation,
    remat_block,
    timestep_embedding,
)


def kept_skips(num_levels: int, num_res_blocks: int, skip_every: int) -> tuple[bool, ...]:
    """Which of the encoder's skip candidates (in push order) feed the decoder."""
    if skip_every < 1:
        raise ValueError(f"model.skip_every must be >= 1 (1 = dense skips), got {skip_every}")
    n = 1 + num_levels * num_res_blocks + (num_levels - 1)
    return tuple((i + 1) % skip_every == 0 for i in range(n))


class ReconstructionUNet(nn.Module):
    """eps-prediction U-Net. x: (B, H, W, C) in [-1, 1], t: (B,) int -> eps (B, H, W, C) float32."""

    in_channels: int = 3
    base_channels: int = 128
    channel_mults: Sequence[int] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attention_ds: Sequence[int] = (8, 16, 32)  # downsampling factors (2**level) that get attention
    num_heads: int = 4
    groups: int = 32
    activation: str = "gelu"
    dropout: float = 0.0
    skip_every: int = 3
    use_dacm: bool = True
    dacm_use_cbam: bool = True
    dacm_use_dilated: bool = True
    dacm_reduction: int = 16
    dtype: Dtype = jnp.float32
    impl: Implementations = Implementations()  # GroupNorm and attention implementations (models.backend)
    remat: str = "none"  # 'none' | 'blocks' (see models.layers.remat_block)
    num_classes: int = 0  # > 0: a unified multi-category model; class_ids select the category

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, train: bool = False, class_ids: jax.Array | None = None
    ) -> jax.Array:
        num_levels = len(self.channel_mults)
        down_factor = 2 ** (num_levels - 1)
        if x.shape[1] % down_factor or x.shape[2] % down_factor:
            raise ValueError(
                f"image size {x.shape[1:3]} must be divisible by {down_factor} (2**(len(model.channel_mults) - 1))"
            )
        act = get_activation(self.activation)
        keep = kept_skips(num_levels, self.num_res_blocks, self.skip_every)
        # Remat wraps the class; the explicit names keep the parameter tree identical either way.
        res_cls = remat_block(ResBlock, self.remat, static_argnums=(3,))  # (self, x, temb, train)
        attn_cls = remat_block(AttentionBlock, self.remat, static_argnums=(2,))  # (self, x, train)
        res = lambda ch, name, resample=None: res_cls(  # noqa: E731
            ch, self.activation, self.dropout, self.groups, resample, self.dtype, self.impl, name=name
        )
        attn = lambda name: attn_cls(self.num_heads, self.groups, self.dtype, self.impl, name=name)  # noqa: E731

        temb_dim = 4 * self.base_channels
        temb = timestep_embedding(t, self.base_channels)  # (B, base)
        temb = Dense(temb_dim, name="temb_dense0")(temb)
        temb = Dense(temb_dim, name="temb_dense1")(act(temb))  # (B, 4*base), float32
        if self.num_classes:
            if class_ids is None:
                raise ValueError(f"this model is conditioned on {self.num_classes} classes: pass class_ids (B,)")
            # A learned class vector added to the time embedding: every res block sees the category.
            temb = temb + nn.Embed(self.num_classes, temb_dim, name="class_embed")(class_ids)  # (B, 4*base)

        h = Conv(self.base_channels, (3, 3), padding=1, dtype=self.dtype, name="stem")(x.astype(self.dtype))
        skips = [h]
        for level, mult in enumerate(self.channel_mults):
            for i in range(self.num_res_blocks):
                h = res(self.base_channels * mult, f"down{level}_res{i}")(h, temb, train)
                if 2**level in self.attention_ds:
                    h = attn(f"down{level}_attn{i}")(h, train)
                skips.append(h)
            if level != num_levels - 1:
                h = res(h.shape[-1], f"down{level}_downsample", "down")(h, temb, train)
                skips.append(h)

        h = res(h.shape[-1], "mid_res0")(h, temb, train)
        h = attn("mid_attn")(h, train)
        if self.use_dacm:
            h = DACM(
                self.dacm_use_cbam,
                self.dacm_use_dilated,
                self.dacm_reduction,
                2,
                self.groups,
                self.activation,
                self.dtype,
                self.impl.groupnorm,
                name="mid_dacm",
            )(h)
        h = res(h.shape[-1], "mid_res1")(h, temb, train)

        for level in reversed(range(num_levels)):
            mult = self.channel_mults[level]
            for i in range(self.num_res_blocks + 1):
                idx = len(skips) - 1
                skip = skips.pop()
                if keep[idx]:
                    h = jnp.concatenate([h, skip], axis=-1)
                h = res(self.base_channels * mult, f"up{level}_res{i}")(h, temb, train)
                if 2**level in self.attention_ds:
                    h = attn(f"up{level}_attn{i}")(h, train)
                if level and i == self.num_res_blocks:
                    h = res(h.shape[-1], f"up{level}_upsample", "up")(h, temb, train)

        h = act(GroupNorm32(self.groups, self.dtype, self.impl.groupnorm)(h))
        out = Conv(
            self.in_channels, (3, 3), padding=1, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="out_conv"
        )(h)
        return out.astype(jnp.float32)
