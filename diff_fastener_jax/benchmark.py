r"""Speed and memory of the jitted inference and train step, against the hardware's limit.

  python -m diff_fastener_jax.benchmark --config configs/<x>.py[:preset] [--batch_sizes 1,8,32]
      [--train_batch N] [--dtype auto|float32|bfloat16] [--compile_only] [--out FILE] [--config.KEY=VALUE ...]

Example:
  python -m diff_fastener_jax.benchmark --config configs/default.py --batch_sizes 1,8,32 \
      --config.model.dtype=bfloat16 --out benchmarks/h100_bf16.json
  python -m diff_fastener_jax.benchmark --config configs/default.py --batch_sizes 4 --train_batch 4 \
      --config.model.remat=blocks --compile_only        # XLA's planned memory, FLOPs; runs nothing

Inference = the whole one-step norm-guided pipeline (two U-Net passes fused into one batched call,
segmentation net, top-K score) as one XLA program; training = the whole data-parallel train step
(forward, losses, backward, Adam). Timings: compile first (timed separately), one warm-up call, then
the median of `--repeats` calls, each ended by `block_until_ready`. FLOPs are the matrix-unit FLOPs
counted from the program's jaxpr (`perf/flop_count.py`: XLA:GPU's own count leaves out the convolutions
it hands to cuDNN); bytes come from XLA's cost analysis of the compiled program (per device for a
sharded program, so they are multiplied by the device count), which also gives `xla_gflops_per_image`.
Achieved TFLOP/s over the device's peak (a datasheet table for GPUs, a measured matmul
roofline on CPUs) is the fraction of peak. `--profile B` adds per-component timings
(`perf/block_profile.py`). `--compile_only` compiles every requested program from abstract inputs
and records compile time, FLOPs and `xla_peak_memory_bytes` without allocating or running anything.
`--init_only` only initialises (and times) the parameters and the train state.
Config overrides: `--config.a.b=v`, as in every command. The spellings `--batch-sizes`,
`--train-batch`, `--compile-only` are understood too, and `--set a.b=v` as a deprecated alias.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from diff_fastener_jax import cli
from diff_fastener_jax.errors import UserError
from diff_fastener_jax.perf import hostenv

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags (defined only when it runs: absl flags are process-global)."""
    cli.define_config("file")
    flags.DEFINE_string(
        "batch_sizes", "1,8,32", "inference batch sizes, comma separated ('' or 0: no inference, train step only)"
    )
    flags.DEFINE_integer("train_batch", None, "global train batch (default: train.batch_size; 0 skips it)")
    flags.DEFINE_enum(
        "dtype",
        None,
        ["auto", "float32", "bfloat16"],
        "compute dtype (sets model.dtype; auto = bfloat16 on GPU, float32 on CPU)",
    )
    flags.DEFINE_integer("repeats", 5, "timed calls per program (the median is reported)")
    flags.DEFINE_integer("profile", 0, "also time the components (U-Net pass, seg net, each block) at this batch")
    flags.DEFINE_bool(
        "compile_only", False, "only compile the programs: compile seconds, FLOPs, XLA's planned memory; runs nothing"
    )
    flags.DEFINE_bool(
        "init_only",
        False,
        "only initialise the parameters and train state (timed): fills a persistent compilation cache",
    )
    flags.DEFINE_string("out", None, "write the JSON record here")


def main(argv) -> int:
    # Here, not at the top: without JAX the command ends with cli.run's one error line.
    from diff_fastener_jax.perf.benchmark import json_safe, measure, parse_batch_sizes, print_table

    batch_sizes = parse_batch_sizes(FLAGS.batch_sizes)
    if FLAGS.dtype:
        FLAGS.config.model.dtype = FLAGS.dtype
    config = cli.get_config(check_data=False)  # synthetic inputs: no dataset is read
    train_batch = config.train.batch_size if FLAGS.train_batch is None else FLAGS.train_batch
    result = measure(
        config,
        batch_sizes,
        train_batch,
        compile_only=FLAGS.compile_only,
        repeats=FLAGS.repeats,
        profile_batch=FLAGS.profile,
        init_only=FLAGS.init_only,
    )
    result["config"] = config_flags.get_config_filename(FLAGS["config"])
    result["command"] = "python -m diff_fastener_jax.benchmark " + " ".join(sys.argv[1:])
    result["host_setup"] = hostenv.host_setup()  # malloc huge pages on or off (see hostenv)
    print_table(result)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(json_safe(result), f, indent=2)
        print(f"wrote {FLAGS.out}")
    return 0


if __name__ == "__main__":
    with cli.needs_training_stack():
        from diff_fastener_jax.perf.benchmark import modern_argv
    try:
        _argv = modern_argv(sys.argv)
    except UserError as e:
        cli.fail(str(e), e.hint, exc=e)
    # --out is the JSON record (a file), not a folder
    cli.run(main, __doc__, define_flags=define_flags, required=("config",), argv=_argv, folder_flags=("workdir",))
