"""Which checkpoint a run keeps: the last step, or the best one on the validation split.

`train.select_on` names a validation metric (held-out normal images + synthetic anomalies, or, for
the `val_real_*` metrics, + the real defective images of `data.val_anomalies`; never the test set).
At every validation the step is offered; a step at least as good as the best so far (ties go
to the later, longer-trained step) becomes the selected one: training saves a checkpoint there (if the
step is not a checkpoint step anyway) and keeps it from pruning. At the end the detector is calibrated
with the selected step's parameters and `detector.json` records the step, so `evaluate`, `export`,
`predict` and the `Detector` API use it by default.

The choice survives a crash: `<workdir>/selection.json` holds every offered (step, value), written
atomically; on resume the entries after the restored checkpoint are dropped (those steps run again and
give the same values), so a resumed run selects exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import os

from diff_fastener_jax.config_schema import SELECT_METRICS, SELECT_ON
from diff_fastener_jax.training.checkpoint import atomic_write_json

SELECTION_FILE = "selection.json"


class Selection:
    """The validation history of one run and its best step under `metric` ('last': no selection)."""

    def __init__(self, metric: str = "last", history: list[dict] | None = None):
        if metric not in SELECT_ON:
            raise ValueError(f"train.select_on: unknown {metric!r}; choose one of {SELECT_ON}")
        self.metric = metric
        self.history: list[dict] = list(history or [])  # [{"step": int, "value": float}, ...], in step order

    @property
    def enabled(self) -> bool:
        return self.metric != "last"

    @property
    def mode(self) -> str | None:
        return SELECT_METRICS.get(self.metric)

    def _better_or_equal(self, value: float, best: float) -> bool:
        return value <= best if self.mode == "min" else value >= best

    @property
    def best(self) -> dict | None:
        """{"step", "value"} of the selected step so far, or None."""
        chosen = None
        for entry in self.history:
            if chosen is None or self._better_or_equal(entry["value"], chosen["value"]):
                chosen = entry
        return chosen

    @property
    def best_step(self) -> int | None:
        best = self.best
        return None if best is None else int(best["step"])

    def offer(self, step: int, val: dict) -> bool:
        """Records validation results `val` of `step`; True when `step` is now the selected step. A
        validation that lacks the metric (e.g. no masks) is not a candidate."""
        if not self.enabled or self.metric not in val:
            return False
        self.history = [e for e in self.history if e["step"] < step]  # a step validated again replaces itself
        self.history.append({"step": int(step), "value": float(val[self.metric])})
        return self.best_step == step

    def record(self, final_step: int) -> dict:
        """What detector.json stores about the choice."""
        if not self.enabled:
            return {"select_on": "last", "step": int(final_step)}
        best = self.best
        return {
            "select_on": self.metric,
            "mode": self.mode,
            "step": int(best["step"]) if best else int(final_step),
            "value": None if best is None else best["value"],
            "history": self.history,
        }

    # persistence -------------------------------------------------------------------------------------
    @classmethod
    def load(cls, workdir: str, metric: str, upto: int) -> Selection:
        """The run's history up to (and including) the restored step `upto`; empty for a fresh run or
        when the metric changed (the earlier values measured something else)."""
        path = os.path.join(workdir, SELECTION_FILE)
        if not os.path.isfile(path) or metric == "last":
            return cls(metric)
        with open(path) as f:
            saved = json.load(f)
        if saved.get("select_on") != metric:
            return cls(metric)
        return cls(metric, [e for e in saved.get("history", []) if e["step"] <= upto])

    def save(self, workdir: str) -> None:
        atomic_write_json(
            os.path.join(workdir, SELECTION_FILE),
            {"select_on": self.metric, "mode": self.mode, "history": self.history},
        )
