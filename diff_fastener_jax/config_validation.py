"""Config checks that run before anything compiles, each failing with one message naming the key."""

from __future__ import annotations

import os

import ml_collections

from diff_fastener_jax.config_schema import base_config
from diff_fastener_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """An invalid or unknown config value."""


def _flatten(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unknown_keys(config: ml_collections.ConfigDict) -> list[str]:
    """Keys of `config` that the schema does not know (typos in config files)."""
    known = _flatten(base_config())
    return sorted(k for k in _flatten(config) if k not in known)


def validate_config(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """Raises ConfigError for unknown keys or invalid values; returns None when the config is usable."""
    bad = unknown_keys(config)
    if bad:
        raise ConfigError(f"unknown config key(s): {', '.join(bad)} (see diff_fastener_jax/config_schema.py)")
    missing = sorted(set(_flatten(base_config())) - set(_flatten(config)))
    if missing:
        raise ConfigError(f"config is missing key(s): {', '.join(missing)}")

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    d, m, diff, t = config.data, config.model, config.diffusion, config.train
    need(d.format in ("mvtec", "visa", "folder", "demo"), "data.format",
         f"{d.format!r} is not one of mvtec, visa, folder, demo")
    need(d.format == "demo" or bool(d.root), "data.root", f"is required for data.format={d.format!r}")
    need(d.format == "demo" or os.path.isdir(d.root), "data.root", f"folder {d.root!r} does not exist")
    need(d.format not in ("mvtec", "folder") or bool(d.category), "data.category",
         f"is required for data.format={d.format!r}")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    need(not d.texture_dir or os.path.isdir(d.texture_dir), "data.texture_dir",
         f"folder {d.texture_dir!r} does not exist")
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    down = 2 ** (len(m.channel_mults) - 1)
    seg_down = 2 ** (len(m.seg_channels) - 1)
    need(d.image_size > 0 and d.image_size % max(down, seg_down) == 0, "data.image_size",
         f"{d.image_size} must be divisible by {max(down, seg_down)} (the U-Nets' total downsampling)")
    need(m.activation in ("gelu", "silu", "relu"), "model.activation", f"unknown activation {m.activation!r}")
    need(m.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype", f"unknown dtype {m.dtype!r}")
    need(m.attention in ("auto", "xla", "cudnn"), "model.attention", f"unknown implementation {m.attention!r}")
    need(m.remat in ("none", "blocks"), "model.remat", f"unknown mode {m.remat!r}")
    need(m.skip_every >= 1, "model.skip_every", f"must be >= 1, got {m.skip_every}")
    need(m.base_channels % m.num_heads == 0, "model.num_heads",
         f"{m.num_heads} heads must divide model.base_channels={m.base_channels}")
    for r in m.attention_resolutions:
        need(r > 0 and d.image_size % r == 0, "model.attention_resolutions",
             f"{r} does not divide data.image_size={d.image_size}")
    need(diff.schedule in ("linear", "cosine"), "diffusion.schedule", f"unknown schedule {diff.schedule!r}")
    need(0 < diff.tau < diff.T, "diffusion.tau", f"must be in (0, T={diff.T}), got {diff.tau}")
    need(0 <= diff.eval_t_small < diff.eval_t_big < diff.T, "diffusion.eval_t_small/eval_t_big",
         f"need 0 <= t_s < t_b < T, got t_s={diff.eval_t_small}, t_b={diff.eval_t_big}, T={diff.T}")
    need(config.infer.map in ("segmentation", "recon_error"), "infer.map", f"unknown map {config.infer.map!r}")
    need(config.infer.method in ("norm_guided", "one_step", "ddim", "ddpm"), "infer.method",
         f"unknown method {config.infer.method!r}")
    need(config.infer.ddim_steps >= 1, "infer.ddim_steps", f"must be >= 1, got {config.infer.ddim_steps}")
    need(config.infer.top_k >= 1, "infer.top_k", f"must be >= 1, got {config.infer.top_k}")
    need(config.optim.lr_recon > 0 and config.optim.lr_seg > 0, "optim.lr_recon/lr_seg", "must be > 0")
    need(0.0 <= config.optim.ema_decay < 1.0, "optim.ema_decay", f"must be in [0, 1), got {config.optim.ema_decay}")
    b = t.batch_size
    need(b > 0 and b % 2 == 0, "train.batch_size", f"{b} must be even (half normal, half synthetic)")
    need(b % (2 * num_devices) == 0, "train.batch_size",
         f"{b} is not divisible by 2 x {num_devices} devices: each device needs an even, equal share")
    need(t.num_steps > 0 or t.num_epochs > 0, "train.num_steps/num_epochs", "one of them must be > 0")
    for key in ("checkpoint_every", "log_every", "keep_checkpoints"):
        need(t[key] >= 1, f"train.{key}", f"must be >= 1, got {t[key]}")
    need(-1 <= d.fold < d.num_folds, "data.fold", f"must be -1 (off) or in [0, {d.num_folds}), got {d.fold}")


def resolve_data_root(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """For data.format='demo': default the root to <workdir>/demo_data and generate the data there."""
    if config.data.format != "demo":
        return config
    from diff_fastener_jax.data.datasets import ensure_demo_data

    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    config.data.root = ensure_demo_data(config.data, os.path.join(workdir, "demo_data"))
    return config
