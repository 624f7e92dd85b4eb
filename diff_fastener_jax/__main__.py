"""`diff-fastener <command> [flags]` (or `python -m diff_fastener_jax <command>`): every command in one
console program. `python -m diff_fastener_jax.<command>` runs the same command with the same flags.

  diff-fastener                     the commands, one line each, and what this host gives them
  diff-fastener --version
  diff-fastener --json              the same as one JSON line
  diff-fastener <command> --help    that command's flags (help <command> too)

Listing the commands imports no JAX: a command's module, and JAX with it, loads once it is chosen.
"""

import json
import runpy
import sys

from diff_fastener_jax.perf import hostenv
from diff_fastener_jax.version import __version__

COMMANDS = {
    "train": "train a detector: --config configs/<x>.py --workdir runs/<name>",
    "evaluate": "image/pixel AUROC, AUPRO and report.html of a trained run",
    "predict": "anomaly maps and verdicts for a folder of images",
    "export": "a trained run as a self-contained folder (StableHLO, ONNX, OpenVINO, parameters)",
    "serve": "an HTTP service around an exported model",
    "benchmark": "speed, FLOPs and planned memory of the train step and inference",
    "crossval": "the paper's k-fold protocol over the normal images",
    "models": "parameter counts and FLOPs of a config's networks",
}
CONSOLE_PROGRAM = hostenv.CONSOLE_SCRIPT
_HELP = ("-h", "--help", "-help", "help")


def run_command(name: str, args: list[str], program: str) -> None:
    """Runs `python -m diff_fastener_jax.<name> args...` in this process, its usage line naming
    `program name`; exits with the command's status."""
    from diff_fastener_jax import cli

    cli.PROGRAM_NAME = f"{program} {name}"
    sys.argv = [sys.argv[0], *args]
    # cli.run ends a missing training stack as one error line; this covers the `models` package too,
    # whose import needs JAX before its command starts.
    with cli.needs_training_stack():
        runpy.run_module(f"diff_fastener_jax.{name}", run_name="__main__", alter_sys=True)


def dispatch(argv: list[str], program: str) -> int:
    """`program [--version | --json | --help | <command> [flags]]`."""
    if argv and argv[0] in ("--version", "-V"):
        print(f"{program} (diff_fastener_jax) {__version__}")
        return 0
    if argv and argv[0] == "help" and len(argv) > 1:  # help <command>
        argv = [argv[1], "--help"]
    if not argv or argv[0] in _HELP or argv[0] == "--json":
        return main(argv, program)
    if argv[0] not in COMMANDS:
        import difflib

        from diff_fastener_jax import cli

        close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
        cli.fail(
            f"unknown command {argv[0]!r}",
            (f"did you mean {close[0]!r}? " if close else "") + f"{program} --help lists the commands",
        )
    run_command(argv[0], argv[1:], program)
    return 0


def console_main() -> int:
    """The `diff-fastener` console script."""
    hostenv.reexec_with_hugepages()  # DFJ_HUGEPAGES=1 only
    return dispatch(sys.argv[1:], CONSOLE_PROGRAM)


def main(argv: list[str], program: str = "python -m diff_fastener_jax") -> int:
    """The listing of the commands and the host facts (`--json`: as one JSON line)."""
    host = hostenv.host_setup()
    if "--json" in argv:
        print(json.dumps({"version": __version__, "commands": sorted(COMMANDS), "host": host}))
        return 0
    print(f"diff_fastener_jax {__version__}: one-step norm-guided diffusion anomaly detection\n")
    print(f"usage: {program} <command> [flags]    ({program} <command> --help for each)\n")
    print("commands:")
    for name, what in COMMANDS.items():
        print(f"  {name:<10} {what}")
    print(
        f"\nhost: {host['libc'] or 'not glibc'}, transparent huge pages '{host['thp_mode']}', "
        f"malloc huge pages {'on' if host['malloc_hugepages'] else 'off'} "
        f"(DFJ_HUGEPAGES=1 turns them on)"
    )
    return 0


if __name__ == "__main__":
    hostenv.reexec_with_hugepages()  # DFJ_HUGEPAGES=1 only
    sys.exit(dispatch(sys.argv[1:], "python -m diff_fastener_jax"))
