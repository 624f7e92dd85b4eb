"""The data.synthesis families (crack, pore, intensity, blur; perlin and cutpaste by share): changes only
inside the foreground, labels exactly where pixels visibly change, crack widths, shares, determinism,
parsing of the option."""

import collections

import numpy as np
import pytest

from diff_fastener_jax import config as C
from diff_fastener_jax.config_schema import SYNTHESIS_FAMILIES, parse_synthesis
from diff_fastener_jax.data import defect_families as D
from diff_fastener_jax.data import synthesis

H, W = 48, 64


def _textured_image():
    """Mid-grey noise with some structure (so blur shows), float32 (H, W, 3) in [-1, 1]."""
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 0.15, (H, W, 1)) + 0.3 * np.sin(np.arange(W) / 2.0)[None, :, None]
    return np.clip(np.repeat(x, 3, axis=-1), -0.9, 0.9).astype(np.float32)


def _foreground():
    fg = np.zeros((H, W), bool)
    fg[6:40, 10:50] = True
    return fg


def _largest_square(mask):
    """Side of the largest all-True square block in a bool mask (dynamic programming)."""
    best = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.int64)
    for y in range(mask.shape[0]):
        for x in range(mask.shape[1]):
            if mask[y, x]:
                best[y + 1, x + 1] = 1 + min(best[y, x], best[y + 1, x], best[y, x + 1])
    return int(best.max())


@pytest.mark.parametrize("family", sorted(D.DRAW))
def test_family_changes_only_foreground_pixels_and_labels_exactly_the_visible_change(family):
    x, fg = _textured_image(), _foreground()
    nonempty = 0
    for seed in range(12):
        out, mask = D.DRAW[family](x, fg, np.random.default_rng(seed))
        assert out.shape == x.shape and out.dtype == np.float32 and mask.dtype == bool
        changed = np.any(out != x, axis=-1)
        assert not (changed & ~fg).any()  # nothing outside the foreground
        np.testing.assert_array_equal(mask, changed)  # the label is exactly what changed ...
        delta = np.abs(out.astype(np.float64) - x).mean(axis=-1)
        assert (delta[mask] > D.VISIBLE_CHANGE).all()  # ... and every labelled change is visible
        assert out.min() >= -1.0 and out.max() <= 1.0
        nonempty += bool(mask.any())
    assert nonempty >= 10


@pytest.mark.parametrize("family", sorted(D.DRAW))
def test_family_is_deterministic_per_generator(family):
    x, fg = _textured_image(), _foreground()
    a = D.DRAW[family](x, fg, np.random.default_rng(7))
    b = D.DRAW[family](x, fg, np.random.default_rng(7))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = D.DRAW[family](x, fg, np.random.default_rng(8))
    assert not np.array_equal(a[1], c[1])


def test_crack_strokes_are_one_to_three_pixels_wide():
    """A stroke of width w never holds a (w + 1)-px square where w >= 2 (a 1-px stroke may hold a
    2 x 2 block at a diagonal step), never a 4-px one, and 3-px strokes really are wider."""
    fg = np.ones((H, W), bool)
    for width in (1, 2, 3):
        sides = [_largest_square(D.crack_stroke((H, W), fg, np.random.default_rng(s), width)) for s in range(20)]
        assert max(sides) <= max(2, width), (width, sides)
        if width == 3:  # a diagonal 3-px stroke holds only 2 x 2 blocks; most hold 3 x 3 ones
            assert sides.count(3) > len(sides) // 2
    x = _textured_image()
    for seed in range(20):  # the labelled crack is part of its stroke: at most 3 px wide as well
        _, mask = D.draw_crack(x, fg, np.random.default_rng(seed))
        assert mask.any() and _largest_square(mask) <= 3


def test_pores_are_small_spots():
    x, fg = _textured_image(), _foreground()
    for seed in range(10):
        _, mask = D.draw_pore(x, fg, np.random.default_rng(seed))
        # at most 3 disks of radius <= 3.5 px
        assert 0 < mask.sum() <= 3 * np.pi * 3.5**2


def test_blur_on_a_flat_image_changes_nothing_and_synthesis_falls_back_to_a_blend():
    flat = np.zeros((H, W, 3), np.float32)
    out, mask = D.draw_blur(flat, np.ones((H, W), bool), np.random.default_rng(0))
    assert not mask.any() and np.array_equal(out, flat)
    out, m, beta = synthesis.synthesize_anomaly(
        flat, np.random.default_rng(0), fg_mode="full", families=parse_synthesis("blur")
    )
    assert m.any() and 0.2 <= beta < 0.8  # the Perlin blend, never an empty anomaly


def test_shares_are_respected_over_many_draws():
    families = parse_synthesis("perlin:0.5,crack:0.3,pore:0.2")
    rng = np.random.default_rng(0)
    counts = collections.Counter(synthesis.choose_family(families, rng) for _ in range(1000))
    assert counts == {"perlin": 473, "crack": 315, "pore": 212}  # pinned: seed 0


def test_synthesize_anomaly_with_families_stays_in_the_foreground_and_is_deterministic():
    x, fg = _textured_image(), _foreground()
    spec = parse_synthesis("perlin:0.2,cutpaste:0.2,crack:0.15,pore:0.15,intensity:0.15,blur:0.15")
    for seed in range(16):
        out, m, beta = synthesis.synthesize_anomaly(x, np.random.default_rng(seed), foreground=fg, families=spec)
        assert m.shape == (H, W, 1) and m.any() and not ((m[..., 0] > 0) & ~fg).any()
        assert not np.any(out != x, axis=-1)[~fg].any()
        again = synthesis.synthesize_anomaly(x, np.random.default_rng(seed), foreground=fg, families=spec)
        np.testing.assert_array_equal(out, again[0])


def test_every_family_in_the_schema_is_implemented():
    assert set(SYNTHESIS_FAMILIES) == {"perlin", "cutpaste", *D.DRAW}


def test_parse_synthesis_normalises_shares_and_names_bad_parts():
    assert parse_synthesis("") == ()
    assert parse_synthesis("crack") == (("crack", 1.0),)
    assert parse_synthesis(" perlin:3, pore:1 ") == (("perlin", 0.75), ("pore", 0.25))
    for text, message in (
        ("crak:1", "unknown synthesis family 'crak'"),
        ("pore:0", "must be a positive"),
        ("pore:x", "is not a number"),
        ("pore,pore", "twice"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_synthesis(text)


def test_validate_names_data_synthesis():
    c = C.base_config()
    C.apply_overrides(c, {"data.synthesis": "perlin:0.5,scratch:0.5"})
    with pytest.raises(C.ConfigError, match="data.synthesis: unknown synthesis family 'scratch'"):
        C.validate_data(c, check_data=False)
    C.apply_overrides(c, {"data.synthesis": "perlin:0.8,cutpaste:0.2", "data.cutpaste_prob": 0.2})
    with pytest.raises(C.ConfigError, match="both set the cut-paste share"):
        C.validate_data(c, check_data=False)


def test_a_saved_config_with_only_cutpaste_prob_keeps_its_meaning(tmp_path):
    """A run's config.json without the newer data keys loads with their defaults: the paper's synthesis
    with its cutpaste_prob share, whole-image training, the square resize."""
    import json

    from diff_fastener_jax.data import pipeline

    saved = C.base_config().to_dict()
    for key in ("synthesis", "patch_size", "resize", "val_anomalies"):
        del saved["data"][key]
    saved["data"]["cutpaste_prob"] = 0.3
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = C.config_from_json(str(tmp_path / "config.json"))
    C.validate_data(config, check_data=False)
    synth = pipeline._synthesizer(config, None)
    assert (synth.cutpaste_prob, synth.families, synth.patch_size) == (0.3, (), 0)
    assert config.data.resize == "square"
