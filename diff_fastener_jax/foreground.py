"""The object's foreground inside the inference program (`infer.score_region`, `infer.map_region`).

Training draws its synthetic anomalies inside the foreground (`data.synthesis.foreground_mask`, mode
'otsu': the Otsu class of the greyscale image that touches the border less), so the segmentation net
learns what a defect looks like on the object, and nothing about the background around it. Its answer
on the background (a shadow in a corner, a cable in front of the plate) is therefore not evidence of a
defect; with `infer.score_region='foreground'` the image score counts the foreground alone, and with
`infer.map_region='foreground'` the returned map is zero outside it.

This is the same rule in jax.numpy, batched and traceable, so that the exported StableHLO and ONNX
programs compute it too: a 256-bin histogram of the grey image on [0, 1], Otsu's threshold (the upper
edge of the bin that maximises the between-class variance), the class that covers less of the border,
and the whole image when that class holds under 1% of the pixels. The histogram is counted with
matmuls (no scatter), which every exporter converts.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diff_fastener_jax.data.synthesis import MIN_FOREGROUND_SHARE

NUM_BINS = 256  # the histogram of the synthesis rule (np.histogram on [0, 1])
# The value of a pixel outside the score region: below any scored value (a map in [0, 1], that minus a
# normal map, or that standardised by one), so the top-K mean takes the region's pixels. The region
# holds at least MIN_FOREGROUND_SHARE of the image, far more than K pixels.
OUTSIDE_REGION = -1e6


def otsu_foreground(images):
    """bool (N, H, W): each image's Otsu foreground. images (N, H, W, C) in [-1, 1]."""
    n = images.shape[0]  # may be symbolic (jax.export)
    gray = (jnp.mean(images, axis=-1) + 1.0) / 2.0  # (N, H, W) in [0, 1]
    bins = jnp.clip(jnp.floor(gray * NUM_BINS), 0, NUM_BINS - 1).reshape(n, -1)  # (N, P): each pixel's bin
    count = bins.shape[1]
    # The histogram as a 16 x 16 outer product of one-hot digits (bin = 16 * high + low): a batched
    # matmul over (N, P, 16) operands, a sixteenth of a (N, P, 256) one-hot.
    high = jnp.floor(bins / 16.0)
    digits = np.arange(16, dtype=np.float32)
    one_high = (high[..., None] == digits).astype(jnp.float32)  # (N, P, 16)
    one_low = ((bins - 16.0 * high)[..., None] == digits).astype(jnp.float32)
    hist = jnp.einsum("npi,npj->nij", one_high, one_low).reshape(n, NUM_BINS)  # (N, B) pixel counts
    at_or_below = np.triu(np.ones((NUM_BINS, NUM_BINS), np.float32))  # [s, t] = 1 where s <= t
    centers = (np.arange(NUM_BINS, dtype=np.float32) + 0.5) / NUM_BINS
    w0 = (hist @ at_or_below) / count  # (N, B): share of pixels in bins <= t
    mu = ((hist * centers) @ at_or_below) / count  # (N, B): their first moment
    denom = w0 * (1.0 - w0)
    between = jnp.where(denom > 0, (mu[:, -1:] * w0 - mu) ** 2 / jnp.where(denom > 0, denom, 1.0), -1.0)
    threshold = (jnp.argmax(between, axis=1).astype(jnp.float32) + 1.0) / NUM_BINS  # (N,)
    bright = gray > threshold[:, None, None]  # (N, H, W)
    border = jnp.concatenate([bright[:, 0], bright[:, -1], bright[:, :, 0], bright[:, :, -1]], axis=1)
    bright_background = jnp.mean(border.astype(jnp.float32), axis=1) > 0.5  # (N,)
    fg = bright != bright_background[:, None, None]  # the darker class where the border is bright
    usable = jnp.mean(fg.astype(jnp.float32), axis=(1, 2)) >= MIN_FOREGROUND_SHARE
    return fg | ~usable[:, None, None]


def masked_to_foreground(scored, foreground):
    """`scored` (N, H, W) with every pixel outside `foreground` set to OUTSIDE_REGION, so the top-K mean
    takes the foreground's pixels."""
    return jnp.where(foreground, scored, OUTSIDE_REGION)
