"""The networks: reconstruction U-Net (with DACM and Sparse-Skip) and segmentation U-Net."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from diff_fastener_jax.config import class_names
from diff_fastener_jax.models.dacm import DACM
from diff_fastener_jax.models.layers import attention_implementation
from diff_fastener_jax.models.segmentation import SegmentationUNet
from diff_fastener_jax.models.unet import ReconstructionUNet, kept_skips
from diff_fastener_jax.perf import xla_options

__all__ = ["DACM", "ReconstructionUNet", "SegmentationUNet", "attention_levels", "build_models", "count_params",
           "init_params", "jit_init", "kept_skips", "tile_rows", "compute_dtype", "resolve_dtype_name"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_NAMES = ("auto", *_DTYPES)


def resolve_dtype_name(name: str, backend: str | None = None) -> str:
    """`model.dtype` -> a concrete dtype name: 'auto' is bfloat16 on GPUs/TPUs (tensor cores; params
    stay float32) and float32 elsewhere (XLA:CPU computes bf16 convolutions in float32 plus casts, so
    bf16 is slower there: benchmarks/RESULTS.md)."""
    if name not in DTYPE_NAMES:
        raise ValueError(f"model.dtype: unknown dtype {name!r}; choose one of {list(DTYPE_NAMES)}")
    if name != "auto":
        return name
    return "bfloat16" if (backend or jax.default_backend()) in ("gpu", "tpu") else "float32"


def compute_dtype(name: str):
    """Maps `model.dtype` (including 'auto', see `resolve_dtype_name`) to a jnp dtype."""
    return _DTYPES[resolve_dtype_name(name)]


def attention_downsample_factors(image_size: int, resolutions) -> tuple[int, ...]:
    """Feature-map sizes (at `image_size` input) -> the level downsampling factors that get attention.

    Fixing the factors at build time keeps the parameter count independent of the input resolution.
    """
    factors = []
    for r in resolutions:
        if r <= 0 or image_size % r:
            raise ValueError(f"model.attention_resolutions: {r} does not divide data.image_size={image_size}")
        factors.append(image_size // r)
    return tuple(sorted(factors))


def attention_levels(config: ml_collections.ConfigDict) -> list[int]:
    """U-Net levels (0 = full resolution) that hold attention blocks: those whose downsampling factor
    `model.attention_resolutions` names, and the middle (the last level)."""
    m = config.model
    attention_ds = attention_downsample_factors(config.data.image_size, m.attention_resolutions)
    last = len(m.channel_mults) - 1
    return sorted({level for level in range(last + 1) if 2**level in attention_ds} | {last})


def build_models(config: ml_collections.ConfigDict) -> tuple[ReconstructionUNet, SegmentationUNet]:
    """Builds (reconstruction U-Net, segmentation U-Net) from `config.model` and `config.data.image_size`."""
    m = config.model
    dtype = compute_dtype(m.dtype)
    remat = m.get("remat", "none")
    attention_ds = attention_downsample_factors(config.data.image_size, m.attention_resolutions)
    head_dims = [m.base_channels * m.channel_mults[level] // m.num_heads for level in attention_levels(config)]
    attention_impl = attention_implementation(m.get("attention", "auto"), dtype, head_dims)
    recon = ReconstructionUNet(
        in_channels=m.in_channels,
        base_channels=m.base_channels,
        channel_mults=tuple(m.channel_mults),
        num_res_blocks=m.num_res_blocks,
        attention_ds=attention_ds,
        num_heads=m.num_heads,
        groups=m.num_groups,
        activation=m.activation,
        dropout=m.dropout,
        skip_every=m.skip_every,
        use_dacm=m.use_dacm,
        dacm_use_cbam=m.dacm_use_cbam,
        dacm_use_dilated=m.dacm_use_dilated,
        dacm_reduction=m.dacm_reduction,
        dtype=dtype,
        attention_impl=attention_impl,
        remat=remat,
        num_classes=len(class_names(config)),
    )
    seg = SegmentationUNet(channels=tuple(m.seg_channels), groups=m.num_groups, dtype=dtype, remat=remat,
                           num_classes=len(class_names(config)), head_prior=float(m.get("seg_head_prior", 0.5)),
                           class_conditioning=m.get("seg_class_conditioning", "channels"))
    return recon, seg


def init_params(config: ml_collections.ConfigDict, key: jax.Array, image_size: int | None = None,
                compiled: bool = True):
    """Initialises {'recon': ..., 'seg': ...} float32 params for one image of `image_size`.

    `compiled` (default) runs the initialisation as one jitted program. Flax's `init` traces a forward
    pass; run eagerly, each of its operations is compiled and dispatched on its own: 59-64 s for the
    paper config on an H200 (benchmarks/RESULTS.md), 47 s for the (then two-level) smoke config on the 2-core CPU,
    paid again by every process because each of those small compiles is below any sensible persistent
    cache threshold. Under `jit` the forward pass is dead code and only the random draws remain, one
    program that XLA:CPU compiles in about 10 s at LLVM level 1 (`xla_options.init_compiler_options`)
    and a persistent compilation cache keeps. Both paths give bit-identical parameters.
    """
    recon, seg = build_models(config)
    size = image_size or config.data.image_size
    c = config.model.in_channels

    def init(key):
        k1, k2 = jax.random.split(key)
        x = jnp.zeros((1, size, size, c), jnp.float32)
        cls = jnp.zeros((1,), jnp.int32) if recon.num_classes else None
        recon_params = recon.init(k1, x, jnp.zeros((1,), jnp.int32), class_ids=cls)["params"]
        seg_params = seg.init(k2, jnp.zeros((1, size, size, 2 * c), jnp.float32), class_ids=cls)["params"]
        return {"recon": recon_params, "seg": seg_params}

    return jit_init(init, key) if compiled else init(key)


def jit_init(fn, key: jax.Array):
    """`fn(key)` (parameters or a train state) as one jitted program with the initialisation's compiler
    options. Inside a trace (`jax.eval_shape`, an enclosing `jit`) it is traced inline: a nested jit may
    not carry compiler options, and there is no separate program to save compiling."""
    if _inside_a_trace():
        return fn(key)
    return jax.jit(fn, compiler_options=xla_options.init_compiler_options())(key)


def _inside_a_trace() -> bool:
    """Whether JAX is tracing now. JAX has no public test for it; where its private one is gone, answer
    yes (tracing inline is right in both cases, only slower to compile at top level)."""
    clean = getattr(getattr(jax, "_src", None) and jax._src.core, "trace_state_clean", None)
    return clean is None or not clean()


def tile_rows(class_ids: jax.Array | None, n: int) -> jax.Array | None:
    """class ids (B,) repeated to n = k*B rows: the fused passes stack k copies of the batch."""
    if class_ids is None:
        return None
    return jnp.tile(class_ids, n // class_ids.shape[0])


def count_params(tree) -> int:
    """Number of scalars in a parameter pytree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
