r"""Training entry point.

  python -m diff_fastener_jax.train --config configs/demo.py --workdir runs/demo
  python -m diff_fastener_jax.train --config configs/default.py:mvtec --workdir runs/bottle \
      --config.data.root=/data/mvtec --config.data.category=bottle

Re-running the same command resumes from the latest checkpoint in `<workdir>/checkpoints`.
Multi-host: launched by SLURM (`launch/slurm.sbatch`) the processes find each other from the SLURM
environment; or pass --coordinator_address/--num_processes/--process_id explicitly.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from diff_fastener_jax import metrics as M
from diff_fastener_jax import parallel
from diff_fastener_jax.checkpoint import Checkpointer, param_shapes
from diff_fastener_jax.config_validation import resolve_data_root, validate_config
from diff_fastener_jax.data import datasets, pipeline
from diff_fastener_jax.inference import run_infer
from diff_fastener_jax.logging_utils import MetricsWriter, format_seconds
from diff_fastener_jax.train_step import (
    create_train_state,
    make_infer_fn,
    make_train_step,
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<x>.py[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder (checkpoints, metrics.jsonl, config.json)")
_COORD = flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
_NPROC = flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
_PID = flags.DEFINE_integer("process_id", None, "multi-host: this process's index")


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss."""


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
    """Joins a multi-process run if one is described (flags, or SLURM with more than one task)."""
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if coordinator_address is None and slurm_tasks <= 1:
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # CPU collectives across processes (tests, CPU clusters) need gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator_address is not None:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    else:
        jax.distributed.initialize()  # cluster auto-detection (SLURM)


def _validation_scores(infer, params, val_batches, key, mesh=None) -> dict:
    """Validation on held-out normals + synthetic anomalies, scored like `evaluate` (same inference
    call, same metrics): image AUROC, exact pixel AUROC and AUPRO, and the mean absolute
    reconstruction error on the held-out NORMAL images, which keeps falling while the reconstruction
    improves after the synthetic anomalies have become easy (AUROC 1.0)."""
    evaluation = M.StreamingEvaluation(with_pixels=True)
    recon_errors = []
    offset = 0
    for batch in val_batches:
        images = np.asarray(batch["image"])  # (B, H, W, 3)
        n = images.shape[0]
        recon, amap, score = run_infer(infer, params, images, np.arange(offset, offset + n), key, mesh)
        offset += n
        labels = np.asarray(batch["is_synthetic"]).astype(np.int64)
        evaluation.update(score, labels, ["synthetic" if y else "good" for y in labels], amap,
                          np.asarray(batch["mask"])[..., 0] > 0.5)
        normal = labels == 0
        recon_errors.append(np.abs(recon[normal] - images[normal]).mean(axis=(1, 2, 3)))
    result = evaluation.compute()
    out = {"val_recon_error": float(np.mean(np.concatenate(recon_errors)))}
    for key_in, key_out in (("image_auroc", "val_image_auroc"), ("pixel_auroc", "val_pixel_auroc"),
                            ("pixel_aupro", "val_pixel_aupro")):
        if not math.isnan(result[key_in]):
            out[key_out] = float(result[key_in])
    return out


def num_train_steps(config: ml_collections.ConfigDict, num_train_images: int) -> int:
    """train.num_steps, or num_epochs passes over the normal training images."""
    if config.train.num_steps and config.train.num_steps > 0:
        return int(config.train.num_steps)
    steps_per_epoch = max(1, math.ceil(num_train_images / config.train.batch_size))
    return int(config.train.num_epochs * steps_per_epoch)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False) -> dict:
    """Trains (or resumes) a run in `workdir`; returns the last logged metrics."""
    mesh = parallel.make_mesh()
    validate_config(config, num_devices=mesh.devices.size)  # before anything compiles
    os.makedirs(workdir, exist_ok=True)
    config = resolve_data_root(config, workdir)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    train_samples = datasets.list_samples(config.data, "train", seed=config.seed)
    total_steps = num_train_steps(config, len(train_samples))
    writer = MetricsWriter(workdir, quiet=quiet)
    if config.train.tensorboard:
        writer.enable_tensorboard(os.path.join(workdir, "tensorboard"))

    base_key = jax.random.key(config.seed)
    init_key, train_key, val_key = (jax.random.fold_in(base_key, i) for i in range(3))
    rep = parallel.replicated(mesh)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                                      jax.eval_shape(lambda: create_train_state(config, init_key)))
    shapes = param_shapes(abstract.params)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
    data_state = None
    start = ckpt.latest_step()
    if start is not None:
        state, data_state = ckpt.restore(start, abstract, expected_shapes=shapes)
        writer.write({"event": "resume", "step": start}, f"resumed from step {start}")
    else:
        state = parallel.replicate(create_train_state(config, init_key), mesh)
    start = start or 0

    train_iter = pipeline.make_train_iterator(
        config, seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count())
    if data_state is not None:
        train_iter.set_state(data_state)
    val_batches = pipeline.make_val_batches(config, seed=config.seed, num_batches=config.train.val_batches)

    train_step = make_train_step(config, mesh)
    infer = make_infer_fn(config)
    meta = {"param_shapes": shapes, "config": json.loads(config.to_json_best_effort())}
    writer.write({"event": "start", "step": start, "num_steps": total_steps, "num_devices": mesh.devices.size,
                  "num_processes": jax.process_count(), "num_train_images": len(train_samples)},
                 f"training steps {start}..{total_steps} on {mesh.devices.size} device(s), "
                 f"{len(train_samples)} normal training images, global batch {config.train.batch_size}")

    last: dict = {}
    pending = None  # (step, metrics) of the previous step, checked while the next one runs
    t_log, step_log = time.time(), start
    t_start = time.time()
    for step in range(start, total_steps):
        batch = parallel.shard_batch(next(train_iter), mesh)
        state, metrics = train_step(state, batch, train_key)
        if pending is not None:
            _check_finite(*pending)
        pending = (step + 1, metrics)
        done = step + 1
        if done % config.train.log_every == 0 or done == total_steps:
            _check_finite(*pending)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            now = time.time()
            steps_per_s = (done - step_log) / max(now - t_log, 1e-9)
            t_log, step_log = now, done
            eta = (total_steps - done) / max(steps_per_s, 1e-9)
            last = {"step": done, **m, "steps_per_s": steps_per_s,
                    "images_per_s": steps_per_s * config.train.batch_size, "eta_s": eta}
            writer.write(last, f"step {done}/{total_steps} | {last['images_per_s']:.1f} img/s | "
                               f"loss {m['total']:.4f} (noise {m['noise']:.4f} focal {m['focal']:.4f} "
                               f"smoothl1 {m['smoothl1']:.4f}) | ETA {format_seconds(eta)}")
        if val_batches and config.train.eval_every > 0 and (done % config.train.eval_every == 0 or done == total_steps):
            # Evaluate scores the EMA params when EMA is on: validate what will be evaluated.
            val_params = state.ema_params if config.optim.ema_decay > 0 else state.params
            val = _validation_scores(infer, val_params, val_batches, val_key, mesh)
            writer.write({"step": done, "event": "validation", **val},
                         "validation " + " ".join(f"{k} {v:.4f}" for k, v in val.items()))
            last.update(val)
        if done % config.train.checkpoint_every == 0 or done == total_steps:
            ckpt.save(done, state, train_iter.get_state(), meta)
    if pending is not None:
        _check_finite(*pending)
    train_iter.close()
    ckpt.close()
    wall = time.time() - t_start
    done_record = {"event": "done", "step": total_steps, "wall_s": wall}
    if not quiet:
        # Hosts differ (and shared ones vary by the minute): report the time next to this host's
        # measured float32 matmul peak so a reader can scale it.
        from diff_fastener_jax.benchmark import measured_matmul_tflops

        done_record["matmul_peak_tflops"] = measured_matmul_tflops()
    writer.write(done_record, f"done: {total_steps} steps in {format_seconds(wall)}" + (
        f" (this host's float32 matmul peak now: {done_record['matmul_peak_tflops']:.2f} TFLOP/s)"
        if "matmul_peak_tflops" in done_record else ""))
    return last


def _check_finite(step: int, metrics: dict) -> None:
    if float(metrics["finite"]) < 1.0:
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (total={float(metrics['total'])}, noise={float(metrics['noise'])}, "
            f"focal={float(metrics['focal'])}); the update was skipped and training stopped. Lower the "
            f"learning rate (optim.lr_recon / optim.lr_seg) or enable optim.clip.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; our progress goes to stdout
    initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
