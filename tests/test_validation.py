"""Validation during training scores the EMA params through evaluate's inference call and metrics."""

import json
import os

import numpy as np
import pytest
from helpers import tiny_config
from sklearn.metrics import roc_auc_score

from diff_fastener_jax.data import pipeline
from diff_fastener_jax.inference import prepare_inference, run_infer
from diff_fastener_jax.training import loop
from diff_fastener_jax.training.run_loading import load_run_config, load_run_params


def test_validation_logs_ema_scores_equal_to_a_direct_computation(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(
        **{"train.num_steps": 3, "train.eval_every": 3, "train.checkpoint_every": 3, "optim.ema_decay": 0.5}
    )
    loop.train_and_evaluate(config, workdir, quiet=True)
    logged = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    val = [x for x in logged if x.get("event") == "validation"][-1]
    assert val["step"] == 3 and {"val_recon_error", "val_image_auroc", "val_pixel_auroc", "val_pixel_aupro"} <= set(val)

    # Direct: the checkpoint's EMA params (what evaluate loads), the same val batches, the model's fixed noise.
    run_config = load_run_config(workdir)
    params, _ = load_run_params(workdir, run_config)
    infer, params, mesh = prepare_inference(run_config, params)
    batches = pipeline.make_val_batches(run_config, seed=run_config.seed, num_batches=run_config.train.val_batches)
    scores, labels, maps, masks, errors = [], [], [], [], []
    for b in batches:
        recon, amap, score, _ = run_infer(infer, params, b["image"], mesh)
        normal = b["is_synthetic"] == 0
        errors.append(np.abs(recon[normal].astype(np.float64) - b["image"][normal]).mean(axis=(1, 2, 3)))
        scores.append(score), labels.append(b["is_synthetic"]), maps.append(amap), masks.append(b["mask"][..., 0])
    labels, masks = np.concatenate(labels), np.concatenate(masks)
    assert val["val_recon_error"] == pytest.approx(np.mean(np.concatenate(errors)), rel=1e-5)
    assert val["val_image_auroc"] == pytest.approx(roc_auc_score(labels, np.concatenate(scores)), abs=1e-9)
    assert val["val_pixel_auroc"] == pytest.approx(
        roc_auc_score(masks.ravel() > 0.5, np.concatenate(maps).astype(np.float32).ravel()), abs=1e-9
    )


def test_warmup_cosine_schedule_and_constant_default():
    from diff_fastener_jax.training.train_step import learning_rate_schedule

    config = tiny_config(
        **{
            "optim.schedule": "warmup_cosine",
            "optim.warmup_steps": 4,
            "optim.final_lr_fraction": 0.1,
            "train.num_steps": 20,
        }
    )
    lr = learning_rate_schedule(config, 1e-3)
    assert float(lr(0)) == 0.0 and float(lr(2)) == pytest.approx(5e-4) and float(lr(4)) == pytest.approx(1e-3)
    # Cosine from step 4 to 20: half-way (step 12) is the mean of peak and end.
    assert float(lr(12)) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-5)
    assert float(lr(20)) == pytest.approx(1e-4)
    assert learning_rate_schedule(tiny_config(), 3e-4) == 3e-4  # constant: a float, old optimizer state
    with pytest.raises(ValueError, match="optim.schedule"):
        learning_rate_schedule(tiny_config(**{"optim.schedule": "linear"}), 1e-3)
