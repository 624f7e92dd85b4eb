r"""CPU demo on the built-in SYNTHETIC rail-fastener scenes (generated into the workdir on first use).

Command (600 steps of 8 images at 64 px: 10.5 minutes measured on 2 free CPU cores; then evaluate
and write the HTML report, 16 s):

  python -m diff_fastener_jax.train --config configs/demo.py --workdir runs/demo
  python -m diff_fastener_jax.evaluate --workdir runs/demo

What it reached (2026-11-27): image AUROC 0.73 on the demo test split (displaced clips 1.00, broken
0.65, missing 0.55; 0.83 with --config.infer.map=recon_error). The same settings on the real MPDD
metal_plate images (--config.data.format=mvtec --config.data.root=../shared/data
--config.data.category=mpdd_metal_plate) reached image AUROC 0.997 / pixel AUROC 0.978.

`configs/demo.py:smoke` is a seconds-long version (32 px, tiny widths) used by the test suite.
"""

import os
import sys

import ml_collections

# Config files are loaded by path; make `configs` importable from any working directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # noqa: E402


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Demo settings; `arg='smoke'` shrinks everything for tests."""
    if arg not in (None, "", "smoke"):
        raise ValueError(f"configs/demo.py: unknown preset {arg!r}; use no preset or 'smoke'")
    c = default.get_config("demo")
    c.data.image_size = 64
    c.data.num_workers = 0
    c.data.demo_n_train = 64
    c.data.demo_n_test = 48
    c.model.base_channels = 32
    c.model.channel_mults = (1, 2, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attention_resolutions = (8,)
    c.model.num_heads = 4
    c.model.num_groups = 8
    c.model.dacm_reduction = 8
    c.model.skip_every = 2  # = num_res_blocks + 1: one skip per level
    c.model.seg_channels = (16, 32, 64, 64)
    c.optim.lr_recon = 3e-4
    c.optim.lr_seg = 3e-4
    c.train.batch_size = 8
    c.train.num_steps = 600
    c.train.log_every = 20
    c.train.checkpoint_every = 200
    c.train.eval_every = 200
    c.train.val_batches = 2
    c.infer.batch_size = 16
    if arg == "smoke":
        c.data.image_size = 32
        c.data.demo_n_train = 12
        c.data.demo_n_test = 12
        c.model.base_channels = 16
        c.model.channel_mults = (1, 2)
        c.model.attention_resolutions = (16,)
        c.model.num_heads = 2
        c.model.num_groups = 4
        c.model.dacm_reduction = 4
        c.model.seg_channels = (8, 16)
        c.train.batch_size = 8  # 2 per device on the 4 simulated test devices
        c.train.num_steps = 6
        c.train.log_every = 2
        c.train.checkpoint_every = 3
        c.train.eval_every = 3
        c.train.val_batches = 1
        c.infer.batch_size = 8
    return c
