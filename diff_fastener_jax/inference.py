"""Batched, data-parallel scoring of image samples with the jitted inference function."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable

import jax
import numpy as np

from diff_fastener_jax import parallel
from diff_fastener_jax.logging_utils import ProgressBar


def progress(done: int, total: int, start: float, label: str = "images") -> None:
    """One progress line on stderr (for callers that track their own counts; see ProgressBar)."""
    rate = done / max(time.time() - start, 1e-9)
    print(f"{done}/{total} {label} ({rate:.1f}/s)", file=sys.stderr, flush=True)


def place_params(params, mesh):
    """Puts the (possibly single-device) params on every device of `mesh` once, before batched inference."""
    if mesh is None or mesh.devices.size == 1:
        return params
    return parallel.replicate(params, mesh)


def prepare_inference(config, params):
    """(infer, params on every local device, key, mesh) for scoring images outside training."""
    from diff_fastener_jax.train_step import make_infer_fn

    mesh = parallel.make_mesh(jax.local_devices())
    return make_infer_fn(config), place_params(params, mesh), jax.random.key(config.infer.seed), mesh


def run_infer(infer: Callable, params, images: np.ndarray, indices: np.ndarray, key, mesh=None,
              pad_to: int = 0):
    """One batch through `infer`, padded (to `pad_to` rows, then to the device count) and split over the mesh.

    Padding every batch to one size means one compilation. Returns numpy (recon (N, H, W, C),
    anomaly_map (N, H, W), score (N,)) for the N real rows.
    """
    n = images.shape[0]
    d = 1 if mesh is None else mesh.devices.size
    rows = max(n, pad_to)
    pad = rows - n + (-rows) % d
    if pad:  # repeat the last image; its outputs are dropped
        images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
        indices = np.concatenate([indices, np.repeat(indices[-1:], pad, 0)])
    if d == 1:
        out = infer(params, images, key, indices.astype(np.int32))
        return tuple(np.asarray(o)[:n] for o in out)
    sh = parallel.data_sharding(mesh)
    out = infer(params, jax.device_put(images, sh), key, jax.device_put(indices.astype(np.int32), sh))
    return tuple(np.asarray(o)[:n] for o in out)


def score_in_batches(infer: Callable, params, batches: Iterable[tuple[np.ndarray, np.ndarray]], key, *,
                     mesh=None, total: int | None = None, on_batch: Callable | None = None,
                     show_progress: bool = True, pad_to: int = 0) -> tuple[np.ndarray, float]:
    """Scores every (images, indices, *extra) batch; returns (scores (N,), seconds inside inference).

    `on_batch(i0, images, recon, amap, score, *extra)` sees each batch's outputs (for streaming
    metrics); `extra` is whatever the batch carried besides images and indices (e.g. its masks).
    """
    scores, infer_s, done = [], 0.0, 0
    bar = ProgressBar(total or 0, "images", disable=not (show_progress and total))
    for images, indices, *extra in batches:
        t = time.perf_counter()
        recon, amap, score = run_infer(infer, params, images, indices, key, mesh, pad_to)
        infer_s += time.perf_counter() - t
        if on_batch is not None:
            on_batch(done, images, recon, amap, score, *extra)
        scores.append(score)
        done += images.shape[0]
        bar.update(images.shape[0])
    bar.close()
    return (np.concatenate(scores) if scores else np.zeros((0,), np.float32)), infer_s
