"""Building and initialising the two networks (reconstruction U-Net with DACM and Sparse-Skip, segmentation
U-Net) from a config; re-exported by the `models` package."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from diff_fastener_jax.config import class_names
from diff_fastener_jax.data.sizing import size_hw
from diff_fastener_jax.models.backend import Implementations, resolve_implementations
from diff_fastener_jax.models.layout import attention_downsample_factors
from diff_fastener_jax.models.segmentation import SegmentationUNet
from diff_fastener_jax.models.unet import ReconstructionUNet
from diff_fastener_jax.perf import xla_options

__all__ = ["build_models", "count_params", "init_params", "jit_init", "tile_rows"]


def build_models(
    config: ml_collections.ConfigDict, impl: Implementations | None = None
) -> tuple[ReconstructionUNet, SegmentationUNet]:
    """Builds (reconstruction U-Net, segmentation U-Net) from `config.model` and `config.data.image_size`.

    `impl`: the layers' implementation choices; default `resolve_implementations(config)` for JAX's
    default backend. Every choice gives the same parameter tree.
    """
    m = config.model
    impl = impl or resolve_implementations(config)
    dtype = impl.compute_dtype
    remat = m.remat
    attention_ds = attention_downsample_factors(config.data.image_size, m.attention_resolutions)
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
        impl=impl,
        remat=remat,
        num_classes=len(class_names(config)),
    )
    seg = SegmentationUNet(
        channels=tuple(m.seg_channels),
        groups=m.num_groups,
        dtype=dtype,
        remat=remat,
        num_classes=len(class_names(config)),
        head_prior=float(m.seg_head_prior),
        class_conditioning=m.seg_class_conditioning,
        impl=impl,
    )
    return recon, seg


def init_params(config: ml_collections.ConfigDict, key: jax.Array, image_size=None, compiled: bool = True):
    """Initialises {'recon': ..., 'seg': ...} float32 params for one image of `image_size` (int or (H, W)).

    `compiled` (default) runs the initialisation as one jitted program. Flax's `init` traces a forward
    pass; run eagerly, each of its operations is compiled and dispatched on its own: 59-64 s for the
    paper config on an H200 (docs/performance.md), about 47 s for the two-level smoke config on 2 CPU cores,
    paid again by every process because each of those small compiles is below any sensible persistent
    cache threshold. Under `jit` the forward pass is dead code and only the random draws remain, one
    program that XLA:CPU compiles in about 10 s at LLVM level 1 (`xla_options.init_compiler_options`)
    and a persistent compilation cache keeps. Both paths give bit-identical parameters.
    """
    recon, seg = build_models(config)
    h, w = size_hw(image_size or config.data.image_size)
    c = config.model.in_channels

    def init(key):
        k1, k2 = jax.random.split(key)
        x = jnp.zeros((1, h, w, c), jnp.float32)
        cls = jnp.zeros((1,), jnp.int32) if recon.num_classes else None
        recon_params = recon.init(k1, x, jnp.zeros((1,), jnp.int32), class_ids=cls)["params"]
        seg_params = seg.init(k2, jnp.zeros((1, h, w, 2 * c), jnp.float32), class_ids=cls)["params"]
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
