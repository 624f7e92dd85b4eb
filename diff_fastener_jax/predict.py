r"""Score new images with a trained run: scores.csv and a heat-map overlay per image.

  python -m diff_fastener_jax.predict --workdir runs/demo --images 'photos/*.png' --out predictions

Images of any size are resized to the model's size, scored, and their anomaly map is resized back
to the original size for the overlay. Unreadable files are reported (stderr and `errors.csv`) and
the rest are still processed. The label column uses the threshold calibrated on the run's held-out
normal images (or `--config.eval.threshold=X`).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

import numpy as np
from PIL import Image

from diff_fastener_jax.config import parse_cli_overrides
from diff_fastener_jax.evaluate import calibrated_threshold
from diff_fastener_jax.inference import prepare_inference, progress, run_infer
from diff_fastener_jax.run_loading import load_run_config, load_run_params

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def find_images(spec: str) -> list[str]:
    """A folder (its image files, sorted) or a glob pattern; a clear error when nothing matches."""
    if os.path.isdir(spec):
        paths = sorted(os.path.join(spec, f) for f in os.listdir(spec))
        paths = [p for p in paths if os.path.isfile(p) and p.lower().endswith(IMAGE_EXTENSIONS)]
    else:
        paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    if not paths:
        raise FileNotFoundError(f"--images {spec!r}: no image files found")
    return paths


def read_rgb(path: str) -> np.ndarray:
    """uint8 (H, W, 3); raises OSError/ValueError naming the file if it cannot be decoded."""
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"))


def overlay(rgb: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blends a jet-coloured anomaly map (H, W) in [0, 1] over an RGB uint8 image (H, W, 3)."""
    from matplotlib import colormaps

    heat = (colormaps["jet"](np.clip(amap, 0, 1))[..., :3] * 255).astype(np.float32)
    return ((1 - alpha) * rgb.astype(np.float32) + alpha * heat).astype(np.uint8)


def predict(config, params, paths: list[str], out_dir: str, *, show_progress: bool = True,
            threshold: float | None = None) -> dict:
    """Scores `paths`; writes scores.csv, errors.csv (if any) and <stem>_overlay.png files to `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    size, bs = config.data.image_size, config.infer.batch_size
    infer, params, mesh = prepare_inference(config, params)
    if threshold is None:
        threshold, _ = calibrated_threshold(config, params, infer, mesh)
    rows, errors, done = [], [], 0
    t0 = time.time()
    for i0 in range(0, len(paths), bs):
        chunk, originals, batch = [], [], []
        for p in paths[i0:i0 + bs]:
            try:
                rgb = read_rgb(p)
            except Exception as e:  # noqa: BLE001 - report every unreadable file and go on
                errors.append((p, f"{type(e).__name__}: {e}"))
                print(f"[error] cannot read {p}: {e}", file=sys.stderr)
                continue
            chunk.append(p)
            originals.append(rgb)
            small = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR), np.float32)
            batch.append(small / 127.5 - 1.0)
        done += len(paths[i0:i0 + bs])
        if chunk:
            images = np.stack(batch)
            _, amap, score = run_infer(infer, params, images, mesh, pad_to=bs)
            for p, rgb, m, s in zip(chunk, originals, amap, score):
                h, w = rgb.shape[:2]
                big = np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))
                stem = os.path.splitext(os.path.basename(p))[0]
                Image.fromarray(overlay(rgb, big)).save(os.path.join(out_dir, f"{stem}_overlay.png"))
                rows.append((p, float(s), int(s >= threshold)))
        if show_progress:
            progress(done, len(paths), t0)
    with open(os.path.join(out_dir, "scores.csv"), "w") as f:
        f.write("path,score,label\n")
        for p, s, lab in rows:
            f.write(f"{p},{s:.6f},{lab}\n")
    if errors:
        with open(os.path.join(out_dir, "errors.csv"), "w") as f:
            f.write("path,error\n")
            for p, e in errors:
                f.write(f"{p},\"{e}\"\n")
    return {"scored": len(rows), "errors": errors, "threshold": threshold}


def main(argv=None) -> int:
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="training run folder")
    p.add_argument("--images", required=True, help="a folder or a glob pattern (quote it)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", type=int, default=None, help="step (default: latest)")
    args, rest = p.parse_known_args(argv)
    config = load_run_config(args.workdir, parse_cli_overrides(rest))
    params, _ = load_run_params(args.workdir, config, args.checkpoint)
    result = predict(config, params, find_images(args.images), args.out)
    print(f"scored {result['scored']} image(s) at threshold {result['threshold']:.4f} -> {args.out}/scores.csv")
    if result["errors"]:
        print(f"{len(result['errors'])} unreadable file(s), listed in {args.out}/errors.csv:", file=sys.stderr)
        for path, err in result["errors"]:
            print(f"  {path}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
