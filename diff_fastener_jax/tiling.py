"""Tiles for patch-trained models: cut an image into overlapping P x P tiles and stitch per-tile maps back.

A plan per image axis (`axis_plan`) holds the tile origins and, for every output pixel, the (tile,
offset) entries that cover it with their weights. The weights come from a Hann window (positive at
every offset, so edge pixels covered by one tile keep that tile's value) and are normalised per pixel,
so they sum to one at every pixel. A 2-D weight is the product of the two axes' weights: the window is
separable and the tiles form a grid, so the product sums to one too.

Both directions are static gathers (`jnp.take` with numpy indices) inside the jitted program: no Python
loop over tiles at run time, and the tiles of every image run through the network as one batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class AxisPlan(NamedTuple):
    """How tiles of `tile` px cover one image axis of `length` px."""

    origins: np.ndarray  # (T,) int: first pixel of each tile
    gather: np.ndarray  # (length, K) int32: indices into the (T * tile) concatenated tile axis
    weight: np.ndarray  # (length, K) float64: per-pixel weights of those entries, summing to one (0 = padding)


def tile_origins(length: int, tile: int, stride: int) -> np.ndarray:
    """Tile starts every `stride` px from 0; the last tile ends at the edge. (T,) int."""
    if not 0 < tile <= length:
        raise ValueError(f"tiling: a tile of {tile} px does not fit an image side of {length} px")
    if stride <= 0 or stride > tile:
        raise ValueError(f"tiling: stride {stride} must be in [1, tile={tile}] so that tiles overlap or touch")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return np.asarray(starts, np.int64)


def hann_window(tile: int) -> np.ndarray:
    """(tile,) float64 sin²(pi (i + 1/2) / tile): positive everywhere; at a stride of tile/2 two
    neighbouring windows sum to exactly one (sin² + cos²)."""
    return np.sin(np.pi * (np.arange(tile) + 0.5) / tile) ** 2


def axis_plan(length: int, tile: int, stride: int) -> AxisPlan:
    """The tiles along one axis and the normalised weights that stitch them back (see `AxisPlan`)."""
    origins = tile_origins(length, tile, stride)
    window = hann_window(tile)
    entries: list[list[tuple[int, float]]] = [[] for _ in range(length)]
    for t, o in enumerate(origins):
        for i in range(tile):
            entries[o + i].append((t * tile + i, window[i]))
    k = max(len(e) for e in entries)
    gather = np.zeros((length, k), np.int32)
    weight = np.zeros((length, k), np.float64)
    for x, e in enumerate(entries):
        total = sum(w for _, w in e)
        for j, (idx, w) in enumerate(e):
            gather[x, j], weight[x, j] = idx, w / total
    return AxisPlan(origins, gather, weight)


def stitch_weights(plan_h: AxisPlan, plan_w: AxisPlan) -> np.ndarray:
    """(Ty, Tx, H, W) float64: the weight of each tile at each image pixel (zero outside the tile).
    For tests and documentation; the program itself uses the separable gathers."""
    ty, tx = len(plan_h.origins), len(plan_w.origins)
    tile_h = _dense(plan_h).reshape(ty, -1, plan_h.gather.shape[0]).sum(1)  # (Ty, H)
    tile_w = _dense(plan_w).reshape(tx, -1, plan_w.gather.shape[0]).sum(1)  # (Tx, W)
    return tile_h[:, None, :, None] * tile_w[None, :, None, :]


def _dense(plan: AxisPlan) -> np.ndarray:
    """(T * tile, length) float64: the weight of each tile pixel at each image pixel."""
    length, k = plan.gather.shape
    rows = int(plan.gather.max()) + 1
    dense = np.zeros((rows, length))
    for j in range(k):
        np.add.at(dense, (plan.gather[:, j], np.arange(length)), plan.weight[:, j])
    return dense


def extract_tiles(images: jax.Array, plan_h: AxisPlan, plan_w: AxisPlan, tile: int) -> jax.Array:
    """(N, H, W, C) -> (N * Ty * Tx, tile, tile, C): every image's tiles, row-major, image after image."""
    n, c = images.shape[0], images.shape[-1]
    ty, tx = len(plan_h.origins), len(plan_w.origins)
    rows = (plan_h.origins[:, None] + np.arange(tile)).reshape(-1).astype(np.int32)  # (Ty * tile,)
    cols = (plan_w.origins[:, None] + np.arange(tile)).reshape(-1).astype(np.int32)  # (Tx * tile,)
    x = jnp.take(jnp.take(images, rows, axis=1), cols, axis=2)  # (N, Ty * tile, Tx * tile, C)
    x = x.reshape(n, ty, tile, tx, tile, c).transpose(0, 1, 3, 2, 4, 5)  # (N, Ty, Tx, tile, tile, C)
    return x.reshape(n * ty * tx, tile, tile, c)


def stitch_tiles(tiles: jax.Array, plan_h: AxisPlan, plan_w: AxisPlan) -> jax.Array:
    """(N * Ty * Tx, tile, tile, *rest) -> (N, H, W, *rest): the weighted sum of the tiles at every pixel."""
    ty, tx = len(plan_h.origins), len(plan_w.origins)
    tile, rest = tiles.shape[1], tiles.shape[3:]
    x = tiles.reshape((-1, ty, tx, tile, tile) + rest).transpose((0, 1, 3, 2, 4) + tuple(range(5, 5 + len(rest))))
    x = x.reshape((-1, ty * tile, tx * tile) + rest)  # (N, Ty * tile, Tx * tile, *rest)
    extra = (1,) * len(rest)
    wy = plan_h.weight.astype(np.float32).reshape(plan_h.weight.shape + (1,) + extra)  # (H, Ky, 1, ...)
    x = jnp.sum(jnp.take(x, plan_h.gather, axis=1) * wy, axis=2)  # (N, H, Tx * tile, *rest)
    wx = plan_w.weight.astype(np.float32).reshape(plan_w.weight.shape + extra)  # (W, Kx, ...)
    return jnp.sum(jnp.take(x, plan_w.gather, axis=2) * wx, axis=3)  # (N, H, W, *rest)
