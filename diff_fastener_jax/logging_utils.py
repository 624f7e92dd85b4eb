"""Console progress, JSON-lines metrics and optional TensorBoard scalars (only process 0 writes)."""

from __future__ import annotations

import json
import math
import os
import sys
import time


def format_seconds(s: float) -> str:
    """12345 -> '3h25m45s'."""
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class ProgressBar:
    """A tqdm bar on a terminal; plain lines (at most one per `every_s` seconds, and the last) otherwise.

    bar = ProgressBar(total, "images"); bar.update(n); ...; bar.close()
    """

    def __init__(
        self,
        total: int,
        label: str = "images",
        *,
        initial: int = 0,
        file=None,
        every_s: float = 10.0,
        disable: bool = False,
    ):
        self.total, self.label, self.n = int(total), label, int(initial)
        self.file = sys.stderr if file is None else file
        self.disable = disable
        self.every_s = every_s
        self._t0 = self._last = time.time()
        self._n0 = self.n
        self._tqdm = None
        if not disable and _is_terminal(self.file):
            from tqdm.auto import tqdm

            self._tqdm = tqdm(
                total=self.total, initial=self.n, unit=" " + label, file=self.file, dynamic_ncols=True, leave=True
            )

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.disable:
            return
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        now = time.time()
        if self.n >= self.total or now - self._last >= self.every_s:
            self._last = now
            rate = (self.n - self._n0) / max(now - self._t0, 1e-9)
            print(f"{self.n}/{self.total} {self.label} ({rate:.1f}/s)", file=self.file, flush=True)

    def write(self, line: str) -> None:
        """Prints `line` without breaking the bar."""
        if self._tqdm is not None:
            self._tqdm.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None


def _is_terminal(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


class MetricsWriter:
    """Appends one JSON object per line to `<workdir>/metrics.jsonl` and echoes a short console line.

    `start_progress(total, initial)` adds a step bar on a terminal (console lines print above it).
    """

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", quiet: bool = False):
        import jax  # here, not at the top: ProgressBar serves the JAX-free predict command too

        self.is_writer = jax.process_index() == 0
        self.path = os.path.join(workdir, filename)
        self.quiet = quiet
        self._tb = None
        self._bar: ProgressBar | None = None

    def enable_tensorboard(self, logdir: str) -> None:
        """TensorBoard scalars through tensorboardX (no TensorFlow needed; the `tensorboard` extra)."""
        if not self.is_writer:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError as e:
            print(
                f"[warn] train.tensorboard=True but tensorboardX is not installed ({e}); JSON lines only. "
                f"Install it with: pip install 'diff-fastener-jax[tensorboard]'",
                file=sys.stderr,
            )
            return
        self._tb = SummaryWriter(logdir)

    def start_progress(self, total: int, initial: int = 0) -> None:
        """A bar over training steps when stdout is a terminal (log lines stay the same otherwise)."""
        if self.is_writer and not self.quiet and _is_terminal(sys.stdout):
            self._bar = ProgressBar(total, "steps", initial=initial, file=sys.stdout)

    def resume_at(self, step: int) -> None:
        """Makes the file what it was at checkpoint `step`, before a resumed (or restarted, step 0) run
        writes again: drops every record of a later step (those steps are redone), the events that the
        run writes again ("start"/"resume"/"auto" at `step`, "selected", "done") and a torn last line."""
        if not self.is_writer or not os.path.isfile(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the crash
                    continue
                at = record.get("step")
                later = isinstance(at, (int, float)) and at > step
                rewritten = record.get("event") in ("selected", "done") or (
                    record.get("event") in ("start", "resume", "auto") and at == step
                )
                if line.endswith("\n") and not later and not rewritten:
                    kept.append(line)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, record: dict, console: str | None = None) -> None:
        if not self.is_writer:
            return
        record = {"time": time.time(), **{k: _plain(v) for k, v in record.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON: non-finite values are null
        if self._tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self._tb.add_scalar(k, v, record["step"])
        if self._bar is not None and "step" in record and record["step"] > self._bar.n:
            self._bar.update(record["step"] - self._bar.n)
        if console and not self.quiet:
            if self._bar is not None:
                self._bar.write(console)
            else:
                print(console, flush=True)

    def close(self) -> None:
        """Ends the bar and flushes TensorBoard."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(v):
    """A numpy/JAX scalar as a Python one; NaN and infinities as None (JSON has no such numbers)."""
    try:
        v = v.item()
    except AttributeError:
        pass
    return None if isinstance(v, float) and not math.isfinite(v) else v
