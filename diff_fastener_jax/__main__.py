"""`python -m diff_fastener_jax`: the commands, and what this host gives them (`--json`: one JSON line)."""

import json
import sys

from diff_fastener_jax import __version__
from diff_fastener_jax.perf import hostenv

COMMANDS = {
    "train": "train a detector: --config configs/<x>.py --workdir runs/<name>",
    "evaluate": "image/pixel AUROC, AUPRO and report.html of a trained run",
    "predict": "anomaly maps and verdicts for a folder of images",
    "export": "a trained run as a self-contained folder (StableHLO, ONNX, parameters)",
    "serve": "an HTTP service around an exported model",
    "benchmark": "speed, FLOPs and planned memory of the train step and inference",
    "crossval": "the paper's k-fold protocol over the normal images",
    "models": "parameter counts and FLOPs of a config's networks",
}


def main(argv: list[str]) -> int:
    host = hostenv.host_setup()
    if "--json" in argv:
        print(json.dumps({"version": __version__, "commands": sorted(COMMANDS), "host": host}))
        return 0
    print(f"diff_fastener_jax {__version__}: one-step norm-guided diffusion anomaly detection\n")
    print("commands (python -m diff_fastener_jax.<command> --help for each):")
    for name, what in COMMANDS.items():
        print(f"  {name:<10} {what}")
    print(f"\nhost: {host['libc'] or 'not glibc'}, transparent huge pages '{host['thp_mode']}', "
          f"malloc huge pages {'on' if host['malloc_hugepages'] else 'off'} (DFJ_HUGEPAGES=0 turns them off)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
