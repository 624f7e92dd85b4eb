"""The one inference program (`make_infer_fn`) and batched, data-parallel scoring with it.

Inference noise is FIXED per model: drawn once from `infer.seed` for the model's image shape and used
for every image, so a score is a function of the parameters and the image alone (the same in
evaluate, predict, the exported programs and the service, whatever the batch size or order).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from diff_fastener_jax import diffusion
from diff_fastener_jax.config import ANOMALY_MAPS, INFER_METHODS
from diff_fastener_jax.data import datasets
from diff_fastener_jax.logging_utils import ProgressBar
from diff_fastener_jax.models import build_models, tile_rows
from diff_fastener_jax.perf import xla_options
from diff_fastener_jax.training import parallel


class InferOutputs(NamedTuple):
    """What one inference call returns, per image (leading axis N)."""

    recon: Any  # (N, H, W, C) in [-1, 1]
    anomaly_map: Any  # (N, H, W) in [0, 1]
    score: Any  # (N,)
    denoise_step: Any  # (N,) int32: the step the reconstruction started from


def place_params(params, mesh):
    """Puts the (possibly single-device) params on every device of `mesh` once, before batched inference."""
    if mesh is None or mesh.devices.size == 1:
        return params
    return parallel.replicate(params, mesh)


def prepare_inference(config, params):
    """(infer, params on every local device, mesh) for scoring images outside training."""
    mesh = parallel.make_mesh(jax.local_devices())
    return make_infer_fn(config), place_params(params, mesh), mesh


def run_infer(infer: Callable, params, images: np.ndarray, mesh=None, pad_to: int = 0,
              class_ids: np.ndarray | None = None):
    """One batch through `infer`, padded (to `pad_to` rows, then to the device count) and split over the mesh.

    Padding every batch to one size means one compilation. `class_ids` (N,) int: each image's category
    for a unified multi-category model (None otherwise). Returns numpy InferOutputs (recon (N, H, W, C),
    anomaly_map (N, H, W), score (N,), denoise_step (N,)) for the N real rows.
    """
    n = images.shape[0]
    d = 1 if mesh is None else mesh.devices.size
    rows = max(n, pad_to)
    pad = rows - n + (-rows) % d
    if class_ids is not None:
        class_ids = np.asarray(class_ids, np.int32).reshape(-1)
        if class_ids.shape[0] != n:
            raise ValueError(f"run_infer: {class_ids.shape[0]} class ids for {n} images")
    if pad:  # repeat the last image; its outputs are dropped
        images = np.concatenate([images, np.repeat(images[-1:], pad, 0)])
        if class_ids is not None:
            class_ids = np.concatenate([class_ids, np.repeat(class_ids[-1:], pad)])
    args = (images,) if class_ids is None else (images, class_ids)
    if d > 1:
        args = tuple(jax.device_put(a, parallel.data_sharding(mesh)) for a in args)
    out = infer(params, *args)
    return InferOutputs(*(np.asarray(o)[:n] for o in out))


def sample_batches(samples, size: int, batch_size: int, with_masks: bool = False):
    """Yields (images (b, H, W, 3) in [-1, 1],) [+ masks (b, H, W)] per chunk of dataset samples."""
    for i0 in range(0, len(samples), batch_size):
        arrays = datasets.load_arrays(samples[i0:i0 + batch_size], size)
        if with_masks:
            yield arrays["image"], arrays["mask"][..., 0]
        else:
            yield (arrays["image"],)


def score_in_batches(infer: Callable, params, batches: Iterable[tuple[np.ndarray, ...]], *,
                     mesh=None, total: int | None = None, on_batch: Callable | None = None,
                     show_progress: bool = True, pad_to: int = 0,
                     class_ids: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Scores every (images, *extra) batch; returns (scores (N,), seconds inside inference).

    `on_batch(i0, images, outputs, *extra)` sees each batch's `InferOutputs` (for streaming metrics);
    `extra` is whatever the batch carried besides its images (e.g. its masks). `class_ids` (N,): the
    category of every image of the whole stream, in order (unified multi-category models).
    """
    scores, infer_s, done = [], 0.0, 0
    bar = ProgressBar(total or 0, "images", disable=not (show_progress and total))
    for images, *extra in batches:
        t = time.perf_counter()
        cls = None if class_ids is None else class_ids[done:done + images.shape[0]]
        out = run_infer(infer, params, images, mesh, pad_to, class_ids=cls)
        infer_s += time.perf_counter() - t
        if on_batch is not None:
            on_batch(done, images, out, *extra)
        scores.append(out.score)
        done += images.shape[0]
        bar.update(images.shape[0])
    bar.close()
    return (np.concatenate(scores) if scores else np.zeros((0,), np.float32)), infer_s


def model_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(H, W, C) of the images the model takes."""
    size = config.data.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h), int(w), int(config.model.in_channels)


def top_k_count(config: ml_collections.ConfigDict, height: int, width: int) -> int:
    """K for the image score: `infer.top_k` at 256², scaled with the pixel count, at least 1."""
    return max(1, int(round(config.infer.top_k * height * width / (256 * 256))))


def top_k_score(amap: jax.Array, k: int) -> jax.Array:
    """Image score: mean of the k largest map values. (N, H, W) -> (N,)."""
    n, h, w = amap.shape  # n may be a symbolic dimension (jax.export)
    return jnp.mean(lax.top_k(amap.reshape(n, h * w), k)[0], axis=-1)


def smoothing_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """(n, n) float64 S such that S @ v is v smoothed by a Gaussian of `sigma` pixels with reflected
    edges (d c b a | a b c d | d c b a), the same as scipy.ndimage.gaussian_filter1d(v, sigma,
    mode='reflect', truncate=truncate). sigma 0 gives the identity.

    A dense matrix instead of a convolution: at these sizes (n <= 512) the two matmuls cost a few MFLOP
    per image, and they export to StableHLO and ONNX as plain MatMuls.
    """
    if sigma <= 0:
        return np.eye(n)
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    s = np.zeros((n, n))
    for i in range(n):
        j = i + offsets
        period = 2 * n  # reflection is periodic with period 2n
        j = np.mod(j, period)
        j = np.where(j >= n, period - 1 - j, j)
        np.add.at(s[i], j, weights)
    return s


def map_smoothing(config: ml_collections.ConfigDict, height: int, width: int) -> tuple[float, float]:
    """(sigma_h, sigma_w) in pixels of the model's map: `infer.map_sigma` at 256², scaled with each side."""
    sigma = float(config.infer.map_sigma)
    return sigma * height / 256.0, sigma * width / 256.0


def smooth_map(amap: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """Gaussian-smoothed anomaly map: rows @ amap @ cols.T per image. (N, H, W) -> (N, H, W)."""
    amap = jnp.einsum("hk,nkw->nhw", rows.astype(np.float32), amap)
    return jnp.einsum("nhk,wk->nhw", amap, cols.astype(np.float32))


def fixed_noise(config: ml_collections.ConfigDict) -> np.ndarray:
    """The model's inference noise, float32 (2, H, W, C): [0] for t_small, [1] for t_big, from `infer.seed`.

    A numpy constant (not a PRNG key) so the exported StableHLO and ONNX programs embed it as data.
    """
    shape = (2,) + model_image_shape(config)
    return np.asarray(jax.random.normal(jax.random.key(config.infer.seed), shape, jnp.float32))


def check_infer_config(config: ml_collections.ConfigDict) -> None:
    """Refuses inference settings the program cannot run (before anything is traced)."""
    d = config.diffusion
    if not 0 <= d.eval_t_small < d.eval_t_big < d.T:
        raise ValueError(f"diffusion: need 0 <= eval_t_small ({d.eval_t_small}) < eval_t_big ({d.eval_t_big}) < T ({d.T})")
    if config.infer.method not in INFER_METHODS:
        raise ValueError(f"infer.method must be {', '.join(INFER_METHODS[:-1])} or {INFER_METHODS[-1]}, "
                         f"got {config.infer.method!r}")
    if config.infer.map not in ANOMALY_MAPS:
        raise ValueError(f"infer.map must be 'segmentation' or 'recon_error', got {config.infer.map!r}")
    if not config.infer.map_sigma >= 0:
        raise ValueError(f"infer.map_sigma must be >= 0 (pixels at 256²), got {config.infer.map_sigma}")


def make_infer_program(config: ml_collections.ConfigDict, *, fuse_passes: bool = True) -> Callable:
    """The unjitted `infer(params, images[, class_ids]) -> InferOutputs(recon, anomaly_map, score,
    denoise_step)` (for jit, jax.export, ONNX). `class_ids` (N,) int32, each image's category, is
    required by (and only by) a unified multi-category model.

    images (N, H, W, C) in [-1, 1] at the model's size; recon (N, H, W, C); anomaly_map (N, H, W) in
    [0, 1] (segmentation probability, or |x - recon| averaged over channels / 2 for
    `infer.map='recon_error'`), Gaussian-smoothed when `infer.map_sigma` > 0; score (N,) = mean of the
    top-K map values; denoise_step (N,) int32, the
    diffusion step the reconstruction started from (`diffusion.eval_t_big` for the fixed-step methods,
    each image's own for 'adaptive'). Every image gets the same
    fixed noise (`fixed_noise`; ddim/ddpm draw theirs from one fixed raw key), so row i of the outputs
    depends on images[i] alone. Closes over no typed PRNG key (jax2onnx cannot convert one).
    `fuse_passes=False` runs the two noise scales as two network calls instead of one on a 2N batch
    (the same numbers up to float rounding; jax2onnx cannot slice a symbolic 2N batch in half).
    """
    check_infer_config(config)
    recon_net, seg_net = build_models(config)
    sched = diffusion.schedule_from_config(config.diffusion)
    d = config.diffusion
    shape = model_image_shape(config)
    noise = fixed_noise(config)  # (2, H, W, C)
    # ddim/ddpm: every row gets the same raw uint32 key, hence the same noise at every step.
    raw_key = np.asarray(jax.random.key_data(jax.random.key(config.infer.seed)))  # (2,) uint32
    k = top_k_count(config, shape[0], shape[1])
    sigma_h, sigma_w = map_smoothing(config, shape[0], shape[1])
    smooth_rows, smooth_cols = smoothing_matrix(shape[0], sigma_h), smoothing_matrix(shape[1], sigma_w)
    method = config.infer.method

    def infer(params, images, class_ids=None):
        if tuple(images.shape[1:]) != shape:
            raise ValueError(f"infer: images must be (N, {', '.join(map(str, shape))}) for this model, "
                             f"got {tuple(images.shape)}")
        if bool(recon_net.num_classes) != (class_ids is not None):
            raise ValueError(f"infer: this model has {recon_net.num_classes} classes; pass class_ids (N,) "
                             "exactly when it has some")
        n = images.shape[0]
        n1 = jnp.broadcast_to(noise[0], images.shape)  # (N, H, W, C)
        n2 = jnp.broadcast_to(noise[1], images.shape)
        # broadcast_to, not jnp.full: jax2onnx converts it with a symbolic batch size
        t_s = jnp.broadcast_to(np.int32(d.eval_t_small), (n,))
        t_b = jnp.broadcast_to(np.int32(d.eval_t_big), (n,))
        step = t_b  # the fixed-step methods start every image at t_big

        def eps_fn(x, t):  # fused passes stack copies of the batch: the class ids are tiled to match
            return recon_net.apply({"params": params["recon"]}, x, t, class_ids=tile_rows(class_ids, x.shape[0]))

        if method == "norm_guided":
            recon = diffusion.norm_guided_reconstruction(
                eps_fn, sched, images, t_s, t_b, n1, n2, w=d.guidance_w, fuse_passes=fuse_passes)["recon"]
        elif method == "one_step":
            x_b = diffusion.q_sample(sched, images, t_b, n2)
            recon = jnp.clip(diffusion.x0_from_eps(sched, x_b, t_b, eps_fn(x_b, t_b)), -1.0, 1.0)
        elif method == "adaptive":
            a = config.infer
            out = diffusion.adaptive_reconstruct(
                eps_fn, sched, images, n2, t_max=int(a.adaptive_t_max), num_steps=int(a.ddim_steps),
                delta=float(a.adaptive_delta), margin=int(a.adaptive_margin),
                fusion_gain=float(a.adaptive_fusion_gain), score_fn=lambda d: top_k_score(d, k))
            recon, step = out["recon"], out["start_step"]
        else:
            keys = jnp.broadcast_to(raw_key, (n, raw_key.shape[0]))  # (N, 2)
            if method == "ddim":
                recon = diffusion.ddim_reconstruct(eps_fn, sched, images, int(d.eval_t_big),
                                                   int(config.infer.ddim_steps), keys)
            else:
                recon = diffusion.ddpm_reconstruct(eps_fn, sched, images, int(d.eval_t_big), keys)
        if config.infer.map == "segmentation":
            amap = seg_net.apply({"params": params["seg"]}, jnp.concatenate([images, recon], axis=-1),
                                 class_ids=class_ids)[..., 0]
        else:
            amap = diffusion.recon_error_map(images, recon) / 2.0  # [-1, 1] images: error in [0, 2]
        if sigma_h > 0:
            amap = smooth_map(amap, smooth_rows, smooth_cols)
        return InferOutputs(recon, amap, top_k_score(amap, k), step)

    return infer


def make_infer_fn(config: ml_collections.ConfigDict) -> Callable:
    """Jitted `infer(params, images) -> InferOutputs(recon, anomaly_map, score, denoise_step)` (see
    `make_infer_program`).

    Everything stays on device between the passes: one XLA program. Shard `images` over a mesh to run
    it data-parallel.
    """
    return jax.jit(make_infer_program(config), compiler_options=xla_options.compiler_options())
