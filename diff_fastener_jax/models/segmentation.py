"""Segmentation U-Net: per-pixel anomaly probability from concat(image, reconstruction) (DiffusionAD).

Six levels (64, 128, 256, 512, 512, 512 by default), two conv3-GroupNorm-act per block, max-pool down,
bilinear up + conv3-GN-act, skip concatenation, a conv3 head to one channel. GroupNorm replaces the
reference's BatchNorm: per-device batches are 2-4 images, and GN carries no running state.
The decoder width at level j is channels[max(j - 1, 0)], which reproduces the reference's widths.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from diff_fastener_jax.models.backend import Implementations
from diff_fastener_jax.models.layers import (
    Conv,
    Dtype,
    GroupNorm32,
    remat_block,
    upsample_bilinear2,
)


class ConvNormAct(nn.Module):
    """conv3 -> GroupNorm -> ReLU."""

    features: int
    groups: int = 32
    dtype: Dtype = jnp.float32
    groupnorm: str = "flax"  # GroupNorm32's implementation (models.backend)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Conv(self.features, (3, 3), padding=1, dtype=self.dtype)(x)
        return jax.nn.relu(GroupNorm32(self.groups, self.dtype, self.groupnorm)(x))


class SegmentationUNet(nn.Module):
    """(B, H, W, 2C) concat(image, recon) -> (B, H, W, 1) probability (or logits)."""

    channels: Sequence[int] = (64, 128, 256, 512, 512, 512)
    groups: int = 32
    dtype: Dtype = jnp.float32
    remat: str = "none"  # 'none' | 'blocks' (see models.layers.remat_block)
    num_classes: int = 0  # > 0: a unified multi-category model; class_ids select the category
    head_prior: float = 0.5  # every pixel's anomaly probability at initialisation (model.seg_head_prior)
    class_conditioning: str = "channels"  # 'channels' (one-hot input planes) | 'film' (per-level scale, shift)
    impl: Implementations = Implementations()  # GroupNorm implementation (models.backend)

    @nn.compact
    def __call__(self, x: jax.Array, return_logits: bool = False, class_ids: jax.Array | None = None) -> jax.Array:
        n = len(self.channels)
        factor = 2 ** (n - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(
                f"image size {x.shape[1:3]} must be divisible by {factor} (2**(len(model.seg_channels) - 1))"
            )
        cna = remat_block(ConvNormAct, self.remat)
        count = iter(range(4 * n))

        # The two-layer blocks' layers are named ConvNormAct_<k> in this module, in call order: the
        # parameter tree that flax's auto-naming gave them before, with or without remat.
        def conv_norm_act(f):
            return cna(f, self.groups, self.dtype, self.impl.groupnorm, name=f"ConvNormAct_{next(count)}")

        def block(f, name):
            return nn.Sequential([conv_norm_act(f), conv_norm_act(f)], name=name)

        film = self.num_classes and self.class_conditioning == "film"
        if self.num_classes:
            if class_ids is None:
                raise ValueError(f"this model is conditioned on {self.num_classes} classes: pass class_ids (B,)")
            if self.class_conditioning == "channels":
                onehot = jax.nn.one_hot(class_ids, self.num_classes, dtype=x.dtype)  # (B, K)
                x = jnp.concatenate(
                    [x, jnp.broadcast_to(onehot[:, None, None, :], x.shape[:3] + onehot.shape[1:])], axis=-1
                )  # (B, H, W, 2C + K)
            elif self.class_conditioning != "film":
                raise ValueError(f"class_conditioning must be 'channels' or 'film', got {self.class_conditioning!r}")

        h = x.astype(self.dtype)
        feats = []
        for j, ch in enumerate(self.channels):
            if j:
                h = nn.max_pool(h, window_shape=(2, 2), strides=(2, 2))
            h = block(ch, f"enc{j}")(h)
            if film:
                # (1 + scale) * h + shift per channel, zero-initialised: training starts class-blind.
                gb = nn.Embed(self.num_classes, 2 * ch, embedding_init=nn.initializers.zeros, name=f"film{j}")(
                    class_ids
                ).astype(h.dtype)[:, None, None, :]  # (B, 1, 1, 2ch)
                h = h * (1 + gb[..., :ch]) + gb[..., ch:]
            feats.append(h)

        for j in reversed(range(n - 1)):
            ch = self.channels[max(j - 1, 0)]
            h = upsample_bilinear2(h)  # (B, 2H, 2W, C)
            h = cna(ch, self.groups, self.dtype, name=f"up{j}")(h)
            h = jnp.concatenate([h, feats[j]], axis=-1)
            h = block(ch, f"dec{j}")(h)

        # The head's bias starts at logit(head_prior): 0 for the paper's 0.5; a small prior (as in
        # RetinaNet) starts every pixel "normal", where the focal loss's (p)^gamma factor barely moves
        # a 0.5 start at gamma = 4.
        prior_logit = math.log(self.head_prior / (1.0 - self.head_prior))
        logits = Conv(
            1, (3, 3), padding=1, dtype=self.dtype, name="head", bias_init=nn.initializers.constant(prior_logit)
        )(h).astype(jnp.float32)
        return logits if return_logits else jax.nn.sigmoid(logits)
