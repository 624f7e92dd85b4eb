"""The files evaluate and predict write for other programs to read: strict JSON and one scores.csv layout.

metrics.json is strict JSON (a metric that is undefined, e.g. pixel AUROC without masks, is null, never
NaN or Infinity). scores.csv has the same columns in both commands (predict leaves `defect` and
`true_label` empty); `path` is relative to the input root (evaluate: data.root; predict: the --images
folder), so two files named img.png in different folders stay apart.
"""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np

SCORE_COLUMNS = ("path", "category", "defect", "true_label", "predicted_label", "score", "threshold", "denoise_step")


def strict_json(x):
    """`x` with numpy values as Python ones and every non-finite float as None (JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    if isinstance(x, np.ndarray):
        return strict_json(x.tolist())
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: str, obj) -> None:
    """Strict JSON (`strict_json`), written atomically (a crash never leaves half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(strict_json(obj), f, indent=2, allow_nan=False)
    os.replace(tmp, path)


def relative_path(path: str, root: str | None) -> str:
    """`path` relative to `root` with '/' separators; the absolute path when it lies outside `root`."""
    full = os.path.abspath(path)
    if root:
        rel = os.path.relpath(full, os.path.abspath(root))
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
            return rel.replace(os.sep, "/")
    return full


class ScoresWriter:
    """scores.csv, one row per image, written as images are scored (a context manager)."""

    def __init__(self, path: str):
        self._file = open(path, "w", newline="")
        self._rows = csv.writer(self._file)
        self._rows.writerow(SCORE_COLUMNS)

    def row(
        self,
        path: str,
        category: str,
        defect: str,
        true_label,
        predicted_label: bool,
        score: float,
        threshold: float,
        denoise_step: int,
    ) -> None:
        """`path` as it should appear (relative); `defect`, `true_label` '' where unknown."""
        self._rows.writerow(
            [
                path,
                category,
                defect,
                "" if true_label is None else int(true_label),
                int(predicted_label),
                f"{float(score):.6f}",
                f"{float(threshold):.6f}",
                int(denoise_step),
            ]
        )

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
