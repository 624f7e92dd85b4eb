r"""Train a Diff-Fastener run (or resume it): checkpoints, metrics.jsonl and config.json in --workdir.

  python -m diff_fastener_jax.train --config configs/<x>.py[:preset] --workdir DIR [--config.KEY=VALUE ...]

Example:
  python -m diff_fastener_jax.train --config configs/demo.py --workdir runs/demo
  python -m diff_fastener_jax.train --config configs/default.py:mvtec --workdir runs/bottle \
      --config.data.root=/data/mvtec --config.data.category=bottle

Re-running the same command resumes from the latest checkpoint in `<workdir>/checkpoints` (a run
killed at any moment resumes to the same result bit for bit). Nothing is written to the workdir
until the config, the data folders and every listed image have been checked.
Multi-host: launched by SLURM (`launch/slurm.sbatch`) the processes find each other from the SLURM
environment; or pass --coordinator_address/--num_processes/--process_id explicitly.
"""

from __future__ import annotations

from absl import flags, logging

from diff_fastener_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """This command's flags (defined only when it runs, so importing the module defines none)."""
    cli.define_config("file")
    flags.DEFINE_string("workdir", None, "run folder (checkpoints, metrics.jsonl, config.json)")
    flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index")


def main(argv) -> int:
    # Here, not at the top: without JAX the command ends with cli.run's one error line.
    from diff_fastener_jax.training.loop import initialize_distributed, train_and_evaluate

    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; our progress goes to stdout
    initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    train_and_evaluate(cli.get_config(), FLAGS.workdir)
    return 0


if __name__ == "__main__":
    cli.run(main, __doc__, define_flags=define_flags, required=("config", "workdir"))
