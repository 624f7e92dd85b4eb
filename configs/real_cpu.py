r"""Real inspection data on a CPU: a small model trained on 128 px patches of 256 px images, scored by tiles.

Commands (an MVTec-style category: <root>/<category>/train/good, test/<type>/, optional ground_truth/;
`--config.data.format=folder` for the normal/ + abnormal/ folder layout):

  python -m diff_fastener_jax.train --config configs/real_cpu.py --workdir W \
      --config.data.root=R --config.data.category=C
  python -m diff_fastener_jax.evaluate --workdir W

Recipe:
- Resolution: images resized to 256 x 256 (`data.image_size`; '--config.data.resize=short_side' keeps
  the aspect ratio of non-square images), four times the side of the 64 px demo.
- Training: random 128 x 128 crops (`data.patch_size`), half the image's side: enough context to tell
  a broken rim from a normal one, at a quarter of a whole-image step. The synthetic anomalies are drawn
  inside the crop from a mix of families sized like real inspection defects (Perlin blends, some
  cut-paste, thin cracks and scratches, pores, low-contrast patches, blur); the plain noise target.
  Where they go (`data.foreground='auto'`): inside the object when the training normals show one
  object on a background, anywhere on a surface or texture; decided once when training starts.
- Model: the demo widths (base 32, one res block per level, attention in the 16 x 16 middle), noise
  steps within 50 of the two that inference uses.
- Optimiser: batch 4 (2 normal + 2 synthetic crops), peak rate 1e-3 with warm-up and cosine decay, EMA,
  clipped gradients; `train.num_steps` steps.
- Scoring: 128 px tiles every 32 px (`infer.tile_stride`; 5 x 5 tiles), Hann-weighted and stitched
  into one 256 x 256 map inside the one inference program. The map is the mean of the segmentation
  net's map and the reconstruction error (`infer.map='segmentation+recon_error'`): the error adds
  weight to changes the segmentation net marks faintly (rust over a plate, a thin film on glass).
  In the map the image score reads, the error counts a change of hue twice over on top of its
  channels' mean (`infer.score_chroma_weight=2`): a highlight or a shadow, which the segmentation net
  can mistake for a defect, changes brightness alone, while a stain or rust changes colour. The
  returned map keeps the plain error, which covers the defects' regions better. Grey images are
  unaffected.
  The returned map is zero off the region where training draws its anomalies (`infer.map_region`:
  the object, or the whole image of a surface), where whatever the networks mark (a shadow, the
  background's texture) is no defect, and smoothed by a Gaussian of 8 px (`infer.map_sigma`), which
  fills in a large defect that the map marks unevenly; the image score reads the map smoothed by 4 px
  (`infer.score_sigma`), which keeps a small defect's peak, and is the mean of its top-K pixels inside
  the region where training draws its anomalies (`infer.score_region='foreground'`: the object, or
  the whole image of a surface), so a shadow or a cable on the background does not count. Where the
  object keeps one pose (`infer.normal_map='auto'`: its Otsu masks overlap across the normals), the
  score is taken from the map minus the held-out normals' mean map, divided by their spread there,
  so the object's fixed structure (and its highlights, which the reconstruction never matches
  exactly and which vary from image to image) does not count either.

Measured (docs/experiments.md, the 2-core VM): MPDD metal_plate (plates in varying poses: no normal
map) image AUROC 0.983-0.996 over five runs, pixel AUROC 0.974-0.984, AUPRO 0.919-0.932 (without
the colour weight three of them scored 0.742-0.955; with the whole map, pixel AUROC 0.975-0.982 and
AUPRO 0.899-0.921), the per-pixel Gaussian reference 0.862-0.872;
MVTec bottle (one pose: normal map) image AUROC 0.984-0.993 over its five latest runs (three of
them 0.971-0.980 with the mean map alone), the Gaussian 0.972-0.976. Grey copies of the two sets:
MPDD 0.867-0.891 (two runs; its rust is a change of colour), the bottle 0.985. Training takes 18-28 min,
with the host's speed; the same seed gives another model on another host. Twice the steps
(`train.num_steps=1400`, about an hour) took MPDD's weakest run without the colour weight from 0.742
to 0.967.
"""

import ml_collections

# Config files are loaded by path (absl's config_flags, config.load_config): import from the installed
# package only, never from `configs`, so that no working directory or import path is assumed.
from diff_fastener_jax.config_schema import base_config, use_cpu_model, use_short_run_optimiser


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The real-data CPU recipe; no presets."""
    if arg not in (None, ""):
        raise ValueError(f"configs/real_cpu.py: takes no preset, got {arg!r}")
    c = base_config("mvtec")
    c.data.image_size = 256
    c.data.patch_size = 128
    c.data.synthesis = "perlin:0.35,cutpaste:0.15,crack:0.2,pore:0.15,intensity:0.1,blur:0.05"
    c.data.foreground = "auto"
    c.data.num_workers = 0  # two cores: the host pipeline runs between steps in the training process
    use_cpu_model(c)
    c.model.attention_resolutions = ()  # attention only in the middle (16 x 16 at a 128 px patch)
    c.loss.anomaly_oriented_noise = False
    c.diffusion.train_t_window = 50
    use_short_run_optimiser(c)
    c.train.batch_size = 4
    c.train.num_steps = 700
    c.train.log_every = 50
    c.train.checkpoint_every = 200
    c.train.eval_every = 0  # no validation pass: the last step is kept (train.select_on='last')
    c.train.val_batches = 0
    c.infer.tiling = "tiles"
    c.infer.tile_stride = 32  # 5 x 5 tiles of 128 px at 256²
    c.infer.map = "segmentation+recon_error"
    c.infer.score_chroma_weight = 2.0  # the score's error: a change of hue outweighs one of brightness
    c.infer.map_sigma = 8.0  # the returned map: a large defect filled in (pixel metrics)
    c.infer.score_sigma = 4.0  # the map the image score reads: a small defect's peak kept
    c.infer.score_region = "foreground"
    c.infer.map_region = "foreground"  # the returned map: nothing marked off the object
    c.infer.normal_map = "auto"  # subtract the normals' mean map where the object keeps one pose
    c.infer.batch_size = 1  # 25 tiles per image already fill the CPU; no padding of single images
    return c
