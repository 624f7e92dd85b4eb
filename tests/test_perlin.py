"""Perlin noise: a (cells + 1)-corner lattice, so every scale (even one cell per axis) yields masks."""

import numpy as np
import pytest

from diff_fastener_jax.data import perlin


def _draws(cells, n=300, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [perlin.perlin_noise((size, size), cells, rng, rng.uniform(-90.0, 90.0)) for _ in range(n)]


@pytest.mark.parametrize(
    "cells, min_nonempty, min_peak",
    [
        ((1, 1), 0.25, 0.8),  # a wrapped lattice gave 0% non-empty masks and peak 0.29 here
        ((1, 8), 0.9, 0.9),  # ... and peak 0.69 here
        ((8, 1), 0.9, 0.9),
        ((2, 2), 0.7, 0.9),
        ((32, 32), 0.99, 0.9),
    ],
)
def test_every_scale_reaches_the_mask_threshold(cells, min_nonempty, min_peak):
    noises = _draws(cells)
    nonempty = np.mean([(n > 0.5).any() for n in noises])
    peak = max(float(np.abs(n).max()) for n in noises)
    assert nonempty >= min_nonempty, (cells, nonempty)
    assert peak >= min_peak, (cells, peak)
    assert all(np.abs(n).max() <= np.sqrt(2.0) for n in noises)  # bounded: |n| <= sqrt(2)


@pytest.mark.parametrize("cells", [(1, 1), (2, 3), (8, 1)])
def test_unrotated_lattice_has_cells_plus_one_gradients_per_axis(cells):
    # The gradient angles are the only draws: (cy + 1) * (cx + 1) uniforms.
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    perlin.perlin_noise((32, 32), cells, rng)
    ref.uniform(size=(cells[0] + 1) * (cells[1] + 1))
    assert rng.random() == ref.random()


def test_single_cell_corners_are_independent():
    # One cell, no rotation: noise = bilinear-faded blend of four corner gradients. Opposite edges
    # must differ (a wrapped lattice made the left and right edges mirror one shared gradient).
    n = perlin.perlin_noise((64, 64), (1, 1), np.random.default_rng(3))
    assert n.shape == (64, 64) and n.dtype == np.float32
    # Reference in float64 from the same four gradients.
    theta = np.random.default_rng(3).uniform(0.0, 2.0 * np.pi, size=(2, 2))
    u = (np.arange(64) + 0.5) / 64
    fu, fv = np.meshgrid(u, u, indexing="ij")
    fade = lambda t: 6 * t**5 - 15 * t**4 + 10 * t**3  # noqa: E731
    d = {(a, b): np.cos(theta[a, b]) * (fu - a) + np.sin(theta[a, b]) * (fv - b) for a in (0, 1) for b in (0, 1)}
    top = d[0, 0] + fade(fv) * (d[0, 1] - d[0, 0])
    bot = d[1, 0] + fade(fv) * (d[1, 1] - d[1, 0])
    ref = np.sqrt(2.0) * (top + fade(fu) * (bot - top))
    np.testing.assert_allclose(n, ref, atol=1e-5)


def test_rotation_keeps_shape_and_is_deterministic():
    a = perlin.perlin_noise((40, 24), (2, 4), np.random.default_rng(1), angle_deg=37.0)
    b = perlin.perlin_noise((40, 24), (2, 4), np.random.default_rng(1), angle_deg=37.0)
    assert a.shape == (40, 24) and np.array_equal(a, b) and np.isfinite(a).all()
