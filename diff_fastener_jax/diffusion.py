"""Diffusion maths as pure functions (DDPM, DiffusionAD): schedules, noising, norm-guided one-step
reconstruction, iterative DDIM/DDPM reconstruction, per-example randomness.

Conventions: images are NHWC in [-1, 1]; timesteps are int32 (B,) indices into the schedule, 0-based
(t = 0 is the first, least noisy step); every schedule array is computed in float64 numpy and stored
float32. `eps_fn(x_t, t) -> eps` is any callable (the network call in practice), so the functions here
know nothing about Flax parameters.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]

SCHEDULE_KINDS = ("linear", "cosine")


@flax.struct.dataclass
class Schedule:
    """Noise schedule tables, float32 (T,) each; `T` is static (not a pytree leaf).

    betas[t] is the variance added at step t; alphas_cumprod[t] = prod_{s<=t} (1 - betas[s]) (alpha_bar);
    sqrt_ab / sqrt_1m_ab are sqrt(alpha_bar) and sqrt(1 - alpha_bar). The posterior_* tables serve
    ancestral (DDPM) sampling: q(x_{t-1} | x_t, x0) = N(c0[t] x0 + ct[t] x_t, var[t]), with alpha_bar
    of "step -1" taken as 1 so that step 0 maps straight to x0.
    """

    betas: jax.Array
    alphas_cumprod: jax.Array
    sqrt_ab: jax.Array
    sqrt_1m_ab: jax.Array
    alphas_cumprod_prev: jax.Array
    posterior_var: jax.Array
    posterior_c0: jax.Array
    posterior_ct: jax.Array
    T: int = flax.struct.field(pytree_node=False)


def _linear_betas(T: int, beta_start: float, beta_end: float) -> np.ndarray:
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def _cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved-DDPM cosine schedule: alpha_bar(u) = cos^2(((u + s) / (1 + s)) * pi/2), u = t/T;
    beta_t = 1 - alpha_bar((t+1)/T) / alpha_bar(t/T), clipped at max_beta (the end of the curve would
    otherwise reach beta = 1, a singular last step)."""
    u = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((u + s) / (1.0 + s) * math.pi / 2.0) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def make_schedule(T: int = 1000, kind: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
    """Builds the schedule tables in float64 and stores them float32.

    kind: 'linear' (betas evenly spaced from beta_start to beta_end, DDPM) or 'cosine' (improved DDPM,
    s = 0.008, betas clipped at 0.999; beta_start/beta_end are ignored).
    """
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 2:
        raise ValueError(f"diffusion.T must be an integer >= 2, got {T!r}")
    T = int(T)
    if kind == "linear":
        if not (0.0 < beta_start <= beta_end < 1.0):
            raise ValueError(
                "diffusion.beta_start/beta_end: need 0 < beta_start <= beta_end < 1, "
                f"got beta_start={beta_start}, beta_end={beta_end}"
            )
        betas = _linear_betas(T, beta_start, beta_end)
    elif kind == "cosine":
        betas = _cosine_betas(T)
    else:
        raise ValueError(f"diffusion.schedule: unknown kind {kind!r}; choose one of {SCHEDULE_KINDS}")

    alphas = 1.0 - betas
    ab = np.cumprod(alphas)  # (T,)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    one_m_ab = 1.0 - ab
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(ab),
        sqrt_ab=f32(np.sqrt(ab)),
        sqrt_1m_ab=f32(np.sqrt(one_m_ab)),
        alphas_cumprod_prev=f32(ab_prev),
        posterior_var=f32(betas * (1.0 - ab_prev) / one_m_ab),
        posterior_c0=f32(betas * np.sqrt(ab_prev) / one_m_ab),
        posterior_ct=f32((1.0 - ab_prev) * np.sqrt(alphas) / one_m_ab),
        T=T,
    )


def schedule_from_config(diffusion_cfg: Any) -> Schedule:
    """`make_schedule` from the config's `diffusion` block (keys T, schedule, beta_start, beta_end)."""
    try:
        T, kind = diffusion_cfg.T, diffusion_cfg.schedule
        beta_start, beta_end = diffusion_cfg.beta_start, diffusion_cfg.beta_end
    except (AttributeError, KeyError) as e:
        raise ValueError(f"config.diffusion is missing a key ({e}); need T, schedule, beta_start, beta_end") from e
    return make_schedule(T=T, kind=kind, beta_start=beta_start, beta_end=beta_end)


# ----------------------------------------------------------------------------- noising


def _per_sample(table: jax.Array, t: jax.Array, like: jax.Array) -> jax.Array:
    """table[t] shaped (B, 1, 1, ...) to broadcast over every axis of `like` after the batch axis."""
    coef = table[jnp.asarray(t, jnp.int32)]  # (B,)
    return coef.reshape(coef.shape + (1,) * (like.ndim - 1))


def _float(x: jax.Array) -> jax.Array:
    """At least float32 (bf16 inputs are promoted so the maths is done in float32)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def q_sample(sched: Schedule, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps. x0, eps (B, H, W, C); t (B,) int -> (B, H, W, C)."""
    x0, eps = _float(x0), _float(eps)
    return _per_sample(sched.sqrt_ab, t, x0) * x0 + _per_sample(sched.sqrt_1m_ab, t, x0) * eps


def x0_from_eps(sched: Schedule, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """Inverts q_sample for x0: (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t). Shapes as q_sample; no clipping."""
    x_t, eps = _float(x_t), _float(eps)
    return (x_t - _per_sample(sched.sqrt_1m_ab, t, x_t) * eps) / _per_sample(sched.sqrt_ab, t, x_t)


# ----------------------------------------------------------------------------- norm-guided one step


def _eps_both(eps_fn: EpsFn, x_small, t_small, x_big, t_big, fuse_passes: bool):
    """eps for both noise scales; fused = one eps_fn call on the batch-concatenation (2B, ...)."""
    if fuse_passes:
        b = x_small.shape[0]
        eps = eps_fn(
            jnp.concatenate([x_small, x_big], axis=0),
            jnp.concatenate([jnp.asarray(t_small, jnp.int32), jnp.asarray(t_big, jnp.int32)]),
        )
        return _float(eps[:b]), _float(eps[b:])
    return _float(eps_fn(x_small, t_small)), _float(eps_fn(x_big, t_big))


def norm_guided_reconstruction(
    eps_fn: EpsFn,
    sched: Schedule,
    x: jax.Array,
    t_small: jax.Array,
    t_big: jax.Array,
    noise_small: jax.Array,
    noise_big: jax.Array,
    w: float = 1.0,
    fuse_passes: bool = True,
) -> dict[str, jax.Array]:
    """One-step norm-guided reconstruction (DiffusionAD's norm-guided one-step denoising, steps 1-6 below).

    x (B, H, W, C) in [-1, 1]; t_small, t_big (B,) int with t_small < t_big; noise_* like x.
      1. x_s = q_sample(x, t_s, n1), x_b = q_sample(x, t_b, n2)
      2. e_s = eps(x_s, t_s), e_b = eps(x_b, t_b)
      3. x0_b = clip(x0_from_eps(x_b, t_b, e_b), -1, 1)         the big step's anomaly-free estimate
      4. x_guide = q_sample(x0_b, t_s, e_s)                       re-noised with the PREDICTED e_s
      5. e_hat = e_s - w * sqrt(1 - ab_{t_s}) * (x_guide - x_s)   pull e_s toward the big-step estimate
      6. recon = clip(x0_from_eps(x_s, t_s, e_hat), -1, 1)
    fuse_passes=True evaluates both scales in one eps_fn call on a (2B, ...) batch (one network pass,
    better device use); the result equals two separate calls up to float tolerance, as long as eps_fn
    treats examples independently (true for the U-Nets: GroupNorm, no batch statistics).

    Returns dict(recon, x_small, x_big, eps_small, eps_big, x0_big, x_guide, eps_hat), all (B, H, W, C)
    float32.
    """
    x = _float(x)
    x_small = q_sample(sched, x, t_small, noise_small)  # (B, H, W, C)
    x_big = q_sample(sched, x, t_big, noise_big)
    eps_small, eps_big = _eps_both(eps_fn, x_small, t_small, x_big, t_big, fuse_passes)
    x0_big = jnp.clip(x0_from_eps(sched, x_big, t_big, eps_big), -1.0, 1.0)
    x_guide = q_sample(sched, x0_big, t_small, eps_small)
    eps_hat = eps_small - w * _per_sample(sched.sqrt_1m_ab, t_small, x) * (x_guide - x_small)
    recon = jnp.clip(x0_from_eps(sched, x_small, t_small, eps_hat), -1.0, 1.0)
    return {
        "recon": recon,
        "x_small": x_small,
        "x_big": x_big,
        "eps_small": eps_small,
        "eps_big": eps_big,
        "x0_big": x0_big,
        "x_guide": x_guide,
        "eps_hat": eps_hat,
    }


# ----------------------------------------------------------------------------- per-example randomness


def example_keys(key: jax.Array, step: jax.Array | int, global_indices: jax.Array) -> jax.Array:
    """keys[i] = fold_in(fold_in(key, step), global_indices[i]).

    A raw uint32 key (2,) gives (B, 2); a typed key () gives (B,). Because the key depends only on
    (step, global example index), an example gets the same randomness whatever device or batch slot
    holds it, so a step is reproducible across device counts.
    """
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.asarray(global_indices, jnp.int32))


def per_example_normal(keys: jax.Array, shape_per_example: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """Standard normals (B, *shape_per_example), row i drawn from keys[i] alone."""
    return jax.vmap(lambda k: jax.random.normal(k, tuple(shape_per_example), dtype))(keys)


def _is_key_batch(key: jax.Array) -> bool:
    """True for a batch of keys ((B, 2) raw or (B,) typed), False for one key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2


def _normal_like(key: jax.Array, x: jax.Array, salt: jax.Array | int) -> jax.Array:
    """Standard normals shaped like x from fold_in(key, salt); per-example when `key` is a batch."""
    if _is_key_batch(key):
        keys = jax.vmap(lambda k: jax.random.fold_in(k, salt))(key)
        return per_example_normal(keys, x.shape[1:], x.dtype)
    return jax.random.normal(jax.random.fold_in(key, salt), x.shape, x.dtype)


# ----------------------------------------------------------------------------- iterative reconstruction


def _check_t_start(sched: Schedule, t_start: int) -> int:
    if isinstance(t_start, bool) or not isinstance(t_start, (int, np.integer)) or not 0 <= t_start < sched.T:
        raise ValueError(f"t_start must be a Python int in [0, T={sched.T}), got {t_start!r}")
    return int(t_start)


def ddim_timesteps(t_start: int, num_steps: int) -> np.ndarray:
    """The num_steps evaluation times of DDIM, evenly spaced from t_start down to 0 (int, descending;
    repeats are possible when num_steps > t_start + 1 and are harmless: an eta=0 step from t to t is
    the identity)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if num_steps == 1:
        return np.array([t_start], dtype=np.int32)
    return np.round(np.linspace(t_start, 0, num_steps)).astype(np.int32)


def ddim_reconstruct(
    eps_fn: EpsFn, sched: Schedule, x: jax.Array, t_start: int, num_steps: int, key: jax.Array
) -> jax.Array:
    """Noise x to t_start, then deterministic DDIM (eta = 0) down to a clean image.

    x (B, H, W, C) in [-1, 1]; t_start, num_steps Python ints. eps is evaluated at num_steps times
    evenly spaced from t_start to 0 (`ddim_timesteps`); each step predicts x0 (clipped to [-1, 1]) and
    moves to the next time as x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps, with ab_prev = 1 after
    the last step, so the output is the final x0 prediction. `key` is one key, or a batch of per-example
    keys (`example_keys`) so that the starting noise does not depend on batching. -> (B, H, W, C).
    """
    t_start = _check_t_start(sched, t_start)
    times = ddim_timesteps(t_start, num_steps)  # (S,) descending
    # alpha_bar of the time each step moves to; 1 after the last step (= clean image)
    ab_next = jnp.concatenate([sched.alphas_cumprod[jnp.asarray(times[1:])], jnp.ones((1,), jnp.float32)])
    x = _float(x)
    b = x.shape[0]
    x_t = q_sample(sched, x, jnp.full((b,), t_start, jnp.int32), _normal_like(key, x, sched.T))

    def step(x_t, inputs):
        t, ab_n = inputs
        tt = jnp.full((b,), t, jnp.int32)
        eps = _float(eps_fn(x_t, tt))
        x0 = jnp.clip(x0_from_eps(sched, x_t, tt, eps), -1.0, 1.0)
        # eps re-derived from the clipped x0 keeps the step consistent with what is carried forward
        eps = (x_t - _per_sample(sched.sqrt_ab, tt, x_t) * x0) / _per_sample(sched.sqrt_1m_ab, tt, x_t)
        x_prev = jnp.sqrt(ab_n) * x0 + jnp.sqrt(1.0 - ab_n) * eps
        return x_prev, None

    x_out, _ = lax.scan(step, x_t, (jnp.asarray(times), ab_next))
    return jnp.clip(x_out, -1.0, 1.0)


def ddpm_reconstruct(eps_fn: EpsFn, sched: Schedule, x: jax.Array, t_start: int, key: jax.Array) -> jax.Array:
    """Noise x to t_start, then ancestral DDPM sampling t_start, t_start-1, ..., 0.

    Each step predicts x0 (clipped to [-1, 1]) and draws x_{t-1} ~ N(c0[t] x0 + ct[t] x_t, var[t])
    (the true posterior q(x_{t-1} | x_t, x0)); var[0] = 0 and c0[0] = 1, so the last step returns the
    x0 prediction. x (B, H, W, C) in [-1, 1]; t_start a Python int; `key` one key or per-example keys.
    -> (B, H, W, C) in [-1, 1].
    """
    t_start = _check_t_start(sched, t_start)
    x = _float(x)
    b = x.shape[0]
    x_t = q_sample(sched, x, jnp.full((b,), t_start, jnp.int32), _normal_like(key, x, sched.T))

    def step(x_t, t):
        tt = jnp.full((b,), t, jnp.int32)
        eps = _float(eps_fn(x_t, tt))
        x0 = jnp.clip(x0_from_eps(sched, x_t, tt, eps), -1.0, 1.0)
        mean = sched.posterior_c0[t] * x0 + sched.posterior_ct[t] * x_t
        z = _normal_like(key, x_t, t)  # salt t < T: distinct from the starting noise's salt T
        return mean + jnp.sqrt(sched.posterior_var[t]) * z, None

    x_out, _ = lax.scan(step, x_t, jnp.arange(t_start, -1, -1, dtype=jnp.int32))
    return jnp.clip(x_out, -1.0, 1.0)


# ----------------------------------------------------------------------------- GLAD adaptive step


def adaptive_reconstruct(
    eps_fn: EpsFn,
    sched: Schedule,
    x: jax.Array,
    noise: jax.Array,
    *,
    t_max: int,
    num_steps: int,
    delta: float,
    margin: int,
    fusion_gain: float,
    score_fn: Callable[[jax.Array], jax.Array],
) -> dict[str, jax.Array]:
    """GLAD's adaptive denoising step (seed 003 §3.3) with spatial-adaptive fusion (§3.4), per image,
    batched in one program.

    x (B, H, W, C) in [-1, 1]; noise (B, H, W, C), the one noise every x_t of the input is made with.
    The DDIM grid t_0 = t_max > ... > t_{S-1} = 0 (`ddim_timesteps(t_max, num_steps)`).

    Detection pass: DDIM from x_{t_max} = q_sample(x, t_max); at each grid time t_i the noise-free
    estimate of the denoised sample, x̂_{t->0}, is compared with that of the input noised straight to
    t_i, x_{t->0} (eq. 2; both from one fused 2B network call): d_i = mean_c |x̂_{t->0} - x_{t->0}| / 2
    (B, H, W) in [0, 1], s_i = score_fn(d_i) (B,). The stop index j is the first i with s_i > delta
    (S-1 when none is): there the input's content first departs from what the model would make of it,
    so a larger anomaly stops earlier (at a larger t).

    Reconstruction pass: start from the input noised to the grid time `margin` steps before the stop
    (i* = max(j - margin, 0); GLAD's t + n) and denoise with DDIM. At t_j the two noise-free estimates
    are fused with m = sigmoid(fusion_gain * (d_j / delta - 1)) (eq. 6-7: the denoised content where the
    input departs, the input's own elsewhere; m = 0.5 at d = delta whatever delta's scale) and the step continues from sqrt(ab) x0_f + sqrt(1-ab) noise
    (eq. 7's consistent noise), taking that noise as the step's eps instead of another network call.
    Every image runs the whole grid (rows before their start are overwritten), so the per-image start
    costs no Python control flow: S fused 2B calls plus S B calls.

    Returns dict(recon (B, H, W, C) in [-1, 1], start_step (B,) int32 = t_{i*}, stop_step (B,) int32 =
    t_j, step_scores (B, S) float32 = s_i).
    """
    t_max = _check_t_start(sched, t_max)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    times = ddim_timesteps(t_max, num_steps)  # (S,) descending, ends at 0
    n_steps = len(times)
    ab_next = jnp.concatenate([sched.alphas_cumprod[jnp.asarray(times[1:])], jnp.ones((1,), jnp.float32)])
    x, noise = _float(x), _float(noise)
    b = x.shape[0]
    idx = jnp.arange(n_steps, dtype=jnp.int32)

    def clipped_x0(x_t, tt, eps):
        x0 = jnp.clip(x0_from_eps(sched, x_t, tt, eps), -1.0, 1.0)
        # eps re-derived from the clipped x0 keeps a DDIM step consistent with what it carries forward
        return x0, (x_t - _per_sample(sched.sqrt_ab, tt, x_t) * x0) / _per_sample(sched.sqrt_1m_ab, tt, x_t)

    def detect(carry, inputs):
        x_hat, found, stop, d_stop, x0_in_stop = carry
        i, t, ab_n = inputs
        tt = jnp.full((b,), t, jnp.int32)
        x_in = q_sample(sched, x, tt, noise)
        eps_hat, eps_in = _eps_both(eps_fn, x_hat, tt, x_in, tt, True)
        x0_hat, eps_hat = clipped_x0(x_hat, tt, eps_hat)
        x0_in, _ = clipped_x0(x_in, tt, eps_in)
        d = jnp.mean(jnp.abs(x0_hat - x0_in), axis=-1) / 2.0  # (B, H, W)
        s = _float(score_fn(d))  # (B,)
        hit = ((s > delta) | (i == n_steps - 1)) & ~found
        stop = jnp.where(hit, i, stop)
        d_stop = jnp.where(hit[:, None, None], d, d_stop)
        x0_in_stop = jnp.where(hit[:, None, None, None], x0_in, x0_in_stop)
        x_next = jnp.sqrt(ab_n) * x0_hat + jnp.sqrt(1.0 - ab_n) * eps_hat
        return (x_next, found | hit, stop, d_stop, x0_in_stop), s

    x_start = q_sample(sched, x, jnp.full((b,), t_max, jnp.int32), noise)
    init = (
        x_start,
        jnp.zeros((b,), bool),
        jnp.full((b,), n_steps - 1, jnp.int32),
        jnp.zeros(x.shape[:-1], jnp.float32),
        jnp.zeros_like(x),
    )
    xs = (idx, jnp.asarray(times), ab_next)
    (_, _, stop, d_stop, x0_in_stop), step_scores = lax.scan(detect, init, xs)
    start = jnp.maximum(stop - margin, 0)  # (B,)
    mask = jax.nn.sigmoid(fusion_gain * (d_stop / max(delta, 1e-12) - 1.0))[..., None]  # (B, H, W, 1)

    def reconstruct(y, inputs):
        i, t, ab_n = inputs
        tt = jnp.full((b,), t, jnp.int32)
        before = (i <= start)[:, None, None, None]
        y = jnp.where(before, q_sample(sched, x, tt, noise), y)  # not started yet: the noised input
        x0, eps = clipped_x0(y, tt, _float(eps_fn(y, tt)))
        at_stop = (i == stop)[:, None, None, None]
        x0 = jnp.where(at_stop, mask * x0 + (1.0 - mask) * x0_in_stop, x0)
        eps = jnp.where(at_stop, noise, eps)
        return jnp.sqrt(ab_n) * x0 + jnp.sqrt(1.0 - ab_n) * eps, None

    recon, _ = lax.scan(reconstruct, x_start, xs)
    times_j = jnp.asarray(times)
    return {
        "recon": jnp.clip(recon, -1.0, 1.0),
        "start_step": times_j[start],
        "stop_step": times_j[stop],
        "step_scores": jnp.moveaxis(step_scores, 0, 1),
    }


def recon_error_map(x: jax.Array, recon: jax.Array) -> jax.Array:
    """Seed-002 anomaly map: |x - recon| averaged over channels, (B, H, W, C) -> (B, H, W) float32."""
    return jnp.mean(jnp.abs(_float(x) - _float(recon)), axis=-1)
