"""Console progress and JSON-lines metrics (only process 0 writes)."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax


def format_seconds(s: float) -> str:
    """12345 -> '3h25m45s'."""
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class MetricsWriter:
    """Appends one JSON object per line to `<workdir>/metrics.jsonl` and echoes a short console line."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", quiet: bool = False):
        self.is_writer = jax.process_index() == 0
        self.path = os.path.join(workdir, filename)
        self.quiet = quiet
        self._tb = None

    def enable_tensorboard(self, logdir: str) -> None:
        """Optional TensorBoard scalars (needs the `tensorboardX` or `tensorflow` package)."""
        if not self.is_writer:
            return
        try:
            from flax.metrics import tensorboard  # imports tensorflow lazily
            self._tb = tensorboard.SummaryWriter(logdir)
        except Exception as e:  # noqa: BLE001 - optional dependency
            print(f"[warn] train.tensorboard=True but TensorBoard is unavailable ({e}); JSON lines only",
                  file=sys.stderr)

    def write(self, record: dict, console: str | None = None) -> None:
        if not self.is_writer:
            return
        record = {"time": time.time(), **{k: _plain(v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._tb.scalar(k, v, record["step"])
        if console and not self.quiet:
            print(console, flush=True)


def _plain(v):
    try:
        return v.item()
    except AttributeError:
        return v
