"""Train state and the data-parallel train step (inference lives in `inference.py`).

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

from diff_fastener_jax import diffusion
from diff_fastener_jax.models import build_models, init_params, jit_init, tile_rows
from diff_fastener_jax.parallel import DATA_AXIS
from diff_fastener_jax.perf import xla_options
from diff_fastener_jax.training import losses

Params = Any


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (a pytree; checkpointed whole)."""

    step: jax.Array  # () int32
    params: Params  # {'recon': ..., 'seg': ...}, float32
    opt_state: optax.OptState
    # Same structure as params with EMA on; an empty dict with EMA off (optim.ema_decay = 0), so the
    # paper config does not carry (and checkpoint) a second copy of its 149 M parameters.
    ema_params: Params

    @property
    def inference_params(self) -> Params:
        """The weights to validate, evaluate and deploy: the EMA copy when EMA is on, else params."""
        return self.ema_params if self.ema_params else self.params


def learning_rate_schedule(config: ml_collections.ConfigDict, peak: float) -> float | optax.Schedule:
    """`optim.schedule`: 'constant' (the paper), or 'warmup_cosine': linear warm-up over
    `optim.warmup_steps` to `peak`, then cosine decay to `optim.final_lr_fraction` x peak at
    train.num_steps (short runs learn more per step with a high peak they can then settle from).
    'constant' returns the float itself, so the optimizer state keeps the layout of older checkpoints."""
    o = config.optim
    schedule = str(o.get("schedule", "constant"))
    if schedule == "constant":
        return float(peak)
    if schedule != "warmup_cosine":
        raise ValueError(f"optim.schedule must be 'constant' or 'warmup_cosine', got {schedule!r}")
    total = int(config.train.num_steps)
    if total <= 0:
        raise ValueError("optim.schedule='warmup_cosine' needs train.num_steps > 0 (the decay horizon)")
    warmup = min(int(o.warmup_steps), total - 1)
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, max(warmup, 1), total, end_value=peak * float(o.final_lr_fraction)
    )


def _rate_at(rate: float | optax.Schedule, step: jax.Array) -> jax.Array:
    return jnp.asarray(rate(step) if callable(rate) else rate, jnp.float32)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam with its own learning rate (schedule) per network, optional global-norm clipping (no weight decay)."""
    o = config.optim
    tx = optax.multi_transform(
        {
            "recon": optax.adam(learning_rate_schedule(config, o.lr_recon)),
            "seg": optax.adam(learning_rate_schedule(config, o.lr_seg)),
        },
        param_labels={"recon": "recon", "seg": "seg"},
    )
    if o.clip and o.clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.clip), tx)
    return tx


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array, compiled: bool = True) -> TrainState:
    """Fresh float32 params for both networks and the optimizer state.

    `compiled` (default) makes this one jitted program, as in `init_params` (see there): eagerly,
    every parameter's optimizer moments would also be a separately compiled `zeros_like`.
    """

    def create(key):
        params = init_params(config, key, compiled=False)  # traced: the jit below compiles it
        tx = make_optimizer(config)
        ema = jax.tree_util.tree_map(jnp.copy, params) if float(config.optim.ema_decay) > 0 else {}
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=ema)

    return jit_init(create, key) if compiled else create(key)


def training_timestep_ranges(diffusion_cfg) -> tuple[tuple[int, int], tuple[int, int]]:
    """Half-open [lo, hi) ranges that training draws t_small and t_big from.

    The paper's: t_s in [0, tau), t_b in [tau, T). With `diffusion.train_t_window` W > 0, each range is
    narrowed to the W steps either side of the step that one-step inference queries
    (`eval_t_small`, `eval_t_big`), clipped to the paper's range: norm-guided and one-step inference
    ask the noise predictor about exactly two steps, so a short run spends all its updates there.
    """
    d = diffusion_cfg
    tau, T, w = int(d.tau), int(d.T), int(d.get("train_t_window", 0))
    if w <= 0:
        return (0, tau), (tau, T)
    ts, tb = int(d.eval_t_small), int(d.eval_t_big)
    return (max(0, ts - w), min(tau, ts + w + 1)), (max(tau, tb - w), min(T, tb + w + 1))


def example_noise(keys: jax.Array, shape: tuple[int, ...], small: tuple[int, int], big: tuple[int, int]):
    """Per-example (t_small, t_big, noise_small, noise_big) from per-example keys (B,); t_small is
    uniform on the half-open range `small`, t_big on `big` (see `training_timestep_ranges`)."""

    def one(k):
        k_ts, k_tb, k_n1, k_n2 = jax.random.split(k, 4)
        t_s = jax.random.randint(k_ts, (), small[0], small[1])
        t_b = jax.random.randint(k_tb, (), big[0], big[1])
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
        cls = batch["class_id"] if recon_net.num_classes else None  # (b,) int32 in a unified model

        def eps_fn(x, t):
            return recon_net.apply(
                {"params": params["recon"]},
                x,
                t,
                train=True,
                rngs={"dropout": dropout_key},
                class_ids=tile_rows(cls, x.shape[0]),
            )

        out = diffusion.norm_guided_reconstruction(
            eps_fn, sched, image, t_s, t_b, n1, n2, w=config.diffusion.guidance_w, fuse_passes=True
        )
        recon = out["recon"]  # (b, H, W, C)
        if lc.detach_recon:
            recon = lax.stop_gradient(recon)
        logits = seg_net.apply(
            {"params": params["seg"]}, jnp.concatenate([image, recon], axis=-1), return_logits=True, class_ids=cls
        )  # (b, H, W, 1)
        prob = jax.nn.sigmoid(logits)
        if lc.anomaly_oriented_noise:
            noise = losses.anomaly_oriented_noise_loss(sched, out, n1, n2, batch, t_s, t_b)
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
    t_small_range, t_big_range = training_timestep_ranges(config.diffusion)
    ema_decay = float(config.optim.ema_decay)
    lr_recon = learning_rate_schedule(config, config.optim.lr_recon)
    lr_seg = learning_rate_schedule(config, config.optim.lr_seg)

    micro = int(config.train.get("microbatch", 0))

    def accumulated_grads(local_params, params, b: int, batch: dict, noises: tuple, dropout_key):
        """Loss and gradients of this device's rows taken `micro` rows at a time (lax.scan: one
        microbatch's activations alive at once) and averaged. Rows alternate normal / synthetic, so
        every even-sized slice is half and half, each loss term is a mean over equal counts, and the
        average equals the whole-batch value up to float summation order."""
        n_micro = b // micro
        split = lambda x: x.reshape((n_micro, micro) + x.shape[1:])  # noqa: E731
        slices = jax.tree_util.tree_map(split, (dict(batch), noises))
        varying_zeros = lambda tree: jax.tree_util.tree_map(  # noqa: E731
            lambda x: lax.pcast(jnp.zeros(jnp.shape(x), x.dtype), DATA_AXIS, to="varying"), tree
        )
        zero_terms = {k: jnp.zeros((), jnp.float32) for k in ("noise", "focal", "smoothl1")}
        init = (varying_zeros(jnp.zeros((), jnp.float32)), varying_zeros(zero_terms), varying_zeros(params))

        def body(carry, inputs):
            (mb, (ts, tb, a, c)), i = inputs
            (tot, terms), g = grad_fn(local_params, mb, ts, tb, a, c, jax.random.fold_in(dropout_key, i))
            add = lambda x, y: jax.tree_util.tree_map(jnp.add, x, y)  # noqa: E731
            return (carry[0] + tot, add(carry[1], terms), add(carry[2], g)), None

        (total, terms, grads), _ = lax.scan(body, init, (slices, jnp.arange(n_micro)))
        scale = lambda tree: jax.tree_util.tree_map(lambda x: x / n_micro, tree)  # noqa: E731
        return (scale(total), scale(terms)), scale(grads)

    def per_device_step(state: TrainState, batch: dict, key: jax.Array):
        b = batch["image"].shape[0]
        device = lax.axis_index(DATA_AXIS)
        global_index = device * b + jnp.arange(b)  # rows of the global batch held here
        keys = diffusion.example_keys(key, state.step, global_index)
        t_s, t_b, n1, n2 = example_noise(keys, batch["image"].shape[1:], t_small_range, t_big_range)
        dropout_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, state.step), 2**31 - 1), device)

        # Mark the replicated params as device-varying so each device differentiates its own loss
        # (the pmap picture); without it shard_map would already sum the gradients over devices.
        local_params = lax.pcast(state.params, DATA_AXIS, to="varying")
        if micro and micro < b:
            (total, terms), grads = accumulated_grads(
                local_params, state.params, b, batch, (t_s, t_b, n1, n2), dropout_key
            )
        else:
            (total, terms), grads = grad_fn(local_params, batch, t_s, t_b, n1, n2, dropout_key)
        grads = lax.pmean(grads, DATA_AXIS)
        total = lax.pmean(total, DATA_AXIS)
        terms = lax.pmean(terms, DATA_AXIS)

        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        if ema_decay > 0:
            # Warm-up of the decay, (1 + n) / (10 + n): early random weights fade out in short runs.
            n = state.step.astype(jnp.float32)
            decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
            new_ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, new_params)
        else:
            new_ema = state.ema_params  # {}: nothing carried
        finite = jnp.isfinite(total)
        keep = lambda new, old: jax.tree_util.tree_map(lambda a, b_: jnp.where(finite, a, b_), new, old)  # noqa: E731
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt, state.opt_state),
            ema_params=keep(new_ema, state.ema_params),
        )
        metrics = {
            "total": total,
            **terms,
            "grad_norm": optax.global_norm(grads),
            "lr_recon": _rate_at(lr_recon, state.step),
            "lr_seg": _rate_at(lr_seg, state.step),
            "finite": finite.astype(jnp.float32),
        }
        return new_state, metrics

    sharded = jax.shard_map(per_device_step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=(P(), P()))
    # On XLA:CPU, Eigen convolutions instead of YNNPACK's (xla_options.py: 1.76x on the demo step).
    return jax.jit(sharded, donate_argnums=(0,), compiler_options=xla_options.compiler_options())
