"""Loading config files by path (`configs/x.py[:arg]`) outside absl, and dotted overrides."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys

import ml_collections


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` and returns `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    name = "_dfj_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, object]) -> ml_collections.ConfigDict:
    """Sets dotted keys (`'model.base_channels': 32`); unknown keys raise a KeyError naming the key.

    String values are parsed as Python literals when possible, so CLI text like '(1, 2)' works.
    """
    for dotted, value in overrides.items():
        node = config
        parts = dotted.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise KeyError(f"unknown config key {dotted!r} (no {p!r})")
            node = node[p]
        if parts[-1] not in node:
            raise KeyError(f"unknown config key {dotted!r}")
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
        old = node[parts[-1]]
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        with node.ignore_type():
            node[parts[-1]] = value
    return config


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


def config_from_json(path: str) -> ml_collections.ConfigDict:
    """Reads a run's saved config.json back into the schema (lists become tuples where the schema has tuples)."""
    import json

    from diff_fastener_jax.config_schema import base_config

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no saved config at {path}: is this a training workdir?")
    with open(path) as f:
        saved = json.load(f)
    config = base_config()
    known = flatten(config)
    values = {k: v for k, v in flatten(saved).items() if k in known}
    unknown = sorted(set(flatten(saved)) - set(known))
    if unknown:
        raise KeyError(f"{path}: unknown config key(s) {unknown}")
    return apply_overrides(config, {k: (v if not isinstance(v, str) else repr(v)) for k, v in values.items()})


def parse_set_overrides(items: list[str]) -> dict[str, str]:
    """['model.dtype=bfloat16', 'config.data.image_size=128'] (from repeated --set) -> {key: value}."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.removeprefix("config.")] = v
    return out


def parse_cli_overrides(args: list[str]) -> dict[str, str]:
    """['--config.data.root=/x', ...] -> {'data.root': '/x'}; anything else raises a clear error."""
    out = {}
    for a in args:
        if not a.startswith("--config.") or "=" not in a:
            raise ValueError(f"unexpected argument {a!r}: overrides look like --config.data.root=/path")
        k, v = a[len("--config."):].split("=", 1)
        out[k] = v
    return out
