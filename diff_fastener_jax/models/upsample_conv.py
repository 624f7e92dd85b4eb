"""A nearest 2x upsampling followed by a 3x3 convolution, computed at the low resolution.

The up-sampling ResBlocks upsample by repeating each pixel 2 x 2 times and then run a 3x3 conv
(padding 1) at the doubled size. Every output pixel of one phase (even or odd row, even or odd
column) then sees the same 2 x 2 neighbourhood of low-resolution pixels, each weighted by a sum of
kernel taps: for even rows, the row above gets the kernel's top row and the own row its middle and
bottom rows; for odd rows, the own row gets the top and middle rows and the row below the bottom
row (columns alike). So the whole thing is one 2x2 conv at the low resolution whose 4 x C_out
outputs are the four phases, interleaved afterwards: 16 instead of 36 multiply-adds per low-res
pixel and channel pair, 2.25x fewer, and a wider matmul (4 x C_out columns) for the CPU's vector
units. The parameters stay the 3x3 kernel and the bias (the phase kernel is a fixed linear map of
them), so checkpoints and initialisation are those of the conv it replaces, and the values agree to
float32 rounding (tests/test_upsample_conv.py).

The 2x2 conv's filter gradient gets its own backward: XLA:CPU computes a padded 2x2 conv's filter
gradient on a slow path (5.7 s at (8, 66, 66, 64) -> 256 channels, against 0.1 s for a 3x3 one), so
the filter gradient here is four explicit matmuls, one per tap.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DIMS = ("NHWC", "HWIO", "NHWC")

# PHASE_TAPS[phase, tap, row]: which rows of the 3x3 kernel act on low-res row i - 1 + phase + tap
# for the output row 2i + phase (the same map for columns).
PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def phase_kernel(kernel: jax.Array) -> jax.Array:
    """(3, 3, C, O) -> (2, 2, C, 4O): the 2x2 kernel whose output channel (a, b, o) is phase (a, b).

    The tap sums run in float32 whatever the kernel's dtype, and the result is float32."""
    c, o = kernel.shape[2:]
    k2 = jnp.einsum("atu,bsv,uvio->tsiabo", PHASE_TAPS, PHASE_TAPS, kernel.astype(jnp.float32))
    return k2.reshape(2, 2, c, 4 * o)


def _conv2x2(xp: jax.Array, k2: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(xp, k2, (1, 1), "VALID", dimension_numbers=_DIMS)


@jax.custom_vjp
def conv2x2(xp: jax.Array, k2: jax.Array) -> jax.Array:
    """A 'valid' 2x2 conv: (B, H+1, W+1, C), (2, 2, C, N) -> (B, H, W, N), with a matmul filter gradient."""
    return _conv2x2(xp, k2)


def _conv2x2_fwd(xp, k2):
    return _conv2x2(xp, k2), (xp, k2)


def _conv2x2_bwd(saved, dy):
    xp, k2 = saved
    (dx,) = jax.linear_transpose(lambda a: _conv2x2(a, k2), xp)(dy)  # XLA's own input gradient: fast
    h, w, n = dy.shape[1:]
    c = xp.shape[-1]
    dy_rows = dy.reshape(-1, n)  # (B*H*W, N)
    dk = jnp.stack(  # (2, 2, C, N): tap (t, s) sees the input shifted by (t, s)
        [
            jnp.stack(
                [
                    jnp.dot(xp[:, t : t + h, s : s + w].reshape(-1, c).T, dy_rows, preferred_element_type=jnp.float32)
                    for s in (0, 1)
                ]
            )
            for t in (0, 1)
        ]
    )
    return dx, dk.astype(k2.dtype)


conv2x2.defvjp(_conv2x2_fwd, _conv2x2_bwd)


def upsample_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """conv3x3(nearest-upsample-2x(x)) with padding 1, no bias, in x's dtype:
    (B, H, W, C), (3, 3, C, O) -> (B, 2H, 2W, O)."""
    b, h, w, _ = x.shape
    o = kernel.shape[-1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # (B, H+2, W+2, C)
    y = conv2x2(xp, phase_kernel(kernel).astype(x.dtype)).reshape(b, h + 1, w + 1, 2, 2, o)
    # Phase (a, c) of low-res pixel (i, j) sits at y[i + a, j + c, a, c]: its 2x2 window starts at
    # padded row i + a, i.e. low-res row i - 1 + a.
    rows = [jnp.stack([y[:, a : a + h, c : c + w, a, c] for c in (0, 1)], axis=3) for a in (0, 1)]  # (B, H, W, 2, O)
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, o)  # (B, H, 2, W, 2, O) -> (B, 2H, 2W, O)


class UpsampleConv3x3(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (padding 1), as `upsample_conv3x3`: (B, H, W, C) -> (B, 2H, 2W, O).

    Holds the same parameters as the `nn.Conv(O, (3, 3))` it replaces ('kernel' (3, 3, C, O), 'bias'
    (O,)), with nn.Conv's initialisers; the bias add runs in float32 like `layers.Conv`.
    """

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.linear.default_kernel_init, (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        dtype = self.dtype or x.dtype
        y = upsample_conv3x3(x.astype(dtype), kernel)
        y = y + bias  # float32 bias add (promotes a 16-bit y), as layers.Conv
        return y.astype(dtype)
