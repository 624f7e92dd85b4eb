r"""Ablation: the DiffusionAD-equivalent reconstruction network (SiLU, dense skips, no DACM).

Command:

    python -m diff_fastener_jax.train --config configs/dense_reference.py:mvtec \
        --config.data.root=/data/mvtec --config.data.category=bottle --workdir runs/bottle_dense

Its reconstruction U-Net has 131.65 M parameters at 256², base 128, which pins our architecture to
the published reference (tests/test_models.py checks it); the segmentation U-Net has 28.37 M.
"""

import ml_collections

# Config files are loaded by path (absl's config_flags, config.load_config): import from the installed
# package only, never from `configs`, so that no working directory or import path is assumed.
from diff_fastener_jax.config_schema import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The paper's settings with the three Diff-Fastener changes to the U-Net undone; `arg` selects the
    data preset (mvtec, visa, fastener, demo) as in configs/default.py."""
    c = base_config(arg or "mvtec")
    c.model.activation = "silu"
    c.model.skip_every = 1
    c.model.use_dacm = False
    return c
