"""Train state, the data-parallel train step, and the one-step norm-guided inference function.

One pure per-device step (forward both noise scales, segmentation on concat(input, recon), losses,
grads, `lax.pmean` over the mesh axis 'data', identical update on every replica) is mapped over the
devices with `jax.shard_map` under `jax.jit`: the pmap design in today's JAX. Every example's
timesteps and noises come from `fold_in(fold_in(key, step), global_example_index)`, so one step gives
the same numbers on 1, 4 or 8 devices and on 1 or 2 hosts.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from diff_fastener_jax import diffusion, losses
from diff_fastener_jax.config import ANOMALY_MAPS, INFER_METHODS
from diff_fastener_jax.models import build_models, init_params
from diff_fastener_jax.parallel import DATA_AXIS

Params = Any


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (a pytree; checkpointed whole)."""

    step: jax.Array  # () int32
    params: Params  # {'recon': ..., 'seg': ...}, float32
    opt_state: optax.OptState
    ema_params: Params  # same structure as params; equals params when EMA is off


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with its own learning rate per network, optional global-norm clipping (no weight decay)."""
    o = config.optim
    tx = optax.multi_transform(
        {"recon": optax.adam(o.lr_recon), "seg": optax.adam(o.lr_seg)},
        param_labels={"recon": "recon", "seg": "seg"},
    )
    if o.clip and o.clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.clip), tx)
    return tx


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array) -> TrainState:
    """Fresh float32 params for both networks and the optimizer state."""
    params = init_params(config, key)
    tx = make_optimizer(config)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params))


def example_noise(keys: jax.Array, shape: tuple[int, ...], tau: int, T: int):
    """Per-example (t_small, t_big, noise_small, noise_big) from per-example keys (B,)."""

    def one(k):
        k_ts, k_tb, k_n1, k_n2 = jax.random.split(k, 4)
        t_s = jax.random.randint(k_ts, (), 0, tau)
        t_b = jax.random.randint(k_tb, (), tau, T)
        return t_s, t_b, jax.random.normal(k_n1, shape), jax.random.normal(k_n2, shape)

    return jax.vmap(one)(keys)


def make_loss_fn(config: ml_collections.ConfigDict) -> Callable:
    """loss_fn(params, batch, t_s, t_b, n1, n2, dropout_key) -> (total, metrics) for one device's rows."""
    recon_net, seg_net = build_models(config)
    sched = diffusion.schedule_from_config(config.diffusion)
    lc = config.loss
    weights = {"noise": lc.noise_weight, "focal": lc.focal_weight, "smoothl1": lc.smoothl1_weight}

    def loss_fn(params, batch, t_s, t_b, n1, n2, dropout_key):
        image, mask, synth = batch["image"], batch["mask"], batch["is_synthetic"]

        def eps_fn(x, t):
            return recon_net.apply({"params": params["recon"]}, x, t, train=True, rngs={"dropout": dropout_key})

        out = diffusion.norm_guided_reconstruction(
            eps_fn, sched, image, t_s, t_b, n1, n2, w=config.diffusion.guidance_w, fuse_passes=True)
        recon = out["recon"]  # (b, H, W, C)
        if lc.detach_recon:
            recon = lax.stop_gradient(recon)
        logits = seg_net.apply({"params": params["seg"]}, jnp.concatenate([image, recon], axis=-1),
                               return_logits=True)  # (b, H, W, 1)
        prob = jax.nn.sigmoid(logits)
        if lc.anomaly_oriented_noise:
            noise = losses.anomaly_oriented_noise_loss(
                sched, out, n1, n2, batch, t_s, t_b)
        else:
            noise = losses.noise_loss(out["eps_small"], n1, out["eps_big"], n2, synth)
        terms = {
            "noise": noise,
            "focal": losses.focal_loss_from_logits(logits, mask, alpha=lc.focal_alpha, gamma=lc.focal_gamma),
            "smoothl1": losses.smooth_l1_loss(prob, mask, beta=lc.smoothl1_beta),
        }
        total = sum(weights[k] * v for k, v in terms.items())
        return total, terms

    return loss_fn


def make_train_step(config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
    """Returns the jitted, data-parallel `train_step(state, batch, key) -> (state, metrics)`.

    `batch` holds global arrays split over 'data' along the batch axis: image (B, H, W, C) in [-1, 1],
    mask (B, H, W, 1), is_synthetic (B,). `key` is the run's base key (replicated). The old state's
    buffers are donated. Metrics (replicated scalars): total, noise, focal, smoothl1, grad_norm,
    lr_recon, lr_seg, finite (1.0 if the update was applied; a non-finite loss leaves the state unchanged).
    """
    tx = make_optimizer(config)
    loss_fn = make_loss_fn(config)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    tau, T = config.diffusion.tau, config.diffusion.T
    ema_decay = float(config.optim.ema_decay)

    def per_device_step(state: TrainState, batch: dict, key: jax.Array):
        b = batch["image"].shape[0]
        device = lax.axis_index(DATA_AXIS)
        global_index = device * b + jnp.arange(b)  # rows of the global batch held here
        keys = diffusion.example_keys(key, state.step, global_index)
        t_s, t_b, n1, n2 = example_noise(keys, batch["image"].shape[1:], tau, T)
        dropout_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, state.step), 2**31 - 1), device)

        # Mark the replicated params as device-varying so each device differentiates its own loss
        # (the pmap picture); without it shard_map would already sum the gradients over devices.
        local_params = lax.pcast(state.params, DATA_AXIS, to="varying")
        (total, terms), grads = grad_fn(local_params, batch, t_s, t_b, n1, n2, dropout_key)
        grads = lax.pmean(grads, DATA_AXIS)
        total = lax.pmean(total, DATA_AXIS)
        terms = lax.pmean(terms, DATA_AXIS)

        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        if ema_decay > 0:
            new_ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                                             state.ema_params, new_params)
        else:
            new_ema = new_params
        finite = jnp.isfinite(total)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b_: jnp.where(finite, a, b_), new, old)  # noqa: E731
        new_state = TrainState(step=state.step + 1, params=keep(new_params, state.params),
                               opt_state=keep(new_opt, state.opt_state), ema_params=keep(new_ema, state.ema_params))
        metrics = {"total": total, **terms, "grad_norm": optax.global_norm(grads),
                   "lr_recon": jnp.float32(config.optim.lr_recon), "lr_seg": jnp.float32(config.optim.lr_seg),
                   "finite": finite.astype(jnp.float32)}
        return new_state, metrics

    sharded = jax.shard_map(per_device_step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()))
    return jax.jit(sharded, donate_argnums=(0,))


def top_k_count(config: ml_collections.ConfigDict, height: int, width: int) -> int:
    """K for the image score: `infer.top_k` at 256², scaled with the pixel count, at least 1."""
    return max(1, int(round(config.infer.top_k * height * width / (256 * 256))))


def make_infer_fn(config: ml_collections.ConfigDict) -> Callable:
    """Returns jitted `infer(params, images, key, indices) -> (recon, anomaly_map, score)`.

    images (N, H, W, C) in [-1, 1]; indices (N,) int32 dataset positions that seed each image's
    noise (so a score does not depend on how images are batched); recon (N, H, W, C); anomaly_map
    (N, H, W) in [0, 1] (segmentation probability, or |x - recon| averaged over channels for
    `infer.map='recon_error'`); score (N,) = mean of the top-K map values. Everything stays on device
    between the passes: one XLA program. Shard `images` over a mesh to run it data-parallel.
    """
    recon_net, seg_net = build_models(config)
    sched = diffusion.schedule_from_config(config.diffusion)
    d = config.diffusion
    if not 0 <= d.eval_t_small < d.eval_t_big < d.T:
        raise ValueError(f"diffusion: need 0 <= eval_t_small ({d.eval_t_small}) < eval_t_big ({d.eval_t_big}) < T ({d.T})")
    if config.infer.method not in INFER_METHODS:
        raise ValueError(f"infer.method must be one of {', '.join(INFER_METHODS)}, got {config.infer.method!r}")
    if config.infer.map not in ANOMALY_MAPS:
        raise ValueError(f"infer.map must be one of {', '.join(ANOMALY_MAPS)}, got {config.infer.map!r}")

    def infer(params, images, key, indices):
        n, h, w, _ = images.shape
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
        noises = jax.vmap(lambda k: jax.random.normal(k, (2, h, w, images.shape[-1])))(keys)  # (N, 2, H, W, C)
        t_s = jnp.full((n,), d.eval_t_small, jnp.int32)
        t_b = jnp.full((n,), d.eval_t_big, jnp.int32)

        def eps_fn(x, t):
            return recon_net.apply({"params": params["recon"]}, x, t)

        method = config.infer.method
        if method == "norm_guided":
            recon = diffusion.norm_guided_reconstruction(
                eps_fn, sched, images, t_s, t_b, noises[:, 0], noises[:, 1], w=d.guidance_w, fuse_passes=True)["recon"]
        elif method == "one_step":
            x_b = diffusion.q_sample(sched, images, t_b, noises[:, 1])
            recon = jnp.clip(diffusion.x0_from_eps(sched, x_b, t_b, eps_fn(x_b, t_b)), -1.0, 1.0)
        elif method == "ddim":
            recon = diffusion.ddim_reconstruct(eps_fn, sched, images, int(d.eval_t_big), int(config.infer.ddim_steps), keys)
        else:  # ddpm
            recon = diffusion.ddpm_reconstruct(eps_fn, sched, images, int(d.eval_t_big), keys)
        if config.infer.map == "segmentation":
            amap = seg_net.apply({"params": params["seg"]}, jnp.concatenate([images, recon], axis=-1))[..., 0]
        else:
            amap = diffusion.recon_error_map(images, recon) / 2.0  # [-1, 1] images: error in [0, 2]
        k = top_k_count(config, h, w)
        score = jnp.mean(lax.top_k(amap.reshape(n, h * w), k)[0], axis=-1)
        return recon, amap, score

    return jax.jit(infer)
