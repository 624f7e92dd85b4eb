"""Perlin masks and anomaly synthesis: masks binary and non-empty, changes only inside the mask, the
blend formula, beta range, foreground handling, texture folders, reproducibility."""

import numpy as np
import pytest
from PIL import Image

from diff_fastener_jax.data import perlin, synthesis
from diff_fastener_jax.data.datasets import DatasetError

H = W = 32


def _object_image(dark_background=True):
    """A bright square on a dark background (or the inverse), float32 (H, W, 3) in [-1, 1]."""
    x = np.full((H, W, 3), -0.8 if dark_background else 0.8, np.float32)
    x[8:24, 10:26] = 0.7 if dark_background else -0.7
    x += np.random.default_rng(0).normal(0, 0.02, x.shape).astype(np.float32)
    return x


def test_perlin_noise_range_shape_and_determinism():
    n = perlin.perlin_noise((H, W + 8), (4, 2), np.random.default_rng(0), angle_deg=30.0)
    assert n.shape == (H, W + 8) and n.dtype == np.float32
    assert np.abs(n).max() <= 1.0 and n.std() > 0.05
    assert np.array_equal(n, perlin.perlin_noise((H, W + 8), (4, 2), np.random.default_rng(0), 30.0))
    # The paper's range 2^0..2^5 at 256 px; smaller images keep lattice cells >= 8 px.
    assert [perlin.max_scale_exponent(s) for s in (512, 256, 128, 64, 32, 16, 8, 1)] == [5, 5, 4, 3, 2, 1, 0, 0]


def _component_sizes(mask):
    """Pixel counts of the 4-connected components of a bool mask (plain BFS, no scipy needed)."""
    seen, sizes = np.zeros_like(mask), []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, n = [(y0, x0)], 0
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            n += 1
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        sizes.append(n)
    return sizes


def test_perlin_masks_at_64px_are_blobs_not_speckle():
    """At 64 px the paper's finest scale (2^5 cells) would make 2-px cells: masks of specks and slivers.
    With cells >= 8 px, most anomaly pixels belong to blobs of >= 20 px (a demo clip covers about 60)."""
    rng = np.random.default_rng(0)
    sizes = [s for _ in range(200) for s in _component_sizes(perlin.perlin_mask((64, 64), rng))]
    sizes = np.asarray(sizes)
    assert sizes.size > 50
    assert sizes[sizes >= 20].sum() / sizes.sum() > 0.9


def test_perlin_mask_reproducible():
    a = perlin.perlin_mask((H, W), np.random.default_rng(3))
    assert a.dtype == bool and np.array_equal(a, perlin.perlin_mask((H, W), np.random.default_rng(3)))


def test_anomaly_mask_never_empty_and_inside_foreground():
    fg = np.zeros((H, W), bool)
    fg[5, 7] = True  # a single foreground pixel: Perlin almost surely misses it -> rectangle fallback
    for seed in range(5):
        m = synthesis.anomaly_mask((H, W), np.random.default_rng(seed), fg)
        assert m.any() and not (m & ~fg).any()
    big = np.zeros((H, W), bool)
    big[:, : W // 2] = True
    for seed in range(5):
        m = synthesis.anomaly_mask((H, W), np.random.default_rng(seed), big)
        assert m.any() and not (m & ~big).any()


@pytest.mark.parametrize("fg_mode", ["otsu", "full"])
def test_synthesis_changes_only_inside_a_binary_mask(fg_mode):
    x = _object_image()
    for seed in range(12):
        out, m, beta = synthesis.synthesize_anomaly(x, np.random.default_rng(seed), fg_mode=fg_mode)
        assert out.shape == x.shape and out.dtype == np.float32
        assert m.shape == (H, W, 1) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0} and m.sum() > 0
        assert 0.2 <= beta < 0.8
        outside = m[..., 0] == 0
        assert np.array_equal(out[outside], x[outside])
        assert out.min() >= -1.0 and out.max() <= 1.0
        if fg_mode == "otsu":  # the anomaly lands on the object (the bright square)
            assert not m[..., 0][:8].any() and not m[..., 0][24:].any()


def test_synthesis_reproducible_under_seed():
    x = _object_image()
    a = synthesis.synthesize_anomaly(x, np.random.default_rng(7))
    b = synthesis.synthesize_anomaly(x, np.random.default_rng(7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    c = synthesis.synthesize_anomaly(x, np.random.default_rng(8))
    assert not np.array_equal(a[1], c[1]) or not np.array_equal(a[0], c[0])


def test_blend_formula(monkeypatch):
    """out = x (1 - M) + (1 - b) src M + b x M, with src the anomaly source."""
    monkeypatch.setattr(synthesis, "anomaly_source", lambda x01, rng, bank=None: np.full_like(x01, 1.0))
    x = _object_image()
    out, m, beta = synthesis.synthesize_anomaly(x, np.random.default_rng(1), fg_mode="full")
    expected = x * (1 - m) + (1 - beta) * 1.0 * m + beta * x * m
    np.testing.assert_allclose(out, np.clip(expected, -1, 1), atol=1e-6)


def test_given_foreground_restricts_the_mask():
    fg = np.zeros((H, W, 1), np.float32)
    fg[:, 20:] = 1
    for seed in range(5):
        _, m, _ = synthesis.synthesize_anomaly(_object_image(), np.random.default_rng(seed), foreground=fg)
        assert m.sum() > 0 and not m[:, :20].any()


def test_otsu_foreground_picks_the_object_either_polarity():
    for dark_bg in (True, False):
        fg = synthesis.foreground_mask(_object_image(dark_bg), "otsu")
        assert fg[8:24, 10:26].all() and not fg[:8].any()
    assert synthesis.foreground_mask(_object_image(), "full").all()
    assert synthesis.foreground_mask(np.zeros((H, W, 3), np.float32), "otsu").all()  # flat: whole image
    with pytest.raises(ValueError, match="data.foreground"):
        synthesis.foreground_mask(_object_image(), "grabcut")


def test_augment_and_strip_shuffle_keep_shape_and_range():
    rng = np.random.default_rng(0)
    x01 = (_object_image() + 1) / 2
    for _ in range(10):
        y = synthesis.augment(x01, rng)
        assert y.shape == x01.shape and y.min() >= 0 and y.max() <= 1
    s = synthesis.strip_shuffle(x01, rng)
    assert s.shape == x01.shape
    np.testing.assert_array_equal(np.sort(s.ravel()), np.sort(x01.ravel()))  # a permutation of pixels
    for _ in range(8):
        t = synthesis.procedural_texture((H, W), rng)
        assert t.shape == (H, W, 3) and t.min() >= 0 and t.max() <= 1


def test_texture_bank_source(tmp_path):
    (tmp_path / "dtd" / "striped").mkdir(parents=True)
    for i, color in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.fromarray(np.full((40, 50, 3), color, np.uint8)).save(tmp_path / "dtd" / "striped" / f"{i}.jpg")
    bank = synthesis.TextureBank(str(tmp_path / "dtd"))
    assert len(bank) == 2
    t = bank.sample(np.random.default_rng(0), (H, W))
    assert t.shape == (H, W, 3) and t.min() >= 0 and t.max() <= 1
    out, m, _ = synthesis.synthesize_anomaly(_object_image(), np.random.default_rng(0), texture_bank=bank)
    assert m.sum() > 0 and np.array_equal(out[m[..., 0] == 0], _object_image()[m[..., 0] == 0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="contains no images"):
        synthesis.TextureBank(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="does not exist"):
        synthesis.TextureBank(str(tmp_path / "nope"))


def test_cutpaste_pastes_a_shifted_copy_of_the_image_opaquely():
    """data.cutpaste_prob=1: inside the mask the pixels are the image's own, rolled by >= 1/8 of its size
    along some axis (beta 0); outside, unchanged."""
    x = np.random.default_rng(0).uniform(-1, 1, (H, W, 3)).astype(np.float32)  # every pixel unique
    x[0, 0] = x[0, 1] + 0.01  # two near-equal pixels: wherever one is pasted on the other, no change
    for seed in range(8):
        out, m, beta = synthesis.synthesize_anomaly(x, np.random.default_rng(seed), fg_mode="full", cutpaste_prob=1.0)
        inside = m[..., 0] > 0
        assert beta == 0.0 and inside.any()
        assert np.array_equal(out[~inside], x[~inside])
        offsets = [
            (dy, dx)
            for dy in range(-H // 2 + 1, H // 2 + 1)
            for dx in range(-W // 2 + 1, W // 2 + 1)
            if np.array_equal(out[inside], np.roll(x, (dy, dx), axis=(0, 1))[inside])
        ]
        assert len(offsets) == 1
        dy, dx = offsets[0]
        assert max(abs(dy) / H, abs(dx) / W) >= 1 / 8
        # The mask holds exactly the pixels that changed by more than the threshold.
        moved = np.roll(x, (dy, dx), axis=(0, 1))
        assert (np.abs(moved - x).mean(-1)[inside] > synthesis.CUTPASTE_MIN_CHANGE).all()


def test_cutpaste_labels_only_visible_changes():
    """A flat image pasted on itself changes nothing: no cut-paste label, the blended texture instead."""
    x = np.full((H, W, 3), 0.3, np.float32)
    for seed in range(6):
        out, m, beta = synthesis.synthesize_anomaly(x, np.random.default_rng(seed), fg_mode="full", cutpaste_prob=1.0)
        assert 0.2 <= beta < 0.8 and m.sum() > 0  # fell back to the paper's synthesis
    stripes = np.zeros((H, W, 3), np.float32)
    stripes[:, : W // 2] = 0.8  # left half bright: only pastes across the edge are labelled
    cut = 0
    for seed in range(6):
        out, m, beta = synthesis.synthesize_anomaly(
            stripes, np.random.default_rng(seed), fg_mode="full", cutpaste_prob=1.0
        )
        if beta == 0.0:
            cut += 1
            assert np.abs(out - stripes).mean(-1)[m[..., 0] > 0].min() > 0.5
            assert np.array_equal(out[m[..., 0] == 0], stripes[m[..., 0] == 0])
    assert cut >= 2


def test_cutpaste_off_draws_exactly_the_papers_synthesis():
    x = _object_image()
    a = synthesis.synthesize_anomaly(x, np.random.default_rng(5))
    b = synthesis.synthesize_anomaly(x, np.random.default_rng(5), cutpaste_prob=0.0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    betas = [synthesis.synthesize_anomaly(x, np.random.default_rng(s), cutpaste_prob=0.5)[2] for s in range(40)]
    assert 10 <= sum(b == 0.0 for b in betas) <= 30  # about half cut-paste, the rest blended textures
