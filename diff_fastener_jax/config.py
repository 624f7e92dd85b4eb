"""One config module: loading (config files, a run's config.json), dotted overrides, validation.

The schema itself (every key and its default) is `config_schema.base_config()`. This module holds:

  * the allowed values of the enumerated keys (`INFER_METHODS`, `ANOMALY_MAPS`, ...), re-exported from
    `config_schema`, where each is defined once beside its key's default;
  * `flatten` (the one nested -> dotted flattening) and `check_keys` (the one unknown-key check, with
    a "did you mean ...?" hint);
  * `load_config` (a `configs/x.py[:preset]` file outside absl), `config_from_json` (a run's saved
    config, through `migrate_saved`), `apply_overrides` (typed dotted overrides);
  * `validate_config`: every value check that must pass before anything compiles or is written, one
    function per schema section (`validate_data`, `validate_model`, ...).

Every mistake raises `ConfigError` (a `UserError`): one message naming the key, plus a hint.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import os

import ml_collections

# The allowed values live beside their defaults in config_schema; re-exported here for callers of config.
from diff_fastener_jax.config_schema import (
    ACTIVATIONS,
    ANOMALY_MAPS,
    ATTENTION_IMPLS,
    AUTO,
    CALIBRATE_THRESHOLD,
    DATA_FORMATS,
    DATA_PRESETS,
    DECIDED_AT_TRAINING,
    DEMO_FRAMINGS,
    DROPPED_KEYS,
    DTYPES,
    FITTED_NORMAL_MAPS,
    FOREGROUNDS,
    HINT_EXAMPLES,
    INFER_METHODS,
    INT_OR_PAIR_KEYS,
    LR_SCHEDULES,
    NO_FOLD,
    NORMAL_MAPS,
    NUM_STEPS_FROM_EPOCHS,
    PATCH_OFF,
    REAL_VAL_METRICS,
    REFERENCE_DETECTORS,
    REGIONS,
    REMAT_MODES,
    RENAMED_KEYS,
    RESIZE_MODES,
    RESUME_FIXED,
    RESUME_FREE,
    SCHEDULES,
    SCORE_AS_MAP,
    SEG_CLASS_CONDITIONINGS,
    SELECT_METRICS,
    SELECT_ON,
    STEP_DEPENDENT_LR_SCHEDULES,
    TILE_STRIDE_HALF_PATCH,
    TILINGS,
    base_config,
    parse_synthesis,
)
from diff_fastener_jax.data.sizing import network_stride, size_hw
from diff_fastener_jax.errors import UserError

__all__ = [
    "ACTIVATIONS",
    "ANOMALY_MAPS",
    "ATTENTION_IMPLS",
    "DATA_FORMATS",
    "DATA_PRESETS",
    "DEMO_FRAMINGS",
    "DTYPES",
    "FOREGROUNDS",
    "INFER_METHODS",
    "LR_SCHEDULES",
    "REMAT_MODES",
    "SCHEDULES",
    "SEG_CLASS_CONDITIONINGS",
    "SELECT_METRICS",
    "SELECT_ON",
    "category_names",
    "class_names",
    "ConfigError",
    "apply_overrides",
    "base_config",
    "check_keys",
    "config_from_json",
    "flatten",
    "example_value",
    "known_keys",
    "load_config",
    "migrate_saved",
    "resume_changes",
    "suggest_key",
    "unknown_keys",
    "validate_config",
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
        raise ConfigError(
            "data.category='all' is resolved only when a run starts (training writes the list into config.json)",
            hint="name the categories: --config.data.category=a,b",
        )
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


def example_value(key: str):
    """A valid value of the dotted schema key `key` for hints: its default, or for a key whose default
    is a sentinel (train.num_steps=-1, ...) an ordinary value."""
    return HINT_EXAMPLES[key] if key in HINT_EXAMPLES else known_keys()[key]


def suggest_key(key: str) -> str | None:
    """'did you mean data.root?' for a mistyped dotted key, or None when nothing is close."""
    if key in RENAMED_KEYS:
        new, values_now = RENAMED_KEYS[key]
        mapping = ", ".join(f"{json.dumps(old)} -> {now}" for old, now in values_now.items())
        return f"{key} is now {new} ({mapping})"
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
        raise ConfigError(
            f"unknown config key {bad[0]}{at}{more}",
            hint=suggest_key(bad[0]) or "see diff_fastener_jax/config_schema.py for every key",
        )


def unknown_keys(config) -> list[str]:
    """Keys of `config` that the schema does not know (typos in config files)."""
    known = known_keys()
    return sorted(k for k in flatten(config) if k not in known)


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:preset]` and returns `get_config(preset)` (outside absl: tests, notebooks)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist", hint=_config_files_hint(path))
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
    if key in INT_OR_PAIR_KEYS and isinstance(value, (list, tuple)):
        return tuple(value)  # an (H, W) pair; validate_config checks it
    if key in INT_OR_PAIR_KEYS and isinstance(old, tuple):
        old = old[0]  # an int replaces a pair
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
        example = example_value(key) if key in known_keys() else old
        raise ConfigError(
            f"{key}: expected {type(old).__name__}, got {value!r}",
            hint=f"e.g. --config.{key}={example!r}" if not isinstance(old, str) else None,
        )
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
        hint = (
            "the folder does not exist"
            if not os.path.isdir(folder)
            else "pass the --workdir of a training run (it holds config.json and checkpoints/)"
        )
        raise ConfigError(f"{folder} is not a training run: {os.path.basename(path)} is missing", hint=hint)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the run config {path}: {e}") from e
    values = migrate_saved(flatten(saved))
    check_keys(list(values), where=path)
    return apply_overrides(base_config(), values)


def refuse_auto_on_trained_run(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError when a trained run's config (config.json with command-line overrides) holds an
    'auto' that only training decides: the run's saved config always holds the decided value."""
    values = flatten(config)
    for key, choices in DECIDED_AT_TRAINING.items():
        if values.get(key) == AUTO:
            raise ConfigError(
                f"--config.{key}=auto: decided when training starts, from the training images; a trained run "
                "needs the choice itself",
                hint=" or ".join(f"--config.{key}={choice}" for choice in choices),
            )


def migrate_saved(values: dict[str, object]) -> dict[str, object]:
    """A saved config's dotted values without the `DROPPED_KEYS` (read by nothing) and with the
    `RENAMED_KEYS` under their names and values now, so that an older run's config.json loads."""
    out = {}
    for key, value in values.items():
        if key in DROPPED_KEYS:
            continue
        if key in RENAMED_KEYS:
            key, values_now = RENAMED_KEYS[key]
            value = values_now.get(value, value)
        out[key] = value
    return out


def _comparable(value):
    """JSON lists and schema tuples compare equal."""
    return tuple(_comparable(v) for v in value) if isinstance(value, (list, tuple)) else value


def resume_changes(saved, config: ml_collections.ConfigDict) -> list[tuple[str, object, object]]:
    """[(key, saved value, new value)] for the settings that a resumed run may not change silently:
    the `RESUME_FIXED` keys and sections (less `RESUME_FREE`), and train.num_steps where the saved or
    the new learning-rate schedule depends on it. `saved` is the checkpoint's config (nested or dotted);
    keys that only one side has (a saved config written by another schema) are not compared."""
    old = migrate_saved(flatten(saved))
    new = flatten(config)
    step_dependent = STEP_DEPENDENT_LR_SCHEDULES
    horizon = (old.get("optim.schedule") in step_dependent) or (new.get("optim.schedule") in step_dependent)

    def fixed(key: str) -> bool:
        if key in RESUME_FREE:
            return False
        if key == "train.num_steps":
            return horizon
        return any(key == f or (f.endswith(".") and key.startswith(f)) for f in RESUME_FIXED)

    return [(k, old[k], new[k]) for k in new if k in old and fixed(k) and _comparable(old[k]) != _comparable(new[k])]


def _need(cond: bool, key: str, msg: str, hint: str | None = None) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}", hint=hint)


def _one_of(key: str, value, allowed) -> None:
    _need(
        value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}", hint=f"e.g. --config.{key}={allowed[0]}"
    )


def _positive(key: str, value, hint_value=None) -> None:
    _need(
        value > 0,
        key,
        f"must be positive, got {value}",
        hint=f"e.g. --config.{key}={hint_value}" if hint_value is not None else None,
    )


def _at_least(key: str, value, low) -> None:
    _need(value >= low, key, f"must be >= {low}, got {value}")


def _in_range(key: str, value, low, high, closed: str = "[]") -> None:
    """`low <= value <= high` with `closed` naming which ends are included: '[]', '[)', '(]' or '()'."""
    ok_low = value >= low if closed[0] == "[" else value > low
    ok_high = value <= high if closed[1] == "]" else value < high
    _need(ok_low and ok_high, key, f"must be in {closed[0]}{low:g}, {high:g}{closed[1]}, got {value}")


def _positive_sizes(key: str, values) -> None:
    _need(
        len(values) > 0 and all(v > 0 for v in values),
        key,
        f"must be a non-empty tuple of positive sizes, got {tuple(values)}",
    )


def validate_data(config: ml_collections.ConfigDict, *, check_data: bool = True) -> None:
    """data.*: format, location (with `check_data`), fractions, workers, demo sizes, folds, image size."""
    d, m = config.data, config.model
    _one_of("data.format", d.format, DATA_FORMATS)
    if check_data:
        _need(
            d.format == "demo" or bool(d.root),
            "data.root",
            f"is required for data.format={d.format!r}",
            hint="e.g. --config.data.root=/data/mvtec",
        )
        _need(d.format == "demo" or os.path.isdir(d.root), "data.root", f"folder {d.root!r} does not exist")
        _need(
            d.format not in ("mvtec", "folder") or bool(d.category),
            "data.category",
            f"is required for data.format={d.format!r}",
            hint="e.g. --config.data.category=bottle",
        )
        _need(
            not d.texture_dir or os.path.isdir(d.texture_dir),
            "data.texture_dir",
            f"folder {d.texture_dir!r} does not exist",
        )
    names = category_names(d.category)
    _need(len(set(names)) == len(names), "data.category", f"names a category twice: {d.category!r}")
    _need(
        "all" not in names or names == ["all"], "data.category", f"'all' cannot be combined with names: {d.category!r}"
    )
    _in_range("data.val_fraction", d.val_fraction, 0.0, 1.0, "[)")
    _one_of("data.foreground", d.foreground, FOREGROUNDS)
    _one_of("data.demo_framing", d.demo_framing, DEMO_FRAMINGS)
    _in_range("data.cutpaste_prob", d.cutpaste_prob, 0.0, 1.0)
    _at_least("data.num_workers", d.num_workers, 0)
    _positive("data.prefetch", d.prefetch)
    _in_range("data.folder_test_fraction", d.folder_test_fraction, 0.0, 1.0, "[)")
    _positive("data.demo_n_train", d.demo_n_train)
    _positive("data.demo_n_test", d.demo_n_test)
    _need(d.num_folds >= 2, "data.num_folds", f"must be >= 2 (one fold held out, the rest trained), got {d.num_folds}")
    _need(
        d.fold == NO_FOLD or 0 <= d.fold < d.num_folds,
        "data.fold",
        f"must be {NO_FOLD} (no fold split) or in [0, {d.num_folds}), got {d.fold}",
    )
    _one_of("data.resize", d.resize, RESIZE_MODES)
    pair = isinstance(d.image_size, (tuple, list))
    _need(
        not pair or (len(d.image_size) == 2 and all(isinstance(v, int) for v in d.image_size)),
        "data.image_size",
        f"must be an int or an (H, W) pair of ints, got {d.image_size!r}",
    )
    _need(
        not pair or d.resize == "square",
        "data.image_size",
        f"an (H, W) pair fixes both sides; data.resize={d.resize!r} needs one int side",
        hint="e.g. --config.data.image_size=256",
    )
    sides = tuple(d.image_size) if pair else (d.image_size, d.image_size)
    _need(
        min(sides) > 0,
        "data.image_size",
        f"must be positive, got {d.image_size}",
        hint="e.g. --config.data.image_size=256",
    )
    stride = network_stride(m)
    _need(
        all(v % stride == 0 for v in sides),
        "data.image_size",
        f"{d.image_size} must be divisible by {stride} (the U-Nets' total downsampling)",
    )
    _need(
        isinstance(d.patch_size, int) and d.patch_size >= PATCH_OFF,
        "data.patch_size",
        f"must be {PATCH_OFF} (whole images) or a crop side in pixels, got {d.patch_size!r}",
    )
    if d.patch_size != PATCH_OFF:
        _need(
            d.patch_size % stride == 0,
            "data.patch_size",
            f"{d.patch_size} must be divisible by {stride} (the U-Nets' total downsampling)",
        )
        # 'long_side' leaves the short side to each image: the pipeline checks those against the patch
        _need(
            d.resize == "long_side" or d.patch_size <= min(sides),
            "data.patch_size",
            f"{d.patch_size} px crops do not fit images resized to data.image_size={d.image_size}",
            hint=f"e.g. --config.data.patch_size={min(sides) - min(sides) % stride}",
        )
    try:
        families = parse_synthesis(d.synthesis)
    except ValueError as e:
        raise ConfigError(
            f"data.synthesis: {e}", hint="e.g. --config.data.synthesis=perlin:0.6,crack:0.2,pore:0.2"
        ) from None
    _need(
        not families or d.cutpaste_prob == 0.0,
        "data.synthesis",
        f"{d.synthesis!r} and data.cutpaste_prob={d.cutpaste_prob} both set the cut-paste share",
        hint="put the share in data.synthesis (e.g. perlin:0.8,cutpaste:0.2) and leave data.cutpaste_prob at 0",
    )
    _need(
        bool(d.val_anomalies) or config.train.select_on not in REAL_VAL_METRICS,
        "data.val_anomalies",
        f"is required by train.select_on={config.train.select_on!r} (real defective images to validate on)",
        hint="e.g. --config.data.val_anomalies=/data/my_real_defects",
    )
    if check_data:
        _need(
            not d.val_anomalies or os.path.isdir(d.val_anomalies),
            "data.val_anomalies",
            f"folder {d.val_anomalies!r} does not exist",
        )


def validate_model(config: ml_collections.ConfigDict) -> None:
    """model.*: widths, depths, heads, choices of activation, dtype, attention, remat, conditioning."""
    m = config.model
    for key in ("in_channels", "base_channels", "num_res_blocks", "num_heads", "num_groups", "dacm_reduction"):
        _positive(f"model.{key}", m[key])
    _positive_sizes("model.channel_mults", m.channel_mults)
    _positive_sizes("model.seg_channels", m.seg_channels)
    _one_of("model.activation", m.activation, ACTIVATIONS)
    _one_of("model.dtype", m.dtype, DTYPES)
    _one_of("model.attention", m.attention, ATTENTION_IMPLS)
    _one_of("model.remat", m.remat, REMAT_MODES)
    _one_of("model.seg_class_conditioning", m.seg_class_conditioning, SEG_CLASS_CONDITIONINGS)
    _in_range("model.dropout", m.dropout, 0.0, 1.0, "[)")
    _at_least("model.skip_every", m.skip_every, 1)
    _in_range("model.seg_head_prior", m.seg_head_prior, 0.0, 1.0, "()")
    _need(
        m.base_channels % m.num_heads == 0,
        "model.num_heads",
        f"{m.num_heads} heads must divide model.base_channels={m.base_channels}",
    )
    short_side = min(size_hw(config.data.image_size))  # attention resolutions refer to the short side
    for r in m.attention_resolutions:
        _need(
            r > 0 and short_side % r == 0,
            "model.attention_resolutions",
            f"{r} does not divide data.image_size={config.data.image_size}",
        )


def validate_diffusion(config: ml_collections.ConfigDict) -> None:
    """diffusion.*: the noise schedule, the training ranges and the inference steps t_s < t_b < T."""
    diff = config.diffusion
    _one_of("diffusion.schedule", diff.schedule, SCHEDULES)
    _need(diff.T >= 2, "diffusion.T", f"must be >= 2 steps, got {diff.T}")
    _in_range("diffusion.beta_start", diff.beta_start, 0.0, 1.0, "()")
    _need(
        diff.beta_start <= diff.beta_end < 1.0,
        "diffusion.beta_end",
        f"must be in [beta_start={diff.beta_start}, 1), got {diff.beta_end}",
    )
    _need(0 < diff.tau < diff.T, "diffusion.tau", f"must be in (0, T={diff.T}), got {diff.tau}")
    _need(
        0 <= diff.eval_t_small < diff.eval_t_big < diff.T,
        "diffusion.eval_t_small/eval_t_big",
        f"need 0 <= t_s < t_b < T, got t_s={diff.eval_t_small}, t_b={diff.eval_t_big}, T={diff.T}",
    )
    _at_least("diffusion.guidance_w", diff.guidance_w, 0.0)
    window = diff.train_t_window
    _need(
        isinstance(window, int) and window >= 0,
        "diffusion.train_t_window",
        f"must be an integer >= 0 (0 = the paper's ranges), got {window!r}",
    )
    if window:
        _need(
            diff.eval_t_small < diff.tau <= diff.eval_t_big,
            "diffusion.train_t_window",
            f"a window around the inference steps needs eval_t_small < tau <= eval_t_big, got "
            f"{diff.eval_t_small}, {diff.tau}, {diff.eval_t_big}",
        )
        _need(
            config.infer.method in ("norm_guided", "one_step"),
            "diffusion.train_t_window",
            f"trains only the steps that norm_guided / one_step inference use; infer.method="
            f"{config.infer.method!r} denoises through steps it never trains (set the window to 0)",
        )


def validate_loss(config: ml_collections.ConfigDict) -> None:
    """loss.*: non-negative weights (not all zero), the focal and SmoothL1 shape parameters."""
    lc = config.loss
    for key in ("noise_weight", "focal_weight", "smoothl1_weight"):
        _at_least(f"loss.{key}", lc[key], 0.0)
    _need(
        lc.noise_weight + lc.focal_weight + lc.smoothl1_weight > 0,
        "loss.noise_weight/focal_weight/smoothl1_weight",
        "at least one loss weight must be positive",
    )
    _in_range("loss.focal_alpha", lc.focal_alpha, 0.0, 1.0)
    _at_least("loss.focal_gamma", lc.focal_gamma, 0.0)
    _at_least("loss.smoothl1_beta", lc.smoothl1_beta, 0.0)


def validate_optim(config: ml_collections.ConfigDict) -> None:
    """optim.*: positive rates, the schedule and its horizon, EMA decay, clipping."""
    o, t = config.optim, config.train
    _positive("optim.lr_recon", o.lr_recon, 1e-4)
    _positive("optim.lr_seg", o.lr_seg, 1e-4)
    _one_of("optim.schedule", o.schedule, LR_SCHEDULES)
    _need(
        o.schedule not in STEP_DEPENDENT_LR_SCHEDULES or t.num_steps > 0,
        "optim.schedule",
        f"{o.schedule!r} needs train.num_steps > 0 (the decay horizon)",
        hint="e.g. --config.train.num_steps=600",
    )
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    _need(
        o.schedule not in STEP_DEPENDENT_LR_SCHEDULES or o.warmup_steps < t.num_steps,
        "optim.warmup_steps",
        f"{o.warmup_steps} warm-up steps leave nothing of the {t.num_steps} steps (train.num_steps) to decay",
    )
    _in_range("optim.final_lr_fraction", o.final_lr_fraction, 0.0, 1.0)
    _in_range("optim.ema_decay", o.ema_decay, 0.0, 1.0, "[)")
    _at_least("optim.clip", o.clip, 0.0)


def validate_train(config: ml_collections.ConfigDict, num_devices: int = 1) -> None:
    """train.*: batch layout over devices, step count (or its epochs sentinel), intervals, selection."""
    t, d = config.train, config.data
    b = t.batch_size
    _positive("train.batch_size", b, 4)
    _need(
        b % 2 == 0,
        "train.batch_size",
        f"{b} must be even (half normal, half synthetic)",
        hint=f"e.g. --config.train.batch_size={b + 1}",
    )
    _need(
        b % (2 * num_devices) == 0,
        "train.batch_size",
        f"{b} is not divisible by 2 x {num_devices} devices: each device needs an even, equal share",
        hint=f"e.g. --config.train.batch_size={2 * num_devices * max(1, b // (2 * num_devices))}",
    )
    per_device = b // num_devices
    _need(
        t.microbatch == 0 or (t.microbatch > 0 and t.microbatch % 2 == 0 and per_device % t.microbatch == 0),
        "train.microbatch",
        f"{t.microbatch} must be 0 or an even divisor of the {per_device} rows per device "
        f"(train.batch_size {b} over {num_devices} device(s))",
        hint="e.g. --config.train.microbatch=2",
    )
    _need(
        t.num_steps > 0 or t.num_steps == NUM_STEPS_FROM_EPOCHS,
        "train.num_steps",
        f"must be positive, or {NUM_STEPS_FROM_EPOCHS} to derive it from train.num_epochs; got {t.num_steps}",
        hint=f"e.g. --config.train.num_steps=100, or --config.train.num_steps={NUM_STEPS_FROM_EPOCHS} with "
        f"--config.train.num_epochs=N",
    )
    _need(
        t.num_steps > 0 or t.num_epochs > 0,
        "train.num_epochs",
        f"must be positive when train.num_steps={NUM_STEPS_FROM_EPOCHS} (steps from epochs), got {t.num_epochs}",
    )
    _at_least("train.num_epochs", t.num_epochs, 0)
    for key in ("checkpoint_every", "log_every", "keep_checkpoints"):
        _positive(f"train.{key}", t[key])
    _need(t.eval_every >= 0, "train.eval_every", f"must be >= 0 (0 = no validation), got {t.eval_every}")
    _need(t.val_batches >= 0, "train.val_batches", f"must be >= 0 (0 = no validation), got {t.val_batches}")
    _one_of("train.select_on", t.select_on, SELECT_ON)
    _need(
        t.select_on == "last" or (t.eval_every >= 1 and t.val_batches >= 1 and d.val_fraction > 0),
        "train.select_on",
        f"{t.select_on!r} selects on validation, which this run does not run",
        hint="needs train.eval_every >= 1, train.val_batches >= 1 and data.val_fraction > 0; or use 'last'",
    )


def validate_infer(config: ml_collections.ConfigDict) -> None:
    """infer.*: the reconstruction method and its step counts, the anomaly map, scoring, batch."""
    i, diff = config.infer, config.diffusion
    _one_of("infer.method", i.method, INFER_METHODS)
    _one_of("infer.map", i.map, ANOMALY_MAPS)
    _positive("infer.ddim_steps", i.ddim_steps)
    _need(
        0 < i.adaptive_t_max < diff.T,
        "infer.adaptive_t_max",
        f"must be in (0, diffusion.T={diff.T}), got {i.adaptive_t_max}",
    )
    _need(i.adaptive_margin >= 0, "infer.adaptive_margin", f"must be >= 0 grid steps, got {i.adaptive_margin}")
    _at_least("infer.adaptive_delta", i.adaptive_delta, 0)
    _positive("infer.adaptive_fusion_gain", i.adaptive_fusion_gain)
    _positive("infer.top_k", i.top_k, 50)
    _need(i.map_sigma >= 0, "infer.map_sigma", f"must be >= 0 (pixels at 256²), got {i.map_sigma}")
    _need(
        i.score_sigma >= 0 or i.score_sigma == SCORE_AS_MAP,
        "infer.score_sigma",
        f"must be >= 0 (pixels at 256²), or {SCORE_AS_MAP:g} for the map's own (infer.map_sigma), got {i.score_sigma}",
    )
    _need(i.chroma_weight >= 0, "infer.chroma_weight", f"must be >= 0, got {i.chroma_weight}")
    _need(
        i.score_chroma_weight >= 0 or i.score_chroma_weight == SCORE_AS_MAP,
        "infer.score_chroma_weight",
        f"must be >= 0, or {SCORE_AS_MAP:g} for the map's own (infer.chroma_weight), got {i.score_chroma_weight}",
    )
    _one_of("infer.score_region", i.score_region, REGIONS)
    _one_of("infer.map_region", i.map_region, REGIONS)
    _one_of("infer.normal_map", i.normal_map, NORMAL_MAPS)
    _need(
        not (i.normal_map in FITTED_NORMAL_MAPS and class_names(config)),
        "infer.normal_map",
        f"{i.normal_map!r} fits one normal map per model; a unified multi-category model's categories do not share one",
        hint="train one model per category, or use infer.normal_map='auto' or 'off'",
    )
    _positive("infer.batch_size", i.batch_size, 16)
    _at_least("infer.seed", i.seed, 0)
    _one_of("infer.tiling", i.tiling, TILINGS)
    patch = config.data.patch_size
    _need(
        i.tile_stride == TILE_STRIDE_HALF_PATCH or 0 < i.tile_stride <= max(patch, 1),
        "infer.tile_stride",
        f"must be {TILE_STRIDE_HALF_PATCH} (half the patch) or 1..data.patch_size={patch} px so tiles overlap "
        f"or touch, got {i.tile_stride}",
        hint=f"e.g. --config.infer.tile_stride={max(patch // 2, 1)}",
    )


def validate_eval(config: ml_collections.ConfigDict) -> None:
    """eval.*: the calibration target or a fixed threshold, the AUPRO limit, the report's panels."""
    e = config.eval
    _in_range("eval.fpr_target", e.fpr_target, 0.0, 1.0, "()")
    _need(
        e.threshold >= 0 or e.threshold == CALIBRATE_THRESHOLD,
        "eval.threshold",
        f"must be >= 0 (a fixed image-score threshold) or {CALIBRATE_THRESHOLD} (calibrate on validation "
        f"normals), got {e.threshold}",
    )
    _in_range("eval.aupro_limit", e.aupro_limit, 0.0, 1.0, "(]")
    _at_least("eval.num_panels", e.num_panels, 0)
    _one_of("eval.reference", e.reference, REFERENCE_DETECTORS)


def validate_config(config: ml_collections.ConfigDict, num_devices: int = 1, *, check_data: bool = True) -> None:
    """Raises ConfigError for unknown keys or invalid values; returns None when the config is usable.
    `check_data=False` leaves out the data location (data.root, data.category, data.texture_dir), for
    programs that read no dataset (the benchmark feeds synthetic arrays)."""
    check_keys(list(flatten(config)), where="config")
    missing = sorted(set(known_keys()) - set(flatten(config)))
    if missing:
        raise ConfigError(
            f"config is missing key(s): {', '.join(missing)}", hint="build config files on config_schema.base_config()"
        )
    _at_least("seed", config.seed, 0)
    validate_data(config, check_data=check_data)
    validate_model(config)
    validate_diffusion(config)
    validate_loss(config)
    validate_optim(config)
    validate_train(config, num_devices)
    validate_infer(config)
    validate_eval(config)
