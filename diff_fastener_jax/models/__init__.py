"""The networks: reconstruction U-Net (with DACM and Sparse-Skip) and segmentation U-Net.

The names below load on first use (PEP 562): importing this package imports no JAX, so that
`python -m diff_fastener_jax.models` starts, and can say in one line that the training stack is
missing, before any module of it is needed.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it
_EXPORTS = {
    "DACM": "dacm",
    "Implementations": "backend",
    "ReconstructionUNet": "unet",
    "SegmentationUNet": "segmentation",
    "attention_levels": "layout",
    "build_models": "networks",
    "count_params": "networks",
    "init_params": "networks",
    "jit_init": "networks",
    "kept_skips": "unet",
    "resolve_dtype_name": "backend",
    "resolve_implementations": "backend",
    "tile_rows": "networks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
