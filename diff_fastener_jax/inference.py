"""The one inference program (`make_infer_fn`) and batched, data-parallel scoring with it.

Inference noise is FIXED per model: drawn once from `infer.seed` for the network's input shape and used
for every image, so a score is a function of the parameters and the image alone (the same in
evaluate, predict, the exported programs and the service, whatever the batch size or order).

A model trained on `data.patch_size` P x P crops scores a whole image at `data.image_size` inside the
same program: overlapping P x P tiles (`infer.tiling='tiles'`, every `infer.tile_stride` px) run through
the networks as one batch and are stitched into one full-size map (`tiling`), or the networks run once on
the whole image (`infer.tiling='whole'`). Every tile gets the same P x P noise.

With `infer.normal_map='subtract'` the params carry one more array, params[NORMAL_MAP_PARAM] (H, W): the
blurred mean map of the held-out normal images (`deploy.normal_map`), subtracted from the map before
the image score is taken; with 'standardise' a (2, H, W) [mean, scale], and the score reads
(map - mean) / scale. Because it travels with the params, evaluate, predict, the service and both
exported files apply the same one.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from diff_fastener_jax import diffusion, foreground, parallel, tiling
from diff_fastener_jax.config_schema import (
    ANOMALY_MAPS,
    AUTO,
    FITTED_NORMAL_MAPS,
    INFER_METHODS,
    PATCH_OFF,
    REGIONS,
    SCORE_AS_MAP,
    TILE_STRIDE_HALF_PATCH,
    TILINGS,
)
from diff_fastener_jax.data import datasets
from diff_fastener_jax.logging_utils import ProgressBar
from diff_fastener_jax.models import build_models, tile_rows
from diff_fastener_jax.perf import xla_options

# The params key of the fitted normal map (infer.normal_map 'subtract', 'standardise'); the networks' keys
# are 'recon', 'seg'.
NORMAL_MAP_PARAM = "normal_map"


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


def run_infer(
    infer: Callable, params, images: np.ndarray, mesh=None, pad_to: int = 0, class_ids: np.ndarray | None = None
):
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
        arrays = datasets.load_arrays(samples[i0 : i0 + batch_size], size)
        if with_masks:
            yield arrays["image"], arrays["mask"][..., 0]
        else:
            yield (arrays["image"],)


def score_in_batches(
    infer: Callable,
    params,
    batches: Iterable[tuple[np.ndarray, ...]],
    *,
    mesh=None,
    total: int | None = None,
    on_batch: Callable | None = None,
    show_progress: bool = True,
    pad_to: int = 0,
    class_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, float]:
    """Scores every (images, *extra) batch; returns (scores (N,), seconds inside inference).

    `on_batch(i0, images, outputs, *extra)` sees each batch's `InferOutputs` (for streaming metrics);
    `extra` is whatever the batch carried besides its images (e.g. its masks). `class_ids` (N,): the
    category of every image of the whole stream, in order (unified multi-category models).
    """
    scores, infer_s, done = [], 0.0, 0
    bar = ProgressBar(total or 0, "images", disable=not (show_progress and total))
    for images, *extra in batches:
        t = time.perf_counter()
        cls = None if class_ids is None else class_ids[done : done + images.shape[0]]
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
    """(H, W, C) of the images the inference program takes (`data.image_size`, the evaluation resolution)."""
    size = config.data.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(h), int(w), int(config.model.in_channels)


def patch_size(config: ml_collections.ConfigDict) -> int:
    """P of the P x P crops a patch-trained model learns from; PATCH_OFF (0) = the model sees whole images."""
    return int(config.data.patch_size)


def network_image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
    """(h, w, C) of the networks' input: (P, P, C) for a patch-trained model, else `model_image_shape`."""
    p = patch_size(config)
    return (p, p, int(config.model.in_channels)) if p != PATCH_OFF else model_image_shape(config)


def tile_stride(config: ml_collections.ConfigDict) -> int:
    """`infer.tile_stride` in px (TILE_STRIDE_HALF_PATCH: half the patch size, at least 1)."""
    stride = int(config.infer.tile_stride)
    return stride if stride != TILE_STRIDE_HALF_PATCH else max(1, patch_size(config) // 2)


def uses_tiles(config: ml_collections.ConfigDict) -> bool:
    """Whether inference cuts images into patch-size tiles (a patch-trained model with `infer.tiling='tiles'`
    on images larger than one patch)."""
    p = patch_size(config)
    h, w, _ = model_image_shape(config)
    return p != PATCH_OFF and config.infer.tiling == "tiles" and (h, w) != (p, p)


def tiling_record(config: ml_collections.ConfigDict) -> dict:
    """How the program covers an image, for detector.json: {} for a whole-image model, else the patch,
    the mode and, for tiles, the stride and the tile grid."""
    p = patch_size(config)
    if p == PATCH_OFF:
        return {}
    out = {"patch_size": p, "tiling": str(config.infer.tiling)}
    if uses_tiles(config):
        plan_h, plan_w = tile_plans(config)
        out.update(
            tile_stride=tile_stride(config),
            tiles=[len(plan_h.origins), len(plan_w.origins)],
            stitch="Hann-weighted, weights normalised to sum to one at every pixel; every tile the same noise",
        )
    return out


def tile_plans(config: ml_collections.ConfigDict) -> tuple[tiling.AxisPlan, tiling.AxisPlan]:
    """The row and column tile plans of the evaluation resolution (see `tiling.axis_plan`)."""
    h, w, _ = model_image_shape(config)
    p, stride = patch_size(config), tile_stride(config)
    return tiling.axis_plan(h, p, stride), tiling.axis_plan(w, p, stride)


def draws_in_otsu_foreground(config: ml_collections.ConfigDict) -> bool:
    """Whether the region where training draws its anomalies (`data.foreground`) is the Otsu object;
    with data.foreground='full' (textures) it is the whole image. A run's config holds 'auto' resolved
    (`foreground_kind.resolve`); an unresolved 'auto' (a config never trained, as the benchmark builds
    it) counts as the Otsu object, the costlier program."""
    return config.data.foreground in ("otsu", AUTO)


def scores_otsu_foreground(config: ml_collections.ConfigDict) -> bool:
    """Whether the image score takes its top-K from the Otsu foreground alone (`infer.score_region`
    'foreground' where `draws_in_otsu_foreground`)."""
    return config.infer.score_region == "foreground" and draws_in_otsu_foreground(config)


def maps_otsu_foreground(config: ml_collections.ConfigDict) -> bool:
    """Whether the returned map is zero outside the Otsu foreground (`infer.map_region` 'foreground'
    where `draws_in_otsu_foreground`)."""
    return config.infer.map_region == "foreground" and draws_in_otsu_foreground(config)


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
    """(sigma_h, sigma_w) in pixels of the model's returned map: `infer.map_sigma` at 256², scaled with
    the square root of the map's area (the side of a square map), the same in both directions so a
    non-square map is smoothed isotropically."""
    sigma = float(config.infer.map_sigma) * float(np.sqrt(height * width)) / 256.0
    return sigma, sigma


def score_sigma_at_256(config: ml_collections.ConfigDict) -> float:
    """The smoothing (pixels at 256²) of the map the image score is read from: `infer.score_sigma`, or
    `infer.map_sigma` when it is SCORE_AS_MAP."""
    s = float(config.infer.score_sigma)
    return float(config.infer.map_sigma) if s == SCORE_AS_MAP else s


def score_chroma_weight(config: ml_collections.ConfigDict) -> float:
    """The chroma weight of the error in the map the image score is read from: `infer.score_chroma_weight`,
    or `infer.chroma_weight` when it is SCORE_AS_MAP."""
    w = float(config.infer.score_chroma_weight)
    return float(config.infer.chroma_weight) if w == SCORE_AS_MAP else w


def reads_own_score_map(config: ml_collections.ConfigDict) -> bool:
    """Whether the image score reads another map than the returned one: smoothed otherwise
    (`infer.score_sigma`), where the map holds the reconstruction error weighted otherwise
    (`infer.score_chroma_weight`), or whole where the returned map is cut to the foreground
    (`infer.map_region`)."""
    return smooths_own_score_map(config) or weighs_own_score_error(config) or maps_otsu_foreground(config)


def smooths_own_score_map(config: ml_collections.ConfigDict) -> bool:
    """Whether the score's map is smoothed otherwise than the returned map (`infer.score_sigma`)."""
    return score_sigma_at_256(config) != float(config.infer.map_sigma)


def weighs_own_score_error(config: ml_collections.ConfigDict) -> bool:
    """Whether the score's map holds a reconstruction error weighted otherwise than the returned map's."""
    uses_error = config.infer.map != "segmentation"
    return uses_error and score_chroma_weight(config) != float(config.infer.chroma_weight)


def score_smoothing(config: ml_collections.ConfigDict, height: int, width: int) -> tuple[float, float]:
    """(sigma_h, sigma_w) in pixels of the map the image score is read from (`map_smoothing`'s scaling)."""
    sigma = score_sigma_at_256(config) * float(np.sqrt(height * width)) / 256.0
    return sigma, sigma


def scored_map_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` whose program returns the map its image score is read from (`infer.map_sigma`
    and `infer.chroma_weight` set to the score's, `infer.map_region` 'image'); the same config when the
    two are one map. The scores are the same."""
    if not reads_own_score_map(config):
        return config
    c = ml_collections.ConfigDict(config.to_dict())
    c.infer.map_sigma = score_sigma_at_256(config)
    c.infer.chroma_weight = score_chroma_weight(config)
    c.infer.map_region = "image"
    c.infer.score_sigma = SCORE_AS_MAP
    c.infer.score_chroma_weight = SCORE_AS_MAP
    return c


def reconstruction_error(images: jax.Array, recon: jax.Array, chroma_weight: float) -> jax.Array:
    """The error map of `infer.map='recon_error'`, (N, H, W, C) [-1, 1] pair -> (N, H, W) in [0, 1]:
    (the channels' mean |images - recon| + `chroma_weight` x the length of the part of images - recon
    orthogonal to grey (1, ..., 1)) / 2, clipped. The grey part is a change of brightness, which
    lighting also makes; the orthogonal part a change of hue, which it rarely does."""
    error = diffusion.recon_error_map(images, recon)  # (N, H, W) in [0, 2]
    if chroma_weight == 0:
        return error / 2.0
    diff = images.astype(jnp.float32) - recon.astype(jnp.float32)  # (N, H, W, C)
    chroma = diff - jnp.mean(diff, axis=-1, keepdims=True)
    length = jnp.sqrt(jnp.sum(chroma * chroma, axis=-1))  # (N, H, W); inference only: no gradient at 0
    return jnp.clip((error + chroma_weight * length) / 2.0, 0.0, 1.0)


def smooth_map(amap: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    """Gaussian-smoothed anomaly map: rows @ amap @ cols.T per image, clipped to [0, 1]. (N, H, W) -> (N, H, W).

    The weights sum to 1 only up to float32 rounding: a saturated region comes out a few ulp above 1
    (1.0000001), which the metrics refuse as a probability, so the map is clipped here, inside the
    one program that evaluate, predict and the exported files all run.
    """
    amap = jnp.einsum("hk,nkw->nhw", rows.astype(np.float32), amap)
    return jnp.clip(jnp.einsum("nhk,wk->nhw", amap, cols.astype(np.float32)), 0.0, 1.0)


def fixed_noise(config: ml_collections.ConfigDict) -> np.ndarray:
    """The model's inference noise, float32 (2, h, w, C) at the network's input shape
    (`network_image_shape`): [0] for t_small, [1] for t_big, from `infer.seed`. Every tile gets this noise.

    A numpy constant (not a PRNG key) so the exported StableHLO and ONNX programs embed it as data.
    """
    shape = (2,) + network_image_shape(config)
    return np.asarray(jax.random.normal(jax.random.key(config.infer.seed), shape, jnp.float32))


def whole_image_noise(noise: np.ndarray, height: int, width: int) -> np.ndarray:
    """The patch noise (2, P, P, C) repeated over a whole (height, width) image: (2, height, width, C).
    A whole-image pass then sees, at every tile-aligned position, the noise that tile would get."""
    p_h, p_w = noise.shape[1:3]
    reps = (1, -(-height // p_h), -(-width // p_w), 1)
    return np.tile(noise, reps)[:, :height, :width]


def check_infer_config(config: ml_collections.ConfigDict) -> None:
    """Refuses inference settings the program cannot run (before anything is traced)."""
    d = config.diffusion
    if not 0 <= d.eval_t_small < d.eval_t_big < d.T:
        raise ValueError(
            f"diffusion: need 0 <= eval_t_small ({d.eval_t_small}) < eval_t_big ({d.eval_t_big}) < T ({d.T})"
        )
    if config.infer.method not in INFER_METHODS:
        raise ValueError(
            f"infer.method must be {', '.join(INFER_METHODS[:-1])} or {INFER_METHODS[-1]}, got {config.infer.method!r}"
        )
    if config.infer.map not in ANOMALY_MAPS:
        raise ValueError(f"infer.map must be one of {ANOMALY_MAPS}, got {config.infer.map!r}")
    if not config.infer.chroma_weight >= 0:
        raise ValueError(f"infer.chroma_weight must be >= 0, got {config.infer.chroma_weight}")
    if not score_chroma_weight(config) >= 0:
        raise ValueError(f"infer.score_chroma_weight must be >= 0 or -1, got {config.infer.score_chroma_weight}")
    for key in ("score_region", "map_region"):
        if config.infer[key] not in REGIONS:
            raise ValueError(f"infer.{key} must be one of {REGIONS}, got {config.infer[key]!r}")
    if not config.infer.map_sigma >= 0:
        raise ValueError(f"infer.map_sigma must be >= 0 (pixels at 256²), got {config.infer.map_sigma}")
    if not score_sigma_at_256(config) >= 0:
        raise ValueError(f"infer.score_sigma must be >= 0 (pixels at 256²) or -1, got {config.infer.score_sigma}")
    if config.infer.tiling not in TILINGS:
        raise ValueError(f"infer.tiling must be one of {TILINGS}, got {config.infer.tiling!r}")
    if uses_tiles(config):
        tile_plans(config)  # raises if the patch does not fit the image or the stride is out of range


def make_infer_program(config: ml_collections.ConfigDict, *, fuse_passes: bool = True) -> Callable:
    """The unjitted `infer(params, images[, class_ids]) -> InferOutputs(recon, anomaly_map, score,
    denoise_step)` (for jit, jax.export, ONNX). `class_ids` (N,) int32, each image's category, is
    required by (and only by) a unified multi-category model.

    images (N, H, W, C) in [-1, 1] at `data.image_size` (tiled for a patch-trained model: module
    docstring); recon (N, H, W, C); anomaly_map (N, H, W) in [0, 1] (segmentation probability;
    `reconstruction_error` for `infer.map='recon_error'`; the mean of the two for
    'segmentation+recon_error'), zero outside the image's Otsu foreground with
    `infer.map_region='foreground'`, then Gaussian-smoothed when `infer.map_sigma` > 0; score (N,) = mean of the
    top-K map values (of the raw map smoothed by `infer.score_sigma` and its error weighted by
    `infer.score_chroma_weight` where those are set; of that map
    minus params[NORMAL_MAP_PARAM] with `infer.normal_map='subtract'`, standardised by it with
    'standardise', of the image's Otsu foreground
    alone with `infer.score_region='foreground'`; the returned map stays the model's own, so its pixel
    values keep their meaning); denoise_step (N,) int32, the diffusion
    step the reconstruction started from (`diffusion.eval_t_big` for the fixed-step methods, each
    image's own for 'adaptive'). Every image gets the same fixed noise (`fixed_noise`; ddim/ddpm draw
    theirs from one fixed raw key), so row i of the outputs depends on images[i] alone. Closes over no
    typed PRNG key (jax2onnx cannot convert one).
    `fuse_passes=False` runs the two noise scales as two network calls instead of one on a 2N batch
    (the same numbers up to float rounding; jax2onnx cannot slice a symbolic 2N batch in half).
    """
    check_infer_config(config)
    recon_net, seg_net = build_models(config)
    sched = diffusion.schedule_from_config(config.diffusion)
    d = config.diffusion
    shape = model_image_shape(config)
    noise = fixed_noise(config)  # (2, h, w, C) at the network's input shape
    tiled = uses_tiles(config)
    if tiled:
        plan_h, plan_w = tile_plans(config)
        num_tiles = len(plan_h.origins) * len(plan_w.origins)
    elif noise.shape[1:] != shape:  # a patch-trained model run on the whole image at once
        noise = whole_image_noise(noise, shape[0], shape[1])  # (2, H, W, C)
    # ddim/ddpm: every row gets the same raw uint32 key, hence the same noise at every step.
    raw_key = np.asarray(jax.random.key_data(jax.random.key(config.infer.seed)))  # (2,) uint32
    k = top_k_count(config, shape[0], shape[1])
    k_pass = top_k_count(config, noise.shape[1], noise.shape[2])  # adaptive: per network input (tile)
    sigma_h, sigma_w = map_smoothing(config, shape[0], shape[1])
    smooth_rows, smooth_cols = smoothing_matrix(shape[0], sigma_h), smoothing_matrix(shape[1], sigma_w)
    score_h, score_w = score_smoothing(config, shape[0], shape[1])
    own_score_map = reads_own_score_map(config)
    score_rows, score_cols = smoothing_matrix(shape[0], score_h), smoothing_matrix(shape[1], score_w)
    chroma_weight = float(config.infer.chroma_weight)
    own_score_error = weighs_own_score_error(config)
    score_weight = score_chroma_weight(config)
    method = config.infer.method
    normal_mode = config.infer.normal_map
    uses_normal_map = normal_mode in FITTED_NORMAL_MAPS  # deploy.normal_map.fitted inlined: it imports this module
    foreground_only = scores_otsu_foreground(config)
    map_foreground_only = maps_otsu_foreground(config)

    def infer(params, images, class_ids=None):
        if tuple(images.shape[1:]) != shape:
            raise ValueError(
                f"infer: images must be (N, {', '.join(map(str, shape))}) for this model, got {tuple(images.shape)}"
            )
        if bool(recon_net.num_classes) != (class_ids is not None):
            raise ValueError(
                f"infer: this model has {recon_net.num_classes} classes; pass class_ids (N,) exactly when it has some"
            )
        if uses_normal_map != (NORMAL_MAP_PARAM in params):
            raise ValueError(
                f"infer: infer.normal_map is {config.infer.normal_map!r}: params must "
                f"{'' if uses_normal_map else 'not '}carry {NORMAL_MAP_PARAM!r} (deploy.normal_map)"
            )
        if not tiled:
            recon, amap, score_raw, step = network_pass(params, images, class_ids)
        else:  # every image's tiles in one batch, image after image; one class id per tile
            tile_ids = None if class_ids is None else jnp.repeat(class_ids, num_tiles)
            recon, amap, score_raw, step = network_pass(
                params, tiling.extract_tiles(images, plan_h, plan_w, noise.shape[1]), tile_ids
            )
            recon = tiling.stitch_tiles(recon, plan_h, plan_w)  # (N, H, W, C)
            amap = tiling.stitch_tiles(amap, plan_h, plan_w)  # (N, H, W)
            if own_score_error:
                score_raw = tiling.stitch_tiles(score_raw, plan_h, plan_w)  # (N, H, W)
            step = jnp.max(step.reshape(-1, num_tiles), axis=1)  # (N,): the latest start of any tile
        raw = amap  # (N, H, W)
        if not own_score_error:
            score_raw = raw
        region = foreground.otsu_foreground(images) if foreground_only or map_foreground_only else None  # (N, H, W)
        if map_foreground_only:
            raw = jnp.where(region, raw, 0.0)  # the map's floor: training draws no anomaly outside
        if sigma_h > 0:
            amap = smooth_map(raw, smooth_rows, smooth_cols)
        else:
            amap = raw
        if not own_score_map:
            scored = amap
        elif score_h > 0:
            scored = smooth_map(score_raw, score_rows, score_cols)
        else:
            scored = score_raw
        if normal_mode == "subtract":
            scored = scored - params[NORMAL_MAP_PARAM]  # (N, H, W) - (H, W)
        elif normal_mode == "standardise":
            mean, scale = params[NORMAL_MAP_PARAM][0], params[NORMAL_MAP_PARAM][1]  # (H, W) each
            scored = (scored - mean) / scale
        if foreground_only:
            scored = foreground.masked_to_foreground(scored, region)
        return InferOutputs(recon, amap, top_k_score(scored, k), step)

    def network_pass(params, images, class_ids):
        """The networks on (n, h, w, C) inputs at the noise's shape: (recon, raw map (n, h, w), the score's
        raw map (n, h, w) where its error is weighted otherwise (`infer.score_chroma_weight`) else None,
        step (n,))."""
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
                eps_fn, sched, images, t_s, t_b, n1, n2, w=d.guidance_w, fuse_passes=fuse_passes
            )["recon"]
        elif method == "one_step":
            x_b = diffusion.q_sample(sched, images, t_b, n2)
            recon = jnp.clip(diffusion.x0_from_eps(sched, x_b, t_b, eps_fn(x_b, t_b)), -1.0, 1.0)
        elif method == "adaptive":
            a = config.infer
            out = diffusion.adaptive_reconstruct(
                eps_fn,
                sched,
                images,
                n2,
                t_max=int(a.adaptive_t_max),
                num_steps=int(a.ddim_steps),
                delta=float(a.adaptive_delta),
                margin=int(a.adaptive_margin),
                fusion_gain=float(a.adaptive_fusion_gain),
                score_fn=lambda d: top_k_score(d, k_pass),
            )
            recon, step = out["recon"], out["start_step"]
        else:
            keys = jnp.broadcast_to(raw_key, (n, raw_key.shape[0]))  # (N, 2)
            if method == "ddim":
                recon = diffusion.ddim_reconstruct(
                    eps_fn, sched, images, int(d.eval_t_big), int(config.infer.ddim_steps), keys
                )
            else:
                recon = diffusion.ddpm_reconstruct(eps_fn, sched, images, int(d.eval_t_big), keys)
        seg = None
        if config.infer.map != "recon_error":
            seg = seg_net.apply(
                {"params": params["seg"]}, jnp.concatenate([images, recon], axis=-1), class_ids=class_ids
            )[..., 0]

        def with_error(weight):  # the map holding the error weighted by `weight`: (n, h, w) in [0, 1]
            error = reconstruction_error(images, recon, weight)
            return error if seg is None else (seg + error) / 2.0  # the mean stays in [0, 1]

        if config.infer.map == "segmentation":
            return recon, seg, None, step
        return recon, with_error(chroma_weight), with_error(score_weight) if own_score_error else None, step

    return infer


def make_infer_fn(config: ml_collections.ConfigDict) -> Callable:
    """Jitted `infer(params, images) -> InferOutputs(recon, anomaly_map, score, denoise_step)` (see
    `make_infer_program`).

    Everything stays on device between the passes: one XLA program. Shard `images` over a mesh to run
    it data-parallel.
    """
    return jax.jit(make_infer_program(config), compiler_options=xla_options.compiler_options())
