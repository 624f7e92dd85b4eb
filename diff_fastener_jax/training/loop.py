"""The training loop: train_and_evaluate(config, workdir) and what it needs (run preparation, resume checks, validation)."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from diff_fastener_jax import parallel
from diff_fastener_jax.config import (
    ConfigError,
    category_names,
    class_names,
    resume_changes,
    validate_config,
)
from diff_fastener_jax.data import datasets, foreground_kind, pipeline
from diff_fastener_jax.data.demo import resolve_data_root
from diff_fastener_jax.data.sizing import resize_of
from diff_fastener_jax.deploy import normal_map, threshold
from diff_fastener_jax.evaluation import metrics as M
from diff_fastener_jax.inference import make_infer_fn, run_infer
from diff_fastener_jax.logging_utils import MetricsWriter, format_seconds
from diff_fastener_jax.training.checkpoint import Checkpointer, param_shapes
from diff_fastener_jax.training.selection import Selection
from diff_fastener_jax.training.train_step import create_train_state, make_train_step


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
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    else:
        jax.distributed.initialize()  # cluster auto-detection (SLURM)


def _validation_scores(infer, params, val_batches, mesh=None, unified: bool = False) -> dict:
    """Validation on held-out normals + synthetic anomalies, scored like `evaluate` (same inference
    call, same metrics): image AUROC, exact pixel AUROC and AUPRO, and the mean absolute
    reconstruction error on the held-out NORMAL images, which keeps falling while the reconstruction
    improves after the synthetic anomalies have become easy (AUROC 1.0)."""
    evaluation = M.StreamingEvaluation(with_pixels=True)
    recon_errors = []
    for batch in val_batches:
        images = np.asarray(batch["image"])  # (B, H, W, 3)
        recon, amap, score, _ = run_infer(infer, params, images, mesh, class_ids=batch["class_id"] if unified else None)
        labels = np.asarray(batch["is_synthetic"]).astype(np.int64)
        evaluation.update(
            score, labels, ["synthetic" if y else "good" for y in labels], amap, np.asarray(batch["mask"])[..., 0] > 0.5
        )
        normal = labels == 0
        recon_errors.append(np.abs(recon[normal] - images[normal]).mean(axis=(1, 2, 3)))
    result = evaluation.compute()
    out = {"val_recon_error": float(np.mean(np.concatenate(recon_errors)))}
    for key_in, key_out in (
        ("image_auroc", "val_image_auroc"),
        ("pixel_auroc", "val_pixel_auroc"),
        ("pixel_aupro", "val_pixel_aupro"),
    ):
        if not math.isnan(result[key_in]):
            out[key_out] = float(result[key_in])
    return out


def real_validation_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config whose inference program scores validation images during training: `config` with
    infer.normal_map 'off', since the normal map is fitted after training, on the kept checkpoint."""
    if not normal_map.fitted(config):
        return config
    out = ml_collections.ConfigDict(config.to_dict())
    out.infer.normal_map = "off"
    return out


def validation_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config whose inference program scores the synthetic validation batches: with patch training
    (data.patch_size P) those are P x P crops, scored as P x P images; else `real_validation_config`."""
    config = real_validation_config(config)
    patch = int(config.data.get("patch_size", 0))
    if not patch:
        return config
    out = ml_collections.ConfigDict(config.to_dict())
    with out.data.ignore_type():
        out.data.image_size, out.data.resize = patch, "square"
    return out


def load_real_validation(config: ml_collections.ConfigDict, samples: dict) -> dict | None:
    """The real-anomaly validation set, decoded once: the held-out normals ('val') and the
    data.val_anomalies images at the evaluation resolution (`datasets.load_arrays`), with
    'has_pixel_labels'; None without data.val_anomalies or held-out normals."""
    anomalies, normals = samples.get("val_anomalies", []), [s for s in samples["val"] if s.label == 0]
    if not anomalies or not normals:
        return None
    arrays = datasets.load_arrays(normals + anomalies, resize_of(config))
    arrays["class_id"] = datasets.class_id_array(config, normals + anomalies)
    arrays["has_pixel_labels"] = datasets.has_pixel_labels(anomalies)
    return arrays


def _real_validation_scores(infer, params, real: dict, batch_size: int, mesh=None) -> dict:
    """Image AUROC (and pixel AUROC when every real anomaly has a mask) of held-out normals vs the
    data.val_anomalies images, scored by the evaluation's inference program."""
    evaluation = M.StreamingEvaluation(with_pixels=real["has_pixel_labels"])
    for i0 in range(0, real["image"].shape[0], batch_size):
        rows = slice(i0, i0 + batch_size)
        cls = None if real["class_id"] is None else real["class_id"][rows]
        out = run_infer(infer, params, real["image"][rows], mesh, pad_to=batch_size, class_ids=cls)
        pixels = real["has_pixel_labels"]
        evaluation.update(
            out.score,
            real["label"][rows],
            real["defect"][rows],
            out.anomaly_map if pixels else None,
            real["mask"][rows, ..., 0] > 0.5 if pixels else None,
        )
    result = evaluation.compute()
    out = {}
    for key_in, key_out in (("image_auroc", "val_real_image_auroc"), ("pixel_auroc", "val_real_pixel_auroc")):
        value = result.get(key_in)
        if value is not None and not math.isnan(value):  # None: no pixel labels
            out[key_out] = float(value)
    return out


def num_train_steps(config: ml_collections.ConfigDict, num_train_images: int) -> int:
    """train.num_steps, or num_epochs passes over the normal training images."""
    if config.train.num_steps and config.train.num_steps > 0:
        return int(config.train.num_steps)
    steps_per_epoch = max(1, math.ceil(num_train_images / config.train.batch_size))
    return int(config.train.num_epochs * steps_per_epoch)


def prepare_run(config: ml_collections.ConfigDict, workdir: str, num_devices: int):
    """Every check a run needs before anything is compiled or written to `workdir`.

    Validates the config, lists the split's samples ONCE, decodes every listed image and mask, and
    refuses an existing checkpoint written with other model shapes. Returns (config with the demo data
    root resolved, {'train': [...], 'val': [...], 'test': [...], 'val_anomalies': [...]}; the last is
    data.val_anomalies, for validation only). Raises a UserError naming the first problem.
    """
    validate_config(config, num_devices=num_devices)
    config = resolve_data_root(config, workdir)
    config = resolve_auto_dtype(config)
    if category_names(config.data.category) == ["all"]:
        # The run's classes are fixed here and saved with its config: a later category folder must not
        # silently change what the model's class ids mean.
        config = ml_collections.ConfigDict(config.to_dict())
        config.data.category = ",".join(datasets.resolve_categories(config.data))
    samples = datasets.list_splits(config.data, seed=config.seed)
    # real defective images for validation only: kept apart from every split (training, calibration, test)
    val_anomalies = datasets.list_val_anomalies(config.data)
    datasets.check_disjoint(val_anomalies, samples)
    datasets.verify_images(samples["train"] + samples["val"] + val_anomalies)
    samples = {**samples, "val_anomalies": val_anomalies}
    check_resume_compatible(config, workdir)
    return config, samples


def _abstract_state(config, key, sharding=None):
    """The train state's shapes/dtypes (no memory), optionally with a sharding on every leaf."""
    shapes = jax.eval_shape(lambda: create_train_state(config, key))
    if sharding is None:
        return shapes
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def resolve_auto_dtype(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with model.dtype='auto' replaced by the dtype it means on this backend (bfloat16 on
    GPUs/TPUs, float32 on CPUs). The run computes in that one dtype and saves it in config.json and
    detector.json, so its calibrated threshold is never applied to scores computed in another dtype."""
    if config.model.dtype != "auto":
        return config
    from diff_fastener_jax.models import resolve_dtype_name

    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = resolve_dtype_name("auto")
    return config


def check_resume_compatible(config, workdir: str) -> None:
    """Raises IncompatibleCheckpointError when `workdir` holds a checkpoint of another model, and
    ConfigError when it holds one trained with settings that `config` changes (`config.resume_changes`:
    the model, diffusion, loss and optimiser settings, the batch, the seed, the step count under a
    step-dependent schedule) unless train.allow_resume_changes; creates nothing.

    Allowed, the restored step goes on under the new settings: a learning-rate schedule is the new
    one, read at the restored step count (a longer warm-up + cosine horizon raises the rate again).
    """
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    if not steps:
        return
    key = jax.random.fold_in(jax.random.key(config.seed), 0)
    expected = param_shapes(_abstract_state(config, key).params)
    ckpt = Checkpointer(directory, read_only=True)
    try:
        for step in reversed(steps):  # the newest checkpoint whose metadata reads back
            try:
                ckpt.read_meta(step)
            except Exception:  # noqa: BLE001 - unreadable: restore_latest warns and falls back later
                continue
            ckpt.check_shapes(step, expected)
            _check_resume_settings(config, ckpt.read_meta(step).get("config"), workdir, step)
            return
    finally:
        ckpt.close()


def _check_resume_settings(config, saved, workdir: str, step: int) -> None:
    """Refuses (ConfigError) to resume checkpoint `step` of `workdir`, trained with the `saved` config,
    under changed settings, unless train.allow_resume_changes; says on stderr what changes when allowed."""
    if not saved:  # a checkpoint without its config: nothing to compare
        return
    changes = resume_changes(saved, config)
    if not changes:
        return
    what = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)
    if not config.train.get("allow_resume_changes", False):
        raise ConfigError(
            f"{workdir} holds a checkpoint at step {step} trained with other settings: {what}",
            hint="resume with the run's settings (its config.json), use a new --workdir, or pass "
            "--config.train.allow_resume_changes=True to go on from that step under the new settings",
        )
    if jax.process_index() == 0:
        print(f"warning: resuming step {step} of {workdir} with changed settings: {what}", file=sys.stderr)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, quiet: bool = False) -> dict:
    """Trains (or resumes) a run in `workdir`; returns the last logged metrics.

    Nothing is written to `workdir` (except generated demo data) until `prepare_run`'s checks pass and
    the 'auto' settings are decided.
    """
    mesh = parallel.make_mesh()
    config, samples = prepare_run(config, workdir, mesh.devices.size)  # before anything compiles
    # data.foreground='auto' becomes 'otsu' or 'full' and infer.normal_map='auto' ONE_POSE_NORMAL_MAP or 'off'
    # here, so config.json, synthesis, calibration and every later scoring of the run use the one choice
    held_out_normals = sum(s.label == 0 for s in samples["val"])
    config, auto_choices = foreground_kind.resolve(config, samples["train"], held_out_normals)
    if normal_map.fitted(config):  # fitted on the held-out normals after the last step
        normal_map.check_count(held_out_normals, config.infer.normal_map)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    train_samples = samples["train"]
    total_steps = num_train_steps(config, len(train_samples))
    writer = MetricsWriter(workdir, quiet=quiet)
    if config.train.tensorboard:
        writer.enable_tensorboard(os.path.join(workdir, "tensorboard"))

    base_key = jax.random.key(config.seed)
    init_key, train_key = (jax.random.fold_in(base_key, i) for i in range(2))
    rep = parallel.replicated(mesh)
    abstract = _abstract_state(config, init_key, rep)
    shapes = param_shapes(abstract.params)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
    start, state, data_state = ckpt.restore_latest(abstract, expected_shapes=shapes)
    writer.resume_at(start or 0)  # lines of steps after the checkpoint are written again: drop them
    if start is not None:
        writer.write({"event": "resume", "step": start}, f"resumed from step {start}")
    else:
        state = parallel.replicate(create_train_state(config, init_key), mesh)
    start = start or 0
    # The checkpoint selected on validation so far (train.select_on); kept from pruning.
    selection = Selection.load(workdir, config.train.select_on, upto=start)
    if selection.best_step is not None:
        ckpt.protect([selection.best_step])

    train_iter = pipeline.make_train_iterator(
        config,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        samples=train_samples,
    )
    if data_state is not None:
        train_iter.set_state(data_state)
    val_batches = pipeline.make_val_batches(
        config, seed=config.seed, num_batches=config.train.val_batches, samples=samples["val"]
    )
    real_val = load_real_validation(config, samples) if val_batches else None

    train_step = make_train_step(config, mesh)
    infer = make_infer_fn(validation_config(config))
    real_infer = make_infer_fn(real_validation_config(config)) if real_val is not None else None
    meta = {"param_shapes": shapes, "config": json.loads(config.to_json_best_effort())}
    writer.write(
        {
            "event": "start",
            "step": start,
            "num_steps": total_steps,
            "num_devices": mesh.devices.size,
            "num_processes": jax.process_count(),
            "num_train_images": len(train_samples),
        },
        f"training steps {start}..{total_steps} on {mesh.devices.size} device(s), "
        f"{len(train_samples)} normal training images, global batch {config.train.batch_size}",
    )

    if auto_choices is not None:
        writer.write({"event": "auto", "step": start, **auto_choices}, foreground_kind.describe(auto_choices))
    writer.start_progress(total_steps, start)
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
            last = {
                "step": done,
                **m,
                "steps_per_s": steps_per_s,
                "images_per_s": steps_per_s * config.train.batch_size,
                "eta_s": eta,
            }
            writer.write(
                last,
                f"step {done}/{total_steps} | {last['images_per_s']:.1f} img/s | "
                f"loss {m['total']:.4f} (noise {m['noise']:.4f} focal {m['focal']:.4f} "
                f"smoothl1 {m['smoothl1']:.4f}) | ETA {format_seconds(eta)}",
            )
        if val_batches and config.train.eval_every > 0 and (done % config.train.eval_every == 0 or done == total_steps):
            # Evaluate scores the EMA params when EMA is on: validate what will be evaluated.
            val_params = state.inference_params
            val = _validation_scores(infer, val_params, val_batches, mesh, unified=bool(class_names(config)))
            if real_val is not None:
                val.update(_real_validation_scores(real_infer, val_params, real_val, config.infer.batch_size, mesh))
            selected = selection.offer(done, val)
            writer.write(
                {"step": done, "event": "validation", **val, **({"selected": True} if selected else {})},
                "validation "
                + " ".join(f"{k} {v:.4f}" for k, v in val.items())
                + (f" (best {selection.metric} so far: selected)" if selected else ""),
            )
            last.update(val)
            if selected:
                ckpt.protect([done])
        else:
            selected = False
        if done % config.train.checkpoint_every == 0 or done == total_steps or selected:
            ckpt.save(done, state, train_iter.get_state(), meta)
            if selection.enabled and jax.process_index() == 0:
                # Written after the save is issued; a crash in between is harmless (see selection.py).
                selection.save(workdir)
    if pending is not None:
        _check_finite(*pending)
    train_iter.close()
    chosen_step = selection.best_step or total_steps
    if chosen_step != total_steps:
        ckpt.wait()
        state, _ = ckpt.restore(chosen_step, _abstract_state(config, init_key, rep), expected_shapes=shapes)
        writer.write(
            {"event": "selected", "step": chosen_step, "select_on": selection.metric, "value": selection.best["value"]},
            f"selected step {chosen_step} ({selection.metric} {selection.best['value']:.4f} on validation)",
        )
    ckpt.close()
    final_params = state.inference_params
    threshold.calibrate_and_save(config, final_params, workdir, chosen_step, selection=selection.record(total_steps))
    wall = time.time() - t_start
    done_record = {"event": "done", "step": total_steps, "wall_s": wall}
    if not quiet:
        # Hosts differ (and shared ones vary by the minute): report the time next to this host's
        # measured float32 matmul peak so a reader can scale it.
        from diff_fastener_jax.perf.hardware import measured_matmul_tflops

        done_record["matmul_peak_tflops"] = measured_matmul_tflops()
    writer.write(
        done_record,
        f"done: {total_steps} steps in {format_seconds(wall)}"
        + (
            f" (this host's float32 matmul peak now: {done_record['matmul_peak_tflops']:.2f} TFLOP/s)"
            if "matmul_peak_tflops" in done_record
            else ""
        ),
    )
    writer.close()
    return last


def _check_finite(step: int, metrics: dict) -> None:
    if float(metrics["finite"]) < 1.0:
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (total={float(metrics['total'])}, noise={float(metrics['noise'])}, "
            f"focal={float(metrics['focal'])}); the update was skipped and training stopped. Lower the "
            f"learning rate (optim.lr_recon / optim.lr_seg) or enable optim.clip."
        )
