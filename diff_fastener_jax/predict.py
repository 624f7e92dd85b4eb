r"""Score new images with a trained detector; needs neither the training data nor a recalibration.

  python -m diff_fastener_jax.predict --model exported/demo --images 'photos/*.png' --out predictions
  python -m diff_fastener_jax.predict --workdir runs/demo --images photos/ --out predictions
  python -m diff_fastener_jax.predict --workdir runs/multi --images 'site/*/*.png' --category from_folder --out p

Images of any size, 8 or 16 bit, grey or colour, are read by the same function as the training images,
scored, and their anomaly map is resized back to the original size. Writes to --out:
  scores.csv               path (relative to the --images folder), category, defect and true_label
                           (empty: evaluate's columns), predicted_label (1 iff score > threshold),
                           score, threshold, denoise_step
  <stem>_overlay.png       the heat map over the image (the evaluation report's overlay); <stem> is
                           the image's path relative to the --images folder without its extension
                           (subfolders are kept), so equal names in different folders stay apart
  <stem>_map.png / .npy    the raw anomaly map in [0, 1] (16-bit PNG: value * 65535; or float32 .npy)
  <stem>_mask.png          the binary mask (anomaly_map > pixel threshold), 0/255
  errors.csv               files that could not be read, with the reason (the rest are still scored)
"""

from __future__ import annotations

import sys

from absl import app, flags

from diff_fastener_jax import cli
from diff_fastener_jax.deploy.detector import Detector
from diff_fastener_jax.deploy.predict import (
    FROM_FOLDER,
    MAP_FORMATS,
    find_images,
    images_root,
    predict,
)
from diff_fastener_jax.deploy.runtimes import RUNTIME_FLAG_HELP, RUNTIMES


def define_flags() -> None:
    """This command's flags (defined only when it runs: absl flags are process-global)."""
    flags.DEFINE_string("model", None, "an export folder (python -m diff_fastener_jax.export)")
    flags.DEFINE_string("workdir", None, "or a training run folder")
    flags.DEFINE_integer("checkpoint", None, "with --workdir: the step (default: the selected step, else the latest)")
    flags.DEFINE_string("images", None, "a folder or a glob pattern (quote it)")
    flags.DEFINE_string("out", None, "output folder")
    flags.DEFINE_float("threshold", None, "override the stored image-score threshold")
    flags.DEFINE_enum(
        "runtime",
        "auto",
        list(RUNTIMES),
        RUNTIME_FLAG_HELP,
    )
    flags.DEFINE_enum("maps", "png16", list(MAP_FORMATS), "raw anomaly maps as 16-bit PNG or float32 .npy")
    flags.DEFINE_string(
        "category",
        None,
        "a unified multi-category model: every image's category, or "
        f"'{FROM_FOLDER}' (the name of the folder holding each image)",
    )


def main(argv):
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(f.model) == bool(f.workdir):
        raise app.UsageError("give exactly one of --model DIR or --workdir RUN")
    if not f.images or not f.out:
        raise app.UsageError("--images and --out are required")
    paths = find_images(f.images)
    det = Detector.load(f.model or f.workdir, checkpoint=f.checkpoint, threshold=f.threshold, runtime=f.runtime)
    result = predict(det, paths, f.out, maps=f.maps, category=f.category, root=images_root(f.images))
    print(f"scored {result['scored']} image(s) at threshold {result['threshold']:.6f} -> {f.out}/scores.csv")
    if result["errors"]:
        print(f"{len(result['errors'])} unreadable file(s), listed in {f.out}/errors.csv", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main, __doc__, define_flags=define_flags, required=("images", "out"))
