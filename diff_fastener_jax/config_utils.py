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
