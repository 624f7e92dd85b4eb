"""The two benchmarked programs (whole inference, whole train step): compiled, costed and timed, or
only compiled (`compile_*`: abstract inputs, nothing allocated or run, for sizing a device)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diff_fastener_jax import parallel
from diff_fastener_jax.config import class_names
from diff_fastener_jax.data.sizing import size_hw
from diff_fastener_jax.deploy import normal_map
from diff_fastener_jax.inference import NORMAL_MAP_PARAM, make_infer_fn, model_image_shape, network_image_shape
from diff_fastener_jax.models import init_params
from diff_fastener_jax.perf.flop_count import compile_counted, jaxpr_flops
from diff_fastener_jax.perf.xla_stats import (
    blocked_seconds,
    compiled_cost,
    compiled_memory_bytes,
    median_seconds,
)
from diff_fastener_jax.training.train_step import create_train_state, make_train_step


def _row(batch: int, devices: int, flops: float, nbytes: float, compiled, sec: float | None, xla_flops: float) -> dict:
    """One record row. `flops`: matrix-unit FLOPs counted from the jaxpr (perf/flop_count.py), the
    numerator of every rate; `xla_flops`, `nbytes`: XLA's cost analysis of the compiled program (on
    GPUs it leaves cuDNN's convolutions out, so it is kept for reference only)."""
    row = {
        "batch": batch,
        "devices": devices,
        "gflops_per_image": flops / batch / 1e9,
        "xla_gflops_per_image": xla_flops / batch / 1e9,
        "gbytes_per_image": nbytes / batch / 1e9,
        "xla_peak_memory_bytes": compiled_memory_bytes(compiled),
    }
    if sec is not None:
        row.update({"images_per_s": batch / sec, "ms_per_image": 1000 * sec / batch, "tflops": flops / sec / 1e12})
    return row


def _abstract(tree, sharding=None):
    """ShapeDtypeStructs (optionally carrying `sharding`) for every array leaf of `tree`."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


# ----------------------------------------------------------------------------- inference


def _infer_inputs(config, batch: int, mesh, abstract: bool, params=None):
    """(params, images[, class_ids]) for `infer`: abstract ShapeDtypeStructs, or real arrays (random
    images in [-1, 1]; class ids cycling over a unified model's classes)."""
    h, w, c = model_image_shape(config)
    num_classes = len(class_names(config))
    if abstract:
        params = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0)) if params is None else params
    if normal_map.fitted(config):  # a stand-in normal map: the program's cost does not depend on it
        neutral = normal_map.neutral(config, h, w)
        params = {
            **params,
            NORMAL_MAP_PARAM: jax.ShapeDtypeStruct(neutral.shape, jnp.float32) if abstract else jnp.asarray(neutral),
        }
    if abstract:
        sharding = None if mesh is None else parallel.data_sharding(mesh)
        inputs = [jax.ShapeDtypeStruct((batch, h, w, c), jnp.float32, sharding=sharding)]
        if num_classes:
            inputs.append(jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding))
        if mesh is not None:
            params = _abstract(params, parallel.replicated(mesh))
        return (params, *inputs)
    inputs = [jax.random.uniform(jax.random.key(2), (batch, h, w, c), minval=-1.0, maxval=1.0)]
    if num_classes:
        inputs.append(jnp.arange(batch, dtype=jnp.int32) % num_classes)
    if mesh is not None:
        params = jax.device_put(params, parallel.replicated(mesh))
        inputs = [jax.device_put(x, parallel.data_sharding(mesh)) for x in inputs]
    return (params, *inputs)


def bench_infer(config, params, batch: int, repeats: int, mesh=None) -> tuple[dict, float]:
    """One inference row at `batch` images (data-parallel over `mesh` when given) and its compile seconds."""
    partitions = 1 if mesh is None else mesh.devices.size
    infer = make_infer_fn(config)
    args = _infer_inputs(config, batch, mesh, abstract=False, params=params)
    compiled, compile_s, flops = compile_counted(infer, args)
    xla_flops, nbytes = compiled_cost(compiled, partitions)
    sec = median_seconds(lambda: compiled(*args), repeats)
    return _row(batch, partitions, flops, nbytes, compiled, sec, xla_flops), compile_s


def compile_infer(config, batch: int, mesh=None) -> tuple[dict, float]:
    """Compiles (only) the inference program at `batch` from abstract inputs: (row, compile seconds)."""
    partitions = 1 if mesh is None else mesh.devices.size
    infer = make_infer_fn(config)
    args = _infer_inputs(config, batch, mesh, abstract=True)
    compiled, compile_s, flops = compile_counted(infer, args)
    xla_flops, nbytes = compiled_cost(compiled, partitions)
    return _row(batch, partitions, flops, nbytes, compiled, None, xla_flops), compile_s


# ----------------------------------------------------------------------------- training


def synthetic_train_batch(batch: int, size, channels: int, seed: int = 0, num_classes: int = 0) -> dict:
    """A host batch shaped like the data pipeline's (`size`: int or (H, W), the networks' training input):
    alternating normal / synthetic rows, sparse masks, class ids cycling over `num_classes` (0 for
    one-category models)."""
    rng = np.random.default_rng(seed)
    h, w = size_hw(size)
    image = rng.uniform(-1, 1, (batch, h, w, channels)).astype(np.float32)
    return {
        "image": image,
        "clean": image.copy(),
        "mask": (rng.uniform(size=(batch, h, w, 1)) > 0.9).astype(np.float32),
        "is_synthetic": np.tile([0.0, 1.0], (batch + 1) // 2)[:batch].astype(np.float32),
        "class_id": np.arange(batch, dtype=np.int32) % max(1, num_classes),
    }


def _train_setup(config, batch: int):
    devices = jax.devices()
    used = devices if batch % len(devices) == 0 else devices[:1]
    mesh = parallel.make_mesh(used)
    config = config.copy_and_resolve_references()
    config.train.batch_size = batch
    return config, mesh, len(used)


def bench_train(config, batch: int, repeats: int) -> tuple[dict, float]:
    """The full train step at global `batch` (over every device when it divides, else one) and its compile s."""
    config, mesh, n_used = _train_setup(config, batch)
    step = make_train_step(config, mesh)
    state, init_s = blocked_seconds(lambda: create_train_state(config, jax.random.key(0)))  # compile + run
    state = parallel.replicate(state, mesh)
    h, w, c = network_image_shape(config)  # a patch-trained model trains on P x P crops
    host = synthetic_train_batch(batch, (h, w), c, num_classes=len(class_names(config)))
    data = parallel.shard_batch(host, mesh)
    key = jax.random.key(3)
    compiled, compile_s, flops = compile_counted(step, (state, data, key))
    xla_flops, nbytes = _train_cost(compiled, config, batch, n_used)
    holder = {"state": state}

    def one():
        holder["state"], metrics = compiled(holder["state"], data, key)  # old state is donated
        return holder["state"], metrics

    sec = median_seconds(one, repeats)
    row = _row(batch, n_used, flops, nbytes, compiled, sec, xla_flops)
    row["init_s"] = init_s
    return row, compile_s


def _train_cost(compiled, config, batch: int, n_used: int) -> tuple[float, float]:
    """XLA's (FLOPs, bytes) of one train step. XLA's cost analysis counts a loop body once, so with
    `train.microbatch` the microbatch loop's cost is scaled by its trip count (the Adam update outside
    the loop, under 0.1% of the step, gets scaled too). The jaxpr count needs no such scaling."""
    flops, nbytes = compiled_cost(compiled, n_used)
    micro = int(config.train.get("microbatch", 0))
    per_device = batch // n_used
    trips = per_device // micro if micro and micro < per_device else 1
    return flops * trips, nbytes * trips


def _abstract_train_program(config, batch: int):
    """(jitted train step, its abstract (state, batch, key) arguments, devices used, resolved config)."""
    config, mesh, n_used = _train_setup(config, batch)
    step = make_train_step(config, mesh)
    state = _abstract(
        jax.eval_shape(lambda k: create_train_state(config, k), jax.random.key(0)), parallel.replicated(mesh)
    )
    h, w, c = network_image_shape(config)  # a patch-trained model trains on P x P crops
    data = _abstract(
        jax.eval_shape(lambda: synthetic_train_batch(batch, (h, w), c, num_classes=len(class_names(config)))),
        parallel.data_sharding(mesh),
    )
    key = jax.eval_shape(lambda: jax.random.key(3))
    return step, (state, data, key), n_used, config


def compile_train(config, batch: int) -> tuple[dict, float]:
    """Compiles (only) the train step at global `batch` from abstract inputs: (row, compile seconds)."""
    step, args, n_used, config = _abstract_train_program(config, batch)
    compiled, compile_s, flops = compile_counted(step, args)
    xla_flops, nbytes = _train_cost(compiled, config, batch, n_used)
    return _row(batch, n_used, flops, nbytes, compiled, None, xla_flops), compile_s


def train_gflops_per_image(config, batch: int) -> float:
    """Matrix-unit GFLOP per image of the train step at global `batch`, counted from its jaxpr: traced
    only, nothing compiled (seconds where a compile takes tens)."""
    step, args, _, _ = _abstract_train_program(config, batch)
    return jaxpr_flops(step.trace(*args).jaxpr) / batch / 1e9
