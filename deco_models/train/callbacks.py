"""Training-log callback: one CSV row per logging step (loss, learning rates, grad norm, throughput)."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from transformers import TrainerCallback

CSV_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "learning_rate",
    "projector_lr",
    "grad_norm",
    "step_time_s",
    "samples_per_second",
    "tokens_per_second",
)


class CSVLoggerCallback(TrainerCallback):
    """Append the Trainer's per-step logs to ``path`` (columns :data:`CSV_COLUMNS`; missing values left empty).

    On resume, rows after the resumed step (written by the killed run past its last checkpoint) are dropped first,
    so the file reads as one uninterrupted run. Only the main process writes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        resumed_step = int(state.global_step or 0)
        rows = []
        if self.path.is_file() and resumed_step > 0:
            with open(self.path, newline="", encoding="utf-8") as handle:
                rows = [r for r in csv.DictReader(handle) if r.get("step") and int(r["step"]) <= resumed_step]
        with open(self.path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in CSV_COLUMNS})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return  # the end-of-training summary (train_runtime, ...) has no per-step loss
        row = {"step": state.global_step, **{k: logs.get(k, "") for k in CSV_COLUMNS if k != "step"}}
        for key, value in row.items():
            if isinstance(value, float) and not math.isfinite(value):
                row[key] = str(value)
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=CSV_COLUMNS).writerow(row)
            handle.flush()


def read_log(path: str | os.PathLike) -> dict[str, list[float]]:
    """Read a CSV written by :class:`CSVLoggerCallback` into columns of floats (empty cells become NaN).

    >>> import tempfile; p = tempfile.mktemp(suffix=".csv")
    >>> _ = open(p, "w").write("step,loss\\n1,2.5\\n2,\\n")
    >>> read_log(p)
    {'step': [1.0, 2.0], 'loss': [2.5, nan]}
    """
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return {}
    columns: dict[str, list[float]] = {key: [] for key in rows[0]}
    for row in rows:
        for key in columns:
            value = row.get(key, "")
            try:
                columns[key].append(float(value) if value not in ("", None) else float("nan"))
            except ValueError:
                columns[key].append(float("nan"))
    return columns
