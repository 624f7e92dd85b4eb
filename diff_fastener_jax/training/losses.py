"""Training losses (DiffusionAD's noise + focal + SmoothL1, GLAD's anomaly-oriented noise target), pure
functions; every reduction is done in float32 even when the inputs are bfloat16.

- noise loss on the normal half: mean over normal examples of MSE(e_s, n1) + MSE(e_b, n2)
- focal loss on the segmentation output (alpha 0.5, gamma 4), from probabilities or (stabler) logits
- SmoothL1 (Huber with threshold beta) on the probabilities
- optional GLAD anomaly-oriented noise target for the synthetic half (GLAD, seed 003, eq. 10)
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from diff_fastener_jax.diffusion import Schedule

LOSS_TERMS = ("noise", "focal", "smoothl1")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def per_example_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every axis but the batch axis: (B, ...) -> (B,) float32."""
    d = _f32(pred) - _f32(target)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def noise_loss(
    eps_small: jax.Array, noise_small: jax.Array, eps_big: jax.Array, noise_big: jax.Array, is_synthetic: jax.Array
) -> jax.Array:
    """Noise-prediction loss on the NORMAL examples only (the paper's (1 - y) factor).

    eps_*, noise_* (B, H, W, C); is_synthetic (B,) in {0, 1}. Returns the scalar
    sum_{i normal} [MSE(e_s_i, n1_i) + MSE(e_b_i, n2_i)] / max(#normal, 1): an all-synthetic batch
    gives 0 (no NaN, and no gradient into the U-Net from this term).
    """
    normal = 1.0 - _f32(is_synthetic)  # (B,)
    per_ex = per_example_mse(eps_small, noise_small) + per_example_mse(eps_big, noise_big)  # (B,)
    return jnp.sum(normal * per_ex) / jnp.maximum(jnp.sum(normal), 1.0)


def focal_loss(
    prob: jax.Array, target: jax.Array, alpha: float = 0.5, gamma: float = 4.0, eps: float = 1e-6
) -> jax.Array:
    """Binary focal loss on probabilities, mean over all elements.

    prob, target (B, H, W, 1); target in [0, 1]. With pt = p y + (1 - p)(1 - y) and
    alpha_t = alpha y + (1 - alpha)(1 - y): loss = -alpha_t (1 - pt)^gamma log(clip(pt, eps, 1)).
    Only the log argument is clipped, so p = 0 or 1 gives a finite loss (at most -log(eps) times the
    weights) while the (1 - pt)^gamma factor keeps its exact value. Prefer `focal_loss_from_logits`
    when logits are at hand: it needs no clipping.
    """
    p, y = _f32(prob), _f32(target)
    pt = p * y + (1.0 - p) * (1.0 - y)
    alpha_t = alpha * y + (1.0 - alpha) * (1.0 - y)
    loss = -alpha_t * jnp.power(1.0 - pt, gamma) * jnp.log(jnp.clip(pt, eps, 1.0))
    return jnp.mean(loss)


def focal_loss_from_logits(logits: jax.Array, target: jax.Array, alpha: float = 0.5, gamma: float = 4.0) -> jax.Array:
    """The same focal loss computed from logits z (p = sigmoid(z)) without clipping.

    log pt = log(y sigmoid(z) + (1 - y) sigmoid(-z)) is evaluated as a log-sum-exp of
    log y + log_sigmoid(z) and log(1 - y) + log_sigmoid(-z), exact for soft targets too and finite
    for any z; 1 - pt = y sigmoid(-z) + (1 - y) sigmoid(z) is formed directly (no cancellation).
    Agrees with `focal_loss(sigmoid(z), y)` wherever pt > that function's eps.
    """
    z, y = _f32(logits), _f32(target)
    # log(0) = -inf for hard targets is intended: logaddexp then returns the other term exactly.
    log_y, log_1my = jnp.log(y), jnp.log1p(-y)
    log_pt = jnp.logaddexp(log_y + jax.nn.log_sigmoid(z), log_1my + jax.nn.log_sigmoid(-z))
    one_m_pt = y * jax.nn.sigmoid(-z) + (1.0 - y) * jax.nn.sigmoid(z)
    alpha_t = alpha * y + (1.0 - alpha) * (1.0 - y)
    return jnp.mean(-alpha_t * jnp.power(one_m_pt, gamma) * log_pt)


def smooth_l1_loss(pred: jax.Array, target: jax.Array, beta: float = 1.0) -> jax.Array:
    """Mean elementwise SmoothL1: 0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta (d = pred -
    target). beta = 0 is plain L1."""
    if beta < 0:
        raise ValueError(f"loss.smoothl1_beta must be >= 0, got {beta}")
    d = jnp.abs(_f32(pred) - _f32(target))
    if beta == 0:
        return jnp.mean(d)
    return jnp.mean(jnp.where(d < beta, 0.5 * jnp.square(d) / beta, d - 0.5 * beta))


# ----------------------------------------------------------------------------- GLAD (seed 003, eq. 10)


def anomaly_oriented_noise_target(
    sched: Schedule,
    noise: jax.Array,
    x_anomalous: jax.Array,
    x_clean: jax.Array,
    t: jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """GLAD's anomaly-oriented noise target for a noised synthetic image (seed 003, eq. 10).

    The network sees x_t = sqrt(ab_t) x_a + sqrt(1 - ab_t) eps, where x_a = x + n is the synthetic
    anomalous image and x its clean normal original (before synthesis). Instead of eps it is taught to
    predict the noise that explains x_t as a noised CLEAN image,

        target = (x_t - sqrt(ab_t) x) / sqrt(1 - ab_t) = eps + sqrt(ab_t) / sqrt(1 - ab_t) * (x_a - x),

    so that x0_from_eps(x_t, target) = x: one denoising step removes the anomaly. Where x_a = x (normal
    pixels, normal images) the target is eps, i.e. the ordinary loss. Sign note: the paper prints the
    correction with a minus sign (eps - sqrt(ab)/sqrt(1-ab) n), which would make the implied x0 equal
    x_a + n, away from normal; the plus sign above is the one consistent with its own eq. 8 goal and
    with the authors' released training code (x_t minus sqrt(ab) times the normal image, over
    sqrt(1 - ab)).

    noise, x_anomalous, x_clean (B, H, W, C); t (B,) int; mask optional (B, H, W, 1) or (B, H, W, C):
    when given the correction is applied only where mask > 0 (n multiplied by mask). -> (B, H, W, C)
    float32. NB: the factor sqrt(ab_t / (1 - ab_t)) is ~100 at t = 0 (linear schedule), so at small t
    the target can be large.
    """
    n = _f32(x_anomalous) - _f32(x_clean)  # (B, H, W, C)
    if mask is not None:
        n = n * _f32(mask)
    ratio = sched.sqrt_ab[t] / sched.sqrt_1m_ab[t]  # (B,)
    return _f32(noise) + ratio.reshape(ratio.shape + (1,) * (n.ndim - 1)) * n


def anomaly_oriented_noise_loss(
    sched: Schedule,
    out: Mapping[str, jax.Array],
    noise_small: jax.Array,
    noise_big: jax.Array,
    batch: Mapping[str, jax.Array],
    t_small: jax.Array,
    t_big: jax.Array,
    use_mask: bool = False,
) -> jax.Array:
    """Noise loss over ALL examples, the synthetic ones with GLAD's eq.-10 target (config
    loss.anomaly_oriented_noise).

    out: `diffusion.norm_guided_reconstruction` output (eps_small, eps_big). batch: 'image' (B, H, W, C)
    the network input (anomalous for synthetic rows), 'clean' (B, H, W, C) the same rows BEFORE
    synthesis (equal to 'image' for normal rows), 'is_synthetic' (B,), and 'mask' (B, H, W, 1) when
    use_mask. Normal rows get the plain target (their correction is zeroed by is_synthetic regardless
    of 'clean'). Returns mean_i [MSE(e_s_i, target_s_i) + MSE(e_b_i, target_b_i)].
    """
    if "clean" not in batch:
        raise KeyError(
            "loss.anomaly_oriented_noise=True needs batch['clean'] (each row's image before "
            "anomaly synthesis); the data pipeline did not provide it"
        )
    synth = _f32(batch["is_synthetic"])
    synth = synth.reshape(synth.shape + (1,) * (batch["image"].ndim - 1))  # (B, 1, 1, 1)
    image = _f32(batch["image"])
    clean = synth * _f32(batch["clean"]) + (1.0 - synth) * image
    mask = batch["mask"] if use_mask else None
    target_s = anomaly_oriented_noise_target(sched, noise_small, image, clean, t_small, mask)
    target_b = anomaly_oriented_noise_target(sched, noise_big, image, clean, t_big, mask)
    per_ex = per_example_mse(out["eps_small"], target_s) + per_example_mse(out["eps_big"], target_b)
    return jnp.mean(per_ex)
