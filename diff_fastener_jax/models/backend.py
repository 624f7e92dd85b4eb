"""Which implementation each layer uses, decided once per model build, for one backend.

Some layers have several implementations that compute the same function at different speeds on
different hardware: GroupNorm (flax's, or `models/norm.py`'s hand-written sums and gradient, faster
on XLA:CPU), the up-sampling blocks' first conv (at the doubled size, or as one 2x2 conv at the low
size: `models/upsample_conv.py`), self-attention (XLA's composed ops, optionally in query chunks
that stay in a CPU core's cache outside training, or cuDNN's fused kernel on GPUs in 16-bit compute)
and the compute dtype of `model.dtype='auto'`. `resolve_implementations(config)` makes every one of
these choices here, from the config, the JAX backend and three environment overrides for A/B
measurements:

  DFJ_GROUPNORM=flax | hand_written   force a GroupNorm implementation
  DFJ_ATTENTION_CHUNK=0 | R           no query chunking, or R query rows per chunk
  DFJ_UPSAMPLE_CONV=resize | phases   force an up-sampling conv implementation

`build_models` passes the result down to the layers as module fields; the layers themselves read
neither the environment nor the backend. None of the choices changes the parameter tree, so a
checkpoint moves freely between backends and implementations.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections

from diff_fastener_jax.config_schema import ATTENTION_IMPLS, DTYPES
from diff_fastener_jax.models.layout import attention_head_dims

GROUPNORM_IMPLS = ("flax", "hand_written")
GROUPNORM_ENV = "DFJ_GROUPNORM"
UPSAMPLE_CONV_IMPLS = ("resize", "phases")
UPSAMPLE_CONV_ENV = "DFJ_UPSAMPLE_CONV"
ATTENTION_CHUNK_ENV = "DFJ_ATTENTION_CHUNK"

# The (rows, N) float32 logits of one query chunk: small enough to stay in a core's L2 cache
# (2 MiB on the CPUs measured) from the logits matmul through the softmax to the value matmul.
CPU_CHUNK_BYTES = 2 * 1024 * 1024

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Implementations:
    """The layers' implementation choices for one model build (hashable: flax module fields).

    dtype: the concrete compute dtype name ('float32' | 'bfloat16' | 'float16').
    groupnorm: 'flax' (flax's nn.GroupNorm) | 'hand_written' (`norm.GroupNorm`).
    upsample_conv: 'resize' (upsample, then a 3x3 conv at the doubled size) | 'phases' (one 2x2 conv
        at the low size whose outputs are the four phases: `models/upsample_conv.py`).
    attention: the `implementation` of `jax.nn.dot_product_attention`: None = XLA ops
        (`layers.composed_attention` / `layers.chunked_attention`) | 'cudnn' (the fused kernel).
    attention_chunk_bytes: > 0: outside training, XLA-ops attention splits the queries into chunks whose
        (rows, N) float32 logits fit in this many bytes, once one head's (N, N) logits outgrow half
        of it; 0 = never chunk (unless `attention_chunk_rows` forces it).
    attention_chunk_rows: > 0: exactly this many query rows per chunk (must divide every attention
        block's position count); 0 = derived from `attention_chunk_bytes`.
    """

    dtype: str = "float32"
    groupnorm: str = "flax"
    upsample_conv: str = "resize"
    attention: str | None = None
    attention_chunk_bytes: int = 0
    attention_chunk_rows: int = 0

    @property
    def compute_dtype(self):
        """The jnp dtype of `dtype`."""
        return _DTYPES[self.dtype]

    def query_chunk(self, num_positions: int) -> int | None:
        """Query rows per chunk for XLA-ops attention over `num_positions` positions outside training,
        or None for the batched form. Raises ValueError when forced rows do not divide N."""
        if self.attention_chunk_rows:
            if num_positions % self.attention_chunk_rows:
                raise ValueError(
                    f"{ATTENTION_CHUNK_ENV}={self.attention_chunk_rows} does not divide the "
                    f"{num_positions} attention positions"
                )
            return self.attention_chunk_rows
        budget = self.attention_chunk_bytes
        if not budget or 4 * num_positions * num_positions <= budget // 2:
            return None
        rows = max(1, budget // (4 * num_positions))
        while num_positions % rows:
            rows -= 1
        return rows


def resolve_dtype_name(name: str, backend: str | None = None) -> str:
    """`model.dtype` -> a concrete dtype name: 'auto' is bfloat16 on GPUs/TPUs (tensor cores; params
    stay float32) and float32 elsewhere (XLA:CPU computes bf16 convolutions in float32 plus casts, so
    bf16 is slower there: docs/performance.md)."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype: unknown dtype {name!r}; choose one of {list(DTYPES)}")
    if name != "auto":
        return name
    return "bfloat16" if (backend or jax.default_backend()) in ("gpu", "tpu") else "float32"


def attention_kernel(name: str, dtype, head_dims=(), backend: str | None = None) -> str | None:
    """`model.attention` -> the `implementation` argument of `jax.nn.dot_product_attention`.

    'xla' -> None (XLA's composed softmax(QK^T)V, any backend and dtype); 'cudnn' -> 'cudnn' (the fused
    flash-attention kernel: GPU only, bf16/fp16 only); 'auto' -> 'cudnn' where that kernel applies
    (a GPU backend, 16-bit compute, every head dim a multiple of 8 and at most 128), else XLA.
    """
    if name not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention: unknown implementation {name!r}; choose one of {ATTENTION_IMPLS}")
    if name == "xla":
        return None
    if name == "cudnn":
        return "cudnn"
    fits = all(d % 8 == 0 and d <= 128 for d in head_dims)
    on_gpu = (backend or jax.default_backend()) == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype).itemsize == 2 and fits else None


def _forced_choice(environ, variable: str, allowed: tuple[str, ...]) -> str:
    """`variable`'s value in `environ` (default: os.environ), '' when unset; a ValueError for a value
    not in `allowed`."""
    environ = os.environ if environ is None else environ
    forced = environ.get(variable, "")
    if forced and forced not in allowed:
        raise ValueError(f"{variable}={forced!r}: expected one of {', '.join(allowed)}")
    return forced


def groupnorm_impl(backend: str | None = None, environ=None) -> str:
    """'hand_written' on XLA:CPU, where it is the faster one (docs/performance.md); flax's elsewhere,
    whose GPU speed is the one measured. DFJ_GROUPNORM forces either."""
    forced = _forced_choice(environ, GROUPNORM_ENV, GROUPNORM_IMPLS)
    return forced or ("hand_written" if (backend or jax.default_backend()) == "cpu" else "flax")


def upsample_conv_impl(backend: str | None = None, environ=None) -> str:
    """'phases' on XLA:CPU, where it is the faster one (docs/performance.md); 'resize' elsewhere, whose
    GPU speed is the one measured. DFJ_UPSAMPLE_CONV forces either."""
    forced = _forced_choice(environ, UPSAMPLE_CONV_ENV, UPSAMPLE_CONV_IMPLS)
    return forced or ("phases" if (backend or jax.default_backend()) == "cpu" else "resize")


def attention_chunking(backend: str | None = None, environ=None) -> tuple[int, int]:
    """(attention_chunk_bytes, attention_chunk_rows): the cache budget on XLA:CPU, no chunking
    elsewhere; DFJ_ATTENTION_CHUNK=0 turns chunking off, =R forces R rows on any backend."""
    environ = os.environ if environ is None else environ
    forced = environ.get(ATTENTION_CHUNK_ENV, "")
    if forced:
        if not forced.isdigit():
            raise ValueError(f"{ATTENTION_CHUNK_ENV}={forced!r}: expected 0 (off) or a number of query rows")
        return 0, int(forced)
    return (CPU_CHUNK_BYTES if (backend or jax.default_backend()) == "cpu" else 0), 0


def resolve_implementations(
    config: ml_collections.ConfigDict, backend: str | None = None, environ=None
) -> Implementations:
    """Every implementation choice for `config` on `backend` (default: JAX's default backend), with the
    DFJ_GROUPNORM / DFJ_UPSAMPLE_CONV / DFJ_ATTENTION_CHUNK overrides of `environ` (default:
    os.environ) applied."""
    backend = backend or jax.default_backend()
    m = config.model
    dtype = resolve_dtype_name(m.dtype, backend)
    chunk_bytes, chunk_rows = attention_chunking(backend, environ)
    return Implementations(
        dtype=dtype,
        groupnorm=groupnorm_impl(backend, environ),
        upsample_conv=upsample_conv_impl(backend, environ),
        attention=attention_kernel(m.attention, _DTYPES[dtype], attention_head_dims(config), backend),
        attention_chunk_bytes=chunk_bytes,
        attention_chunk_rows=chunk_rows,
    )
