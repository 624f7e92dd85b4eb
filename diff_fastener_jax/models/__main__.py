r"""Model summary: parameter counts and forward GFLOPs per image (convolutions and matmuls, 2 FLOPs
per multiply-add, counted from the jaxpr: `perf/flop_count.py`).

  python -m diff_fastener_jax.models --config configs/<x>.py[:preset] [--json FILE] [--config.KEY=VALUE ...]

Example:
  python -m diff_fastener_jax.models --config configs/default.py --config.model.dtype=bfloat16
"""

from __future__ import annotations

import json

from absl import flags

from diff_fastener_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags (defined only when it runs, so importing the module defines none)."""
    cli.define_config("file")
    flags.DEFINE_string("json", None, "also write the summary to this JSON file")


def forward_gflops(fn, *args) -> float:
    """GFLOPs of one call of `fn(*args)`: its convolutions and matmuls, counted from the jaxpr
    (`perf/flop_count.py`). Nothing is compiled, and the count is the same on every backend (XLA:GPU's
    cost analysis would leave out the convolutions it hands to cuDNN)."""
    from diff_fastener_jax.perf.flop_count import program_flops

    return program_flops(fn, *args) / 1e9


def model_summary(config, batch: int = 1) -> dict:
    """Params and per-image forward GFLOPs of both networks at `config.data.image_size`.

    The up-sampling convs are counted as the networks are written, at the doubled size, so the count
    is the architecture's on every backend; on CPU they run by phases with 2.25x fewer FLOPs
    (`models/upsample_conv.py`), which `benchmark` counts in the program it times."""
    # JAX loads here, inside the command (cli.run turns its absence into one error line)
    import dataclasses

    import jax
    import jax.numpy as jnp

    from diff_fastener_jax.models import build_models, count_params, kept_skips, resolve_implementations

    recon, seg = build_models(config, dataclasses.replace(resolve_implementations(config), upsample_conv="resize"))
    size = config.data.image_size
    c = config.model.in_channels
    x = jnp.zeros((batch, size, size, c), jnp.float32)
    t = jnp.zeros((batch,), jnp.int32)
    xs = jnp.zeros((batch, size, size, 2 * c), jnp.float32)
    cls = jnp.zeros((batch,), jnp.int32) if recon.num_classes else None  # a unified model's class ids
    p_recon = jax.eval_shape(lambda k: recon.init(k, x, t, class_ids=cls), jax.random.key(0))["params"]
    p_seg = jax.eval_shape(lambda k: seg.init(k, xs, class_ids=cls), jax.random.key(0))["params"]
    g_recon = forward_gflops(lambda p, x, t: recon.apply({"params": p}, x, t, class_ids=cls), p_recon, x, t) / batch
    g_seg = forward_gflops(lambda p, x: seg.apply({"params": p}, x, class_ids=cls), p_seg, xs) / batch
    m = config.model
    skips = kept_skips(len(m.channel_mults), m.num_res_blocks, m.skip_every)
    return {
        "image_size": size,
        "params_recon": count_params(p_recon),
        "params_seg": count_params(p_seg),
        "gflops_recon": g_recon,
        "gflops_seg": g_seg,
        # one-step norm-guided inference = two U-Net passes + one seg pass
        "gflops_infer_per_image": 2 * g_recon + g_seg,
        "skips_kept": int(sum(skips)),
        "skips_total": len(skips),
        "dtype": m.dtype,
    }


def main(argv) -> int:
    summary = model_summary(cli.get_config(check_data=False))  # counts only: no dataset is read
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"{k:<{width}}  {v:.3f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    cli.run(main, __doc__, define_flags=define_flags, required=("config",))
