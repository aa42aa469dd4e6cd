"""Training curves as DVC data plots: one CSV per trained model under reports/curves/<task>/.

The PNG curves in reports/plots are for reading one run; these tables are for comparing: `dvc plots
diff HEAD~1` overlays the same model's curves from two commits or experiments, which images cannot.
A row is one epoch of a centralized model or one round of a federated one (`step`, 1-based, and
`unit` says which); the columns are the model's history as its card records it (loss, accuracy or
dice, their `val_` forms, epsilon where the run was private). A history whose series differ in
length (a metric logged from a later round on) is padded with empty cells at the start, so each value
stays at its own step. dvc.yaml plots every file of a task's folder by the fields in CURVE_FIELDS, and
DVC refuses a file without one of them: a model whose history lacks them gets no curve file.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

# What dvc.yaml's plots draw against `step`, per task folder (keep the two in step).
CURVE_FIELDS = {"classification": ("val_loss", "val_accuracy"), "segmentation": ("val_loss", "val_dice")}


def curve_rows(history: dict[str, list[float]]) -> list[dict]:
    series = {name: list(values) for name, values in sorted(history.items())
              if isinstance(values, list) and values
              and all(v is None or isinstance(v, (int, float)) for v in values)}
    steps = max((len(v) for v in series.values()), default=0)
    rows = []
    for i in range(steps):
        row = {"step": i + 1}
        for name, values in series.items():
            at = i - (steps - len(values))
            value = values[at] if at >= 0 else None
            row[name] = "" if value is None or not math.isfinite(value) else round(float(value), 6)
        rows.append(row)
    return rows


def write_curves(models: list[dict], out: Path) -> list[Path]:
    """out/<task>/<run with / as _>.csv for every model whose history has its task's CURVE_FIELDS
    (every task's folder is made, empty when no model of it has a curve);
    other CSVs there are removed (a model no longer trained leaves no stale curve). Each file is
    written whole or not at all."""
    for task in CURVE_FIELDS:  # a task without models still has its folder: DVC refuses a missing plot path
        (out / task).mkdir(parents=True, exist_ok=True)
    written = []
    for info in models:
        history = info.get("history") or {}
        fields = CURVE_FIELDS.get(info.get("task"))
        rows = curve_rows(history)
        if not rows or not fields or not all(field in rows[0] for field in fields):
            continue
        unit = "round" if info.get("training") == "federated" else "epoch"
        path = out / info["task"] / f"{info['run'].replace('/', '_')}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "unit", *[k for k in rows[0] if k != "step"]])
            writer.writeheader()
            writer.writerows({**row, "unit": unit} for row in rows)
        os.replace(tmp, path)
        written.append(path)
    for stale in set(out.glob("*/*.csv")) - set(written):
        stale.unlink()
    return written
