"""One config module: loading (config files, a run's config.json), dotted overrides, validation.

The schema itself (every key and its default) is `config_schema.base_config()`. This module holds:

  * the allowed values of the enumerated keys as constants (`INFER_METHODS`, `ANOMALY_MAPS`, ...)
    that the code using those keys imports, so a new value is added in one place;
  * `flatten` (the one nested -> dotted flattening) and `check_keys` (the one unknown-key check, with
    a "did you mean ...?" hint);
  * `load_config` (a `configs/x.py[:preset]` file outside absl), `config_from_json` (a run's saved
    config), `apply_overrides` (typed dotted overrides);
  * `validate_config`: every value check that must pass before anything compiles or is written.

Every mistake raises `ConfigError` (a `UserError`): one message naming the key, plus a hint.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os
import sys

import ml_collections

from diff_fastener_jax.config_schema import DATA_PRESETS, base_config
from diff_fastener_jax.errors import UserError

# Allowed values of the enumerated keys (the first entry of each is the paper's choice where it has one).
DATA_FORMATS = ("mvtec", "visa", "folder", "demo")
FOREGROUNDS = ("otsu", "full")
DEMO_FRAMINGS = ("fastener", "track")  # data/demo.py FRAMINGS
ACTIVATIONS = ("gelu", "silu", "relu")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # 'auto': bfloat16 on GPUs/TPUs, float32 on CPUs
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
REMAT_MODES = ("none", "blocks")
SCHEDULES = ("linear", "cosine")
LR_SCHEDULES = ("constant", "warmup_cosine")
INFER_METHODS = ("norm_guided", "one_step", "ddim", "ddpm", "adaptive")
SEG_CLASS_CONDITIONINGS = ("channels", "film")
ANOMALY_MAPS = ("segmentation", "recon_error")
# train.select_on: validation metric -> 'min' (lower is better) or 'max'; 'last' keeps the final step
SELECT_METRICS = {"val_recon_error": "min", "val_image_auroc": "max", "val_pixel_auroc": "max",
                  "val_pixel_aupro": "max"}
SELECT_ON = ("last", *SELECT_METRICS)

__all__ = [
    "ACTIVATIONS", "ANOMALY_MAPS", "ATTENTION_IMPLS", "DATA_FORMATS", "DATA_PRESETS", "DEMO_FRAMINGS", "DTYPES",
    "FOREGROUNDS",
    "INFER_METHODS", "LR_SCHEDULES", "REMAT_MODES", "SCHEDULES", "SEG_CLASS_CONDITIONINGS",
    "category_names", "class_names", "ConfigError", "apply_overrides", "base_config", "check_keys", "config_from_json", "flatten",
    "known_keys", "load_config", "suggest_key", "unknown_keys", "validate_config",
]


class ConfigError(UserError, ValueError):
    """An invalid or unknown config value."""


def category_names(category) -> list[str]:
    """data.category as names: 'bottle' -> ['bottle'], 'a, b' -> ['a', 'b'], 'all' -> ['all'] (the data
    layer expands it), '' -> []."""
    return [c.strip() for c in str(category or "").split(",") if c.strip()]


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    """The categories a unified model is conditioned on, in class-id order; [] for a one-category
    model (no class embedding). 'all' must have been resolved (training saves the resolved list)."""
    names = category_names(config.data.get("category", ""))
    if "all" in names:
        raise ConfigError("data.category='all' is resolved only when a run starts (training writes the list "
                          "into config.json)", hint="name the categories: --config.data.category=a,b")
    return names if len(names) > 1 else []


def flatten(cfg, prefix: str = "") -> dict[str, object]:
    """{'data.root': ..., 'model.base_channels': ...} for a (nested) ConfigDict or dict."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, (dict, ml_collections.ConfigDict)):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def known_keys() -> dict[str, object]:
    """Every dotted key of the schema with its default value."""
    return flatten(base_config())


def suggest_key(key: str) -> str | None:
    """'did you mean data.root?' for a mistyped dotted key, or None when nothing is close."""
    known = list(known_keys())
    close = difflib.get_close_matches(key, known, n=2, cutoff=0.6)
    if not close:  # a right leaf under a wrong section ('train.top_k' -> 'infer.top_k')
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:2]
    return f"did you mean {' or '.join(close)}?" if close else None


def check_keys(keys, where: str = "") -> None:
    """Raises ConfigError naming the first of `keys` (dotted) that the schema does not know."""
    known = known_keys()
    bad = [k for k in keys if k not in known]
    if bad:
        at = f" ({where})" if where else ""
        more = f" and {len(bad) - 1} more: {', '.join(bad[1:])}" if len(bad) > 1 else ""
        raise ConfigError(f"unknown config key {bad[0]}{at}{more}",
                          hint=suggest_key(bad[0]) or "see diff_fastener_jax/config_schema.py for every key")


def unknown_keys(config) -> list[str]:
    """Keys of `config` that the schema does not know (typos in config files)."""
    known = known_keys()
    return sorted(k for k in flatten(config) if k not in known)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:preset]` and returns `get_config(preset)` (outside absl: tests, notebooks)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist", hint=_config_files_hint(path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    name = "_dfj_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _config_files_hint(path: str) -> str | None:
    folder = os.path.dirname(path) or "."
    if os.path.isdir(folder):
        files = sorted(f for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))
        if files:
            return f"config files in {folder}/: {', '.join(files)}"
    return "pass a Python config file, e.g. --config configs/demo.py"


def _coerce(key: str, old, value):
    """`value` (CLI text or a Python value) converted to the type of the current value `old`."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and not isinstance(old, str):
        text = value.strip()
        if isinstance(old, bool) and text.lower() in ("true", "false", "1", "0", "yes", "no"):
            return text.lower() in ("true", "1", "yes")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    if isinstance(old, bool):
        ok = isinstance(value, bool)
    elif isinstance(old, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(old, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(old, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    elif isinstance(old, str):
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        raise ConfigError(f"{key}: expected {type(old).__name__} like {old!r}, got {value!r}",
                          hint=f"e.g. --config.{key}={old!r}" if not isinstance(old, str) else None)
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, object]) -> ml_collections.ConfigDict:
    """Sets dotted keys (`{'model.base_channels': 32}`) in place and returns `config`.

    Values may be Python values or CLI text ('(1, 2)', 'true', '3e-4'); each is converted to the key's
    current type. Unknown keys and ill-typed values raise ConfigError with a hint.
    """
    check_keys(list(overrides), where="override")
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:  # a schema key the loaded config lacks
            raise ConfigError(f"config has no key {dotted}", hint="is the config file built on base_config()?")
        with node.ignore_type():
            node[leaf] = _coerce(dotted, node[leaf], value)
    return config


def config_from_json(path: str) -> ml_collections.ConfigDict:
    """Reads a run's saved config.json back into the schema (lists become tuples where the schema has tuples)."""
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        hint = ("the folder does not exist" if not os.path.isdir(folder)
                else "pass the --workdir of a training run (it holds config.json and checkpoints/)")
        raise ConfigError(f"{folder} is not a training run: {os.path.basename(path)} is missing", hint=hint)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the run config {path}: {e}") from e
    values = flatten(saved)
    check_keys(list(values), where=path)
    return apply_overrides(base_config(), values)


def validate_config(config: ml_collections.ConfigDict, num_devices: int = 1, *, check_data: bool = True) -> None:
    """Raises ConfigError for unknown keys or invalid values; returns None when the config is usable.
    `check_data=False` leaves out the data location (data.root, data.category, data.texture_dir), for
    programs that read no dataset (the benchmark feeds synthetic arrays)."""
    check_keys(list(flatten(config)), where="config")
    missing = sorted(set(known_keys()) - set(flatten(config)))
    if missing:
        raise ConfigError(f"config is missing key(s): {', '.join(missing)}",
                          hint="build config files on config_schema.base_config()")

    def need(cond: bool, key: str, msg: str, hint: str | None = None) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}", hint=hint)

    def one_of(key: str, value, allowed) -> None:
        need(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}",
             hint=f"e.g. --config.{key}={allowed[0]}")

    d, m, diff, t = config.data, config.model, config.diffusion, config.train
    one_of("data.format", d.format, DATA_FORMATS)
    if check_data:
        need(d.format == "demo" or bool(d.root), "data.root", f"is required for data.format={d.format!r}",
             hint="e.g. --config.data.root=/data/mvtec")
        need(d.format == "demo" or os.path.isdir(d.root), "data.root", f"folder {d.root!r} does not exist")
        need(d.format not in ("mvtec", "folder") or bool(d.category), "data.category",
             f"is required for data.format={d.format!r}", hint="e.g. --config.data.category=bottle")
    need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    need(not check_data or not d.texture_dir or os.path.isdir(d.texture_dir), "data.texture_dir",
         f"folder {d.texture_dir!r} does not exist")
    one_of("data.foreground", d.foreground, FOREGROUNDS)
    one_of("data.demo_framing", d.demo_framing, DEMO_FRAMINGS)
    need(0.0 <= d.cutpaste_prob <= 1.0, "data.cutpaste_prob", f"must be in [0, 1], got {d.cutpaste_prob}")
    need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    down = 2 ** (len(m.channel_mults) - 1)
    seg_down = 2 ** (len(m.seg_channels) - 1)
    need(d.image_size > 0 and d.image_size % max(down, seg_down) == 0, "data.image_size",
         f"{d.image_size} must be divisible by {max(down, seg_down)} (the U-Nets' total downsampling)")
    one_of("model.activation", m.activation, ACTIVATIONS)
    one_of("model.dtype", m.dtype, DTYPES)
    one_of("model.attention", m.attention, ATTENTION_IMPLS)
    one_of("model.remat", m.remat, REMAT_MODES)
    need(m.skip_every >= 1, "model.skip_every", f"must be >= 1, got {m.skip_every}")
    need(0.0 < m.seg_head_prior < 1.0, "model.seg_head_prior", f"must be in (0, 1), got {m.seg_head_prior}")
    need(m.base_channels % m.num_heads == 0, "model.num_heads",
         f"{m.num_heads} heads must divide model.base_channels={m.base_channels}")
    for r in m.attention_resolutions:
        need(r > 0 and d.image_size % r == 0, "model.attention_resolutions",
             f"{r} does not divide data.image_size={d.image_size}")
    one_of("diffusion.schedule", diff.schedule, SCHEDULES)
    need(0 < diff.tau < diff.T, "diffusion.tau", f"must be in (0, T={diff.T}), got {diff.tau}")
    need(0 <= diff.eval_t_small < diff.eval_t_big < diff.T, "diffusion.eval_t_small/eval_t_big",
         f"need 0 <= t_s < t_b < T, got t_s={diff.eval_t_small}, t_b={diff.eval_t_big}, T={diff.T}")
    window = diff.get("train_t_window", 0)
    need(isinstance(window, int) and window >= 0, "diffusion.train_t_window",
         f"must be an integer >= 0 (0 = the paper's ranges), got {window!r}")
    if window:
        need(diff.eval_t_small < diff.tau <= diff.eval_t_big, "diffusion.train_t_window",
             f"a window around the inference steps needs eval_t_small < tau <= eval_t_big, got "
             f"{diff.eval_t_small}, {diff.tau}, {diff.eval_t_big}")
        need(config.infer.method in ("norm_guided", "one_step"), "diffusion.train_t_window",
             f"trains only the steps that norm_guided / one_step inference use; infer.method="
             f"{config.infer.method!r} denoises through steps it never trains (set the window to 0)")
    one_of("infer.map", config.infer.map, ANOMALY_MAPS)
    one_of("infer.method", config.infer.method, INFER_METHODS)
    one_of("model.seg_class_conditioning", config.model.seg_class_conditioning, SEG_CLASS_CONDITIONINGS)
    names = category_names(d.category)
    need(len(set(names)) == len(names), "data.category", f"names a category twice: {d.category!r}")
    need("all" not in names or names == ["all"], "data.category", f"'all' cannot be combined with names: {d.category!r}")
    need(config.infer.ddim_steps >= 1, "infer.ddim_steps", f"must be >= 1, got {config.infer.ddim_steps}")
    need(0 < config.infer.adaptive_t_max < config.diffusion.T, "infer.adaptive_t_max",
         f"must be in (0, diffusion.T={config.diffusion.T}), got {config.infer.adaptive_t_max}")
    need(config.infer.adaptive_margin >= 0, "infer.adaptive_margin",
         f"must be >= 0 grid steps, got {config.infer.adaptive_margin}")
    need(config.infer.adaptive_delta >= 0, "infer.adaptive_delta", f"must be >= 0, got {config.infer.adaptive_delta}")
    need(config.infer.top_k >= 1, "infer.top_k", f"must be >= 1, got {config.infer.top_k}")
    need(config.infer.map_sigma >= 0, "infer.map_sigma", f"must be >= 0 (pixels at 256²), got {config.infer.map_sigma}")
    need(config.infer.batch_size >= 1, "infer.batch_size", f"must be >= 1, got {config.infer.batch_size}")
    need(config.optim.lr_recon > 0 and config.optim.lr_seg > 0, "optim.lr_recon/lr_seg", "must be > 0")
    one_of("optim.schedule", config.optim.schedule, LR_SCHEDULES)
    need(config.optim.schedule != "warmup_cosine" or t.num_steps > 0, "optim.schedule",
         "'warmup_cosine' needs train.num_steps > 0 (the decay horizon)", hint="e.g. --config.train.num_steps=600")
    need(config.optim.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {config.optim.warmup_steps}")
    need(0.0 <= config.optim.final_lr_fraction <= 1.0, "optim.final_lr_fraction",
         f"must be in [0, 1], got {config.optim.final_lr_fraction}")
    need(0.0 <= config.optim.ema_decay < 1.0, "optim.ema_decay", f"must be in [0, 1), got {config.optim.ema_decay}")
    b = t.batch_size
    need(b > 0 and b % 2 == 0, "train.batch_size", f"{b} must be even (half normal, half synthetic)")
    need(b % (2 * num_devices) == 0, "train.batch_size",
         f"{b} is not divisible by 2 x {num_devices} devices: each device needs an even, equal share",
         hint=f"e.g. --config.train.batch_size={2 * num_devices * max(1, b // (2 * num_devices))}")
    per_device = b // num_devices if b % num_devices == 0 else 0
    need(t.microbatch == 0 or (t.microbatch > 0 and t.microbatch % 2 == 0 and per_device % t.microbatch == 0),
         "train.microbatch", f"{t.microbatch} must be 0 or an even divisor of the {per_device} rows per device "
         f"(train.batch_size {b} over {num_devices} device(s))", hint="e.g. --config.train.microbatch=2")
    need(t.num_steps > 0 or t.num_epochs > 0, "train.num_steps/num_epochs", "one of them must be > 0")
    for key in ("checkpoint_every", "log_every", "keep_checkpoints"):
        need(t[key] >= 1, f"train.{key}", f"must be >= 1, got {t[key]}")
    one_of("train.select_on", t.select_on, SELECT_ON)
    need(t.select_on == "last" or (t.eval_every >= 1 and t.val_batches >= 1 and d.val_fraction > 0),
         "train.select_on", f"{t.select_on!r} selects on validation, which this run does not run",
         hint="needs train.eval_every >= 1, train.val_batches >= 1 and data.val_fraction > 0; or use 'last'")
    need(-1 <= d.fold < d.num_folds, "data.fold", f"must be -1 (off) or in [0, {d.num_folds}), got {d.fold}")
    need(0.0 < config.eval.fpr_target < 1.0, "eval.fpr_target", f"must be in (0, 1), got {config.eval.fpr_target}")
