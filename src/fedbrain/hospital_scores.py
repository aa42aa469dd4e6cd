"""Every model on each hospital's own held-out test part: the personalization table of `evaluate`.

The partition deals the common test split into one test part per hospital (its `test_hospital`); a
model's scores there come from the predictions evaluate already made on the common split (the parts
are subsets of it: nothing is predicted again). One row per hospital, a column per global model and
one per variant's personalized models (`<variant> (own hospital's model)`: hospital k's row holds
hospital k's own model), and the mean over hospitals. evaluate writes it as personalization.csv/.md
and plots it (fedbrain.plots.plot_personalization).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fedbrain import segmentation_scores as scores
from fedbrain.dataset import HOSPITAL_FOLDER, Split
from fedbrain.segmentation_scores import defined_mean

# The personalization table (personalization.csv/.md): per task, the scores of each hospital's test part;
# a column per global model (its run name) and per variant's personalized models (OWN_MODEL).
# Per task, the metrics of each hospital's test part (a block of rows each).
HOSPITAL_METRICS = {"classification": ("accuracy", "macro_f1"), "segmentation": ("dice_tumour_slices",)}
OWN_MODEL = " (own hospital's model)"  # suffix of a variant's personalized column: row k holds hospital k's model
MEAN_ROW = "mean over hospitals"

def cell(value) -> str:
    """A markdown table cell: empty for a missing value, 4 decimals for a float."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.1e}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"  # a delta reads 1.0e-05
    return str(value)


def hospital_scores(task: str, test: Split, proba: np.ndarray, parts: dict[int, np.ndarray],
                    threshold: float = 0.5) -> dict[str, dict]:
    """A model's scores on each hospital's held-out test part, {"<k>": {...}}: the parts are subsets of
    the common test split, so its rows of the predictions already made are scored, nothing is predicted
    again. Classification: accuracy and macro F1 (over the classes in the part or predicted, as in
    `classification_metrics`); segmentation: mean Dice over the part's slices with tumour."""
    from sklearn.metrics import accuracy_score, f1_score

    scored = {}
    if task == "classification":
        predicted = np.asarray(proba).argmax(axis=1)
        for k, rows in parts.items():
            truth, guess = test.labels[rows], predicted[rows]
            scored[str(k)] = {"test_images": len(rows), "accuracy": float(accuracy_score(truth, guess)),
                              "macro_f1": float(f1_score(truth, guess, average="macro", zero_division=0))}
        return scored
    truth = np.asarray(test.masks)[..., 0] > 0
    prediction = np.asarray(proba)[..., 0] > threshold
    for k, rows in parts.items():
        tumour = [i for i in rows if truth[i].any()]
        scored[str(k)] = {"test_images": len(rows), "tumour_slices": len(tumour),
                          "dice_tumour_slices": defined_mean(scores.dice(truth[i], prediction[i]) for i in tumour)}
    return scored


def _variant(run: str) -> str:
    """evaluate's run name without the role: "federated/fedbn/classifier" -> "federated/fedbn"."""
    return run.rsplit("/", 1)[0] if "/" in run else run


def _own_column(info: dict) -> str:
    """A hospital's own model's column: its variant's personalized column ("federated/fedbn/hospital_0/
    classifier" -> "federated/fedbn (own hospital's model)"), where row k holds hospital k's model."""
    folders = [part for part in info["run"].split("/")[:-1] if not HOSPITAL_FOLDER.fullmatch(part)]
    return "/".join(folders) + OWN_MODEL


def _columns(results: list[dict]) -> dict[str, dict]:
    """{column: {hospital: result}} in table order (a global model, under the key None for every
    hospital, by its run name): the global models in evaluate's order, each variant's personalized
    column right after its global model, so the two read side by side."""
    own: dict[str, dict] = {}
    for result in results:
        if result["info"]["hospital"] is not None:
            own.setdefault(_own_column(result["info"]), {})[result["info"]["hospital"]] = result
    columns: dict[str, dict] = {}
    for result in results:
        if result["info"]["hospital"] is None:
            columns[result["info"]["run"]] = {None: result}
            if (personalized := _variant(result["info"]["run"]) + OWN_MODEL) in own:
                columns[personalized] = own.pop(personalized)
    return {**columns, **own}  # personalized models whose variant has no global model last


def _hospital_score(sources: dict, hospital: int, metric: str) -> float | None:
    """One cell: a column's model for ``hospital`` scored on that hospital's test part."""
    result = sources.get(hospital, sources.get(None))  # the hospital's own model, else the global one
    if result is None:
        return None
    return (result["metrics"].get("by_hospital") or {}).get(str(hospital), {}).get(metric)


def personalization_table(results: list[dict], parts: dict[int, np.ndarray] | None) -> pd.DataFrame | None:
    """Per task and metric (`HOSPITAL_METRICS`), one row per hospital with a test part (its images, then a
    column per model: `_columns`) and a row of the mean over hospitals (unweighted: each hospital counts
    once, as each federated hospital would judge its model). None with fewer than two test parts: nothing
    to compare across hospitals."""
    if not parts or len(parts) < 2:
        return None
    rows, names = [], []
    for task, metrics in HOSPITAL_METRICS.items():
        columns = _columns([r for r in results if r["info"]["task"] == task and "by_hospital" in r["metrics"]])
        if not columns:
            continue
        names += [c for c in columns if c not in names]
        for metric in metrics:
            cells = {k: {c: _hospital_score(sources, k, metric) for c, sources in columns.items()} for k in parts}
            rows += [{"task": task, "metric": metric, "hospital": k, "test_images": len(parts[k]), **cells[k]}
                     for k in parts]
            rows.append({"task": task, "metric": metric, "hospital": MEAN_ROW,
                         "test_images": sum(len(rows_k) for rows_k in parts.values()),
                         **{c: defined_mean(cells[k][c] for k in parts) for c in columns}})
    return pd.DataFrame(rows, columns=["task", "metric", "hospital", "test_images", *names]) if rows else None


def blocks(table: pd.DataFrame):
    """(task, metric, its rows, its model columns with a value) per block of the personalization table."""
    for (task, metric), block in table.groupby(["task", "metric"], sort=False):
        yield task, metric, block, [c for c in table.columns[4:] if block[c].notna().any()]


def personalization_markdown(table: pd.DataFrame) -> str:
    lines = ["# Per-hospital test scores: personalized and global models", "",
             "Each hospital's held-out test part (the partition's `test_hospital`; together the parts are the "
             "common test split) scored by every global model (a column per run) and by the hospitals' "
             f"own personalized models (`<variant>{OWN_MODEL}`: hospital k's row holds hospital k's model). "
             f"`{MEAN_ROW}`: the unweighted mean of the hospitals' scores (of those with one). Segmentation: "
             "mean Dice over the part's slices with tumour."]
    for task, metric, block, models in blocks(table):
        columns = ["hospital", "test_images", *models]
        lines += ["", f"## {task}: {metric}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for _, row in block.iterrows()]
    return "\n".join(lines) + "\n"
