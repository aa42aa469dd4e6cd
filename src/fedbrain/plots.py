"""evaluate's figures: confusion matrix, ROC, training curves, segmentation overlays, Dice per site,
federated rounds, privacy vs utility, membership-inference ROC, per-hospital scores of personalized and
global models. Each takes what it draws and a path, writes a PNG and returns the path (None when there
is nothing to draw).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedbrain.dataset import Split
from fedbrain.privacy import audit as membership_audit


def figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    return Figure(figsize=(width, height), layout="constrained")


def save(fig, path: Path) -> Path:
    """Through a temporary file renamed into place: a failure leaves no half-written PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], title: str, path: Path) -> Path:
    matrix = np.asarray(matrix)
    fig = figure(1.6 + 1.1 * len(classes), 1.2 + 1.0 * len(classes))
    ax = fig.subplots()
    rows = matrix.sum(axis=1, keepdims=True)
    shares = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, f"{count}\n{shares[i, j]:.0%}", ha="center", va="center", fontsize=8,
                color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="share of true class")
    return save(fig, path)


def plot_roc(y_true: np.ndarray, proba: np.ndarray, classes: list[str], title: str, path: Path) -> Path:
    from sklearn.metrics import auc, roc_curve

    fig = figure(5, 4.5)
    ax = fig.subplots()
    for k, name in enumerate(classes):
        positives = y_true == k
        if 0 < positives.sum() < len(y_true):
            fpr, tpr, _ = roc_curve(positives, proba[:, k])
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    return save(fig, path)


def plot_history(history: dict[str, list[float]], title: str, path: Path) -> Path | None:
    """Loss and the task metric, train vs val, per epoch (or round)."""
    panels = [k for k in ("loss", "accuracy", "dice") if k in history or f"val_{k}" in history]
    if not panels:
        return None
    fig = figure(4.2 * len(panels), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, key in zip(axes, panels):
        for name, style in ((key, "-"), (f"val_{key}", "--")):
            if name in history:
                ax.plot(range(1, len(history[name]) + 1), history[name], style, label=name)
        ax.set_xlabel("epoch / round")
        ax.set_title(key)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)


def plot_overlays(split: Split, proba: np.ndarray, threshold: float, count: int, title: str, path: Path) -> Path | None:
    """Test slices with tumour: truth outlined in green, prediction in red (largest tumours first)."""
    areas = split.masks[..., 0].sum(axis=(1, 2))
    picks = [i for i in np.argsort(-areas, kind="stable") if areas[i] > 0][:count]
    if not picks:
        return None
    fig = figure(2.4 * len(picks), 2.8)
    axes = np.atleast_1d(fig.subplots(1, len(picks)))
    for ax, i in zip(axes, picks):
        image = split.images[i]
        # FLAIR is the middle channel of the TCGA/LGG layout; otherwise show the first channel.
        ax.imshow(image[..., 1 if image.shape[-1] == 3 else 0], cmap="gray")
        ax.contour(split.masks[i, ..., 0], levels=[0.5], colors="lime", linewidths=0.8)
        if (proba[i, ..., 0] > threshold).any():
            ax.contour(proba[i, ..., 0], levels=[threshold], colors="red", linewidths=0.8)
        ax.set_title(str(split.image_ids[i])[-24:], fontsize=7)
        ax.axis("off")
    fig.suptitle(f"{title}: truth green, prediction red", fontsize=9)
    return save(fig, path)


def _kept_epoch(history: dict[str, list[float]]) -> int:
    """The epoch whose weights training kept: the lowest val_loss (early stopping's monitor), else the last."""
    losses = history.get("val_loss") or []
    return int(np.argmin(losses)) if losses else len(next(iter(history.values()), [0])) - 1


def _run_label(result: dict, test_key: str) -> str:
    """'<run> (test 0.962)'; a missing score says so (0.0 is a score, not a missing one)."""
    score = result["metrics"].get(test_key)
    return f"{result['info']['run']} (test {'n/a' if score is None else f'{score:.3f}'})"


def plot_rounds(results: list[dict], task: str, path: Path) -> Path | None:
    """Federated runs' global validation score per round, each centralized run of the same task as a
    reference line (its score at the epoch it kept); test scores in the legend."""
    key = "accuracy" if task == "classification" else "dice"
    test_key = "accuracy" if task == "classification" else "dice_tumour_slices"
    runs = [r for r in results if r["info"]["task"] == task and (r["info"]["history"] or {}).get(f"val_{key}")]
    federated = [r for r in runs if r["info"]["training"] == "federated"]
    if not federated:
        return None
    fig = figure(6.4, 4.0)
    ax = fig.subplots()
    for r in federated:
        values = r["info"]["history"][f"val_{key}"]
        ax.plot(range(1, len(values) + 1), values, "o-", markersize=3,
                label=_run_label(r, test_key))
    for r in runs:
        if r["info"]["training"] == "centralized":
            history = r["info"]["history"]
            ax.axhline(history[f"val_{key}"][_kept_epoch(history)], linestyle="--", color="grey",
                       label=_run_label(r, test_key))
    ax.set_xlabel("round")
    ax.set_ylabel(f"global val_{key}")
    ax.set_title(f"{task}: federated per round vs centralized", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, path)


def plot_privacy_utility(rows: list[dict], path: Path) -> Path | None:
    """Test accuracy against epsilon: every DP classifier a point, every non-private one a
    horizontal reference line (epsilon infinite)."""
    classifiers = [r for r in rows if r["task"] == "classification" and r["accuracy"] is not None]
    private = [r for r in classifiers if r["epsilon"] is not None]
    if not private:
        return None
    fig = figure(6.0, 4.0)
    ax = fig.subplots()
    for r in private:
        ax.plot(r["epsilon"], r["accuracy"], "o", label=f"{r['run']} (epsilon {r['epsilon']:.2f}, delta {r['delta']:.0e})")
    for r in classifiers:
        if r["epsilon"] is None:
            ax.axhline(r["accuracy"], linestyle="--", color="grey", linewidth=1)
            ax.annotate(f"{r['run']} (no DP)", (0.01, r["accuracy"]), xycoords=("axes fraction", "data"), fontsize=7)
    ax.set_xlabel("epsilon (largest hospital's, at its delta)")
    ax.set_ylabel("test accuracy")
    ax.set_title("privacy vs utility", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, path)


def plot_membership_roc(results: list[dict], path: Path) -> Path | None:
    """Every audited classifier's membership ROC on log-log axes (Carlini et al. 2022: what matters is
    the TPR at a low FPR), each attack; a DP model's ceiling min(1, e^epsilon FPR + delta) dashed."""
    audited = [r for r in results if (r.get("audit") or {}).get("status") == "audited"]
    if not audited:
        return None
    fig = figure(6.4, 5.0)
    ax = fig.subplots()
    floor = 0.5 / max(r["audit"]["nonmembers"] for r in audited)  # below the smallest FPR measurable
    grid = np.logspace(np.log10(floor), 0, 200)
    for k, r in enumerate(audited):
        colour, audit = f"C{k % 10}", r["audit"]
        for name, style in (("calibrated", "-"), ("loss", ":")):
            attack = audit["attacks"][name]
            fpr, tpr = attack["curve"]["fpr"], attack["curve"]["tpr"]
            ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), style, color=colour, linewidth=1.2,
                    label=f"{r['info']['run']} {name} (AUC {attack['auc']:.3f})")
        if audit["dp_ceiling"] is not None:
            epsilon, delta = r["info"]["epsilon"], r["info"]["delta"] or 0.0
            ax.plot(grid, [membership_audit.dp_tpr_ceiling(epsilon, delta, f) for f in grid], "--", color=colour,
                    linewidth=0.8, label=f"{r['info']['run']} DP ceiling (epsilon {epsilon:.2f})")
    ax.plot(grid, grid, "k-", linewidth=0.6, alpha=0.5, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel("false positive rate (non-members called members)")
    ax.set_ylabel("true positive rate (members found)")
    ax.set_title("membership inference: train members vs test non-members", fontsize=9)
    ax.legend(fontsize=6, loc="lower right")
    return save(fig, path)


def plot_dice_by_site(metrics: dict, title: str, path: Path) -> Path | None:
    """A segmenter's per-patient native-resolution Dice per institution: a bar per site (the mean), each
    patient a dot; after post-processing a second bar beside it when it was scored."""
    sites = metrics.get("per_site") or {}
    if not sites:
        return None
    patients = metrics.get("per_patient_native") or {}
    postprocessed = any(f.get("dice_native_postprocessed_mean") is not None for f in sites.values())
    names = list(sites)
    x = np.arange(len(names), dtype=float)
    width = 0.38 if postprocessed else 0.6
    fig = figure(1.8 + 1.0 * len(names), 3.8)
    ax = fig.subplots()
    bars = [("dice_native_mean", "dice", "raw", -width / 2 if postprocessed else 0.0)]
    if postprocessed:
        bars.append(("dice_native_postprocessed_mean", "dice_postprocessed", "post-processed", width / 2))
    for k, (mean_key, patient_key, label, offset) in enumerate(bars):
        means = [sites[s].get(mean_key) or 0.0 for s in names]
        ax.bar(x + offset, means, width, color=f"C{k}", alpha=0.6, label=f"{label} (mean)")
        for i, site in enumerate(names):
            values = [p[patient_key] for p in patients.values()
                      if p.get("site") == site and p.get(patient_key) is not None]
            ax.plot(np.full(len(values), x[i] + offset), values, "o", color=f"C{k}", markersize=3)
    ax.set_xticks(x, [f"{s}\n({sites[s]['patients']} patients)" for s in names])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice per patient")
    ax.set_title(f"{title}: Dice by institution ({metrics.get('dice_native_source')})", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, path)


def plot_personalization(panels: dict[str, dict[str, list[float | None]]], groups: list[str], title: str,
                         path: Path) -> Path | None:
    """Grouped bars, a panel per metric: a group per hospital's held-out test part (the last group the
    mean over hospitals), a bar per model in each (``panels[metric][model]``: one value per group; a
    missing score leaves its slot empty)."""
    if not panels or not any(panels.values()):
        return None
    models = list(dict.fromkeys(m for series in panels.values() for m in series))
    x = np.arange(len(groups), dtype=float)
    width = 0.8 / len(models)
    fig = figure(max(5.0, (1.0 + 0.22 * len(models)) * len(groups)) * len(panels), 4.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (metric, series) in zip(axes, panels.items()):
        for j, model in enumerate(models):  # the same colour for a model in every panel
            values = series.get(model, [None] * len(groups))
            bars = ax.bar(x - 0.4 + width * (j + 0.5), [np.nan if v is None else v for v in values], width,
                          color=f"C{j % 10}", label=model)
            # the value on each bar: a score of 0 is then told apart from a missing one
            ax.bar_label(bars, ["" if v is None else f"{v:.2f}" for v in values], fontsize=6, rotation=90,
                         padding=2)
        ax.axvline(len(groups) - 1.5, color="grey", linestyle=":", linewidth=0.8)  # the mean is no hospital
        ax.set_xticks(x, groups, fontsize=8)
        ax.set_ylim(0, 1.15)  # room for the label of a perfect score
        ax.set_ylabel(f"test {metric}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(models)), fontsize=7)
    fig.suptitle(title, fontsize=9)
    return save(fig, path)
