"""Where the reconstruction U-Net's attention blocks sit, from `model.attention_resolutions`."""

from __future__ import annotations

import ml_collections

from diff_fastener_jax.data.sizing import size_hw


def attention_downsample_factors(image_size, resolutions) -> tuple[int, ...]:
    """Feature-map sizes (at `image_size` input: an int or (H, W), whose short side they refer to) ->
    the level downsampling factors that get attention.

    Fixing the factors at build time keeps the parameter count independent of the input resolution.
    """
    short_side = min(size_hw(image_size))
    factors = []
    for r in resolutions:
        if r <= 0 or short_side % r:
            raise ValueError(f"model.attention_resolutions: {r} does not divide data.image_size={image_size}")
        factors.append(short_side // r)
    return tuple(sorted(factors))


def attention_levels(config: ml_collections.ConfigDict) -> list[int]:
    """U-Net levels (0 = full resolution) that hold attention blocks: those whose downsampling factor
    `model.attention_resolutions` names, and the middle (the last level)."""
    m = config.model
    attention_ds = attention_downsample_factors(config.data.image_size, m.attention_resolutions)
    last = len(m.channel_mults) - 1
    return sorted({level for level in range(last + 1) if 2**level in attention_ds} | {last})


def attention_head_dims(config: ml_collections.ConfigDict) -> list[int]:
    """The per-head widths of the reconstruction U-Net's attention blocks, one per attention level."""
    m = config.model
    return [m.base_channels * m.channel_mults[level] // m.num_heads for level in attention_levels(config)]
