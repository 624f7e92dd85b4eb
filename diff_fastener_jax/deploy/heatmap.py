"""Anomaly maps as pictures: the 'jet' colour map over the image, in numpy alone.

predict, serve and the evaluation report draw the same overlay. The colour map is matplotlib's 'jet'
(its piecewise-linear segments sampled into the same 256-entry table, looked up the same way), so
the service needs no plotting library.
"""

from __future__ import annotations

import numpy as np

# matplotlib's 'jet': per channel, (position, value) knots of a piecewise-linear ramp over [0, 1]
_JET_KNOTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
_LUT_SIZE = 256


def _ramp(knots) -> np.ndarray:
    """(256,) float64: one channel's ramp sampled at 256 evenly spaced positions, with the arithmetic
    of matplotlib's lookup tables (so that the blended pixels round the same way)."""
    x = np.array([k[0] for k in knots]) * (_LUT_SIZE - 1)
    y = np.array([k[1] for k in knots])
    xind = (_LUT_SIZE - 1) * np.linspace(0, 1, _LUT_SIZE)
    ind = np.searchsorted(x, xind)[1:-1]
    distance = (xind[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
    inner = distance * (y[ind] - y[ind - 1]) + y[ind - 1]
    return np.clip(np.concatenate([[y[0]], inner, [y[-1]]]), 0.0, 1.0)


def _jet_table() -> np.ndarray:
    """(256, 3) float64 RGB in [0, 1]."""
    return np.stack([_ramp(_JET_KNOTS[c]) for c in ("red", "green", "blue")], axis=-1)


_JET = _jet_table()


def jet(values) -> np.ndarray:
    """Values in [0, 1] (any shape S; NaN counts as 0, the rest is clipped) -> (*S, 3) float RGB in [0, 1]."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float32)), 0.0, 1.0)
    index = np.minimum((v * _LUT_SIZE).astype(np.int64), _LUT_SIZE - 1)
    return _JET[index]


def heat_overlay(rgb: np.ndarray, amap, where: str) -> np.ndarray:
    """Anomaly map (H, W) in [0, 1] through the 'jet' colour map, blended 50/50 over the (H, W, 3) uint8
    image. Returns (H, W, 3) uint8; ValueError naming `where` when the shapes differ."""
    a = np.asarray(amap, dtype=np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.shape != rgb.shape[:2]:
        raise ValueError(f"{where}: anomaly_map shape {a.shape} does not match the image's {rgb.shape[:2]}")
    heat = jet(a)  # (H, W, 3) in [0, 1]
    return np.round(0.5 * rgb.astype(np.float32) + 0.5 * 255.0 * heat).astype(np.uint8)
