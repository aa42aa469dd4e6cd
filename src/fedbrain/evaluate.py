"""evaluate: every trained model on the same held-out test split; metrics, plots, one comparison table.

Models are found generically: every ``*.keras`` under ``models/`` (``centralized/classifier.keras``,
``federated/<variant>/classifier.keras``, ...) with its card ``<name>.json`` written by
``fedbrain.train.save_model`` (task, training, privacy, epsilon, MLflow run id, history).
A model without a card is still evaluated; what the card would say is inferred from its path
and output shape.

Writes, under ``out`` (``reports/``):
  headline/<run>.json the headline figures of each run (``HEADLINE``, and epsilon for a DP run): the DVC
                      metrics, one row per run in ``dvc metrics show``
  metrics.json        every scalar test metric per run (what each run's MLflow record holds)
  evaluation.json     the details: per-class scores, confusion matrices, per-patient Dice/HD95 (also at the
                      images' native resolution, and per site: fedbrain.segmentation_scores)
  comparison.csv/.md  one row per model/run: centralized and every federated variant side by side
  plots/<run>/*.png   confusion matrix, ROC curves, training curves, segmentation overlays, Dice per site
                      (fedbrain.plots),
                      a classifier's reliability diagram and Grad-CAM gallery (fedbrain.reliability,
                      fedbrain.explain): DVC plots
  plots/membership_roc.png  the membership-inference audit of every classifier (fedbrain.privacy.audit)
  curves/<task>/<run>.csv   validation curves per epoch or round as DVC data plots (fedbrain.curves)
  personalization.csv/.md   when 2+ hospitals have a held-out test part (the partition's test_hospital):
                      every model on each hospital's part, a hospital's own personalized model beside the
                      global ones, one row per hospital and the mean over hospitals (each model's scores
                      are also its ``by_hospital`` in evaluation.json; fedbrain.hospital_scores)
  plots/personalization_<task>.png  the same as grouped bars

A hospital's personalized model (``federated/<variant>/hospital_<k>/<role>.keras``, its card saying
``personalization`` and ``hospital``) is evaluated like every model on the common test split, but is
never registered (a hospital's own model is not the consortium's champion) and its MLflow evaluation is
a run of its own, tagged with its personalization and hospital.

Every classifier is also attacked: members (a seeded sample of the partition's train rows) against
as many test images it never trained on; the ``mia_*`` columns and metrics say how well an attacker
tells them apart, and for a DP model whether that beats what its (epsilon, delta) allows.

Every classifier's probabilities are checked too (``fedbrain.reliability``): expected calibration
error and Brier score as they are and after temperature scaling, with the temperature of the model's
card, or, for a card without one, fitted here on the validation split (``temperature_source`` says
which). The temperature changes no predicted class: accuracy and F1 are the unscaled model's.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedbrain import explain, reliability
from fedbrain import segmentation_scores as scores
from fedbrain import test_time
from fedbrain.config import get
from fedbrain.curves import write_curves
from fedbrain.dataset import HOSPITAL_FOLDER, Split, hospital_test_parts, load_classes, load_split, write_text_atomic
from fedbrain.errors import InputError
from fedbrain.hospital_scores import (MEAN_ROW, blocks, cell, hospital_scores,
                                      personalization_markdown, personalization_table)
from fedbrain.plots import (plot_confusion_matrix, plot_dice_by_site, plot_history, plot_membership_roc,
                            plot_overlays, plot_personalization, plot_privacy_utility, plot_roc, plot_rounds)
from fedbrain.privacy import audit as membership_audit
from fedbrain.segmentation_scores import defined_mean, dice_hd95

# mia_*: the membership-inference audit; mia_auc and the TPRs are the stronger attack's (the larger).
MIA_COLUMNS = ["mia_status", "mia_auc", "mia_loss_auc", "mia_tpr_at_1pct_fpr", "mia_tpr_at_0_1pct_fpr",
               "mia_accuracy_gap", "mia_exceeds_dp_bound"]
# reports/headline/<run>.json, the DVC metrics: `dvc metrics show` makes one column per name (a row
# per run), so the table stays this wide however many runs there are. The rest is in metrics.json.
HEADLINE = {"classification": ("test_accuracy", "test_macro_f1", "test_roc_auc", "test_ece_calibrated", "mia_auc"),
            "segmentation": ("test_dice", "test_dice_tumour_slices", "test_hd95", "test_dice_native_mean")}
HEADLINE_PRIVACY = ("epsilon",)
RELIABILITY_COLUMNS = ["ece", "ece_calibrated", "brier", "brier_calibrated", "temperature", "temperature_source"]
COMPARISON_COLUMNS = ["run", "training", "model", "task", "privacy", "epsilon", "delta", "aggregation",
                      "personalization", "accuracy",
                      "macro_f1", "roc_auc", *RELIABILITY_COLUMNS, "dice", "hd95", "dice_tumour_slices",
                      *scores.COMPARISON_COLUMNS, "test_images",
                      "train_time_s", "round_time_s", "mb_per_round", *MIA_COLUMNS, "run_id"]
IN_EVALUATE = "fitted on validation split in evaluate"

# --------------------------------------------------------------------------- classification

def classification_metrics(y_true: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, per-class and macro precision/recall/F1, one-vs-rest ROC-AUC, confusion matrix.

    Macro averages run over the classes present in the truth or the predictions (scikit-learn's
    default), so a class absent from a small test set does not count as a zero. ROC-AUC is
    defined only for a class with both positives and negatives in the truth; the macro AUC
    averages the defined ones and ``roc_auc_classes`` says how many that was.
    """
    from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support,
                                 roc_auc_score)

    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    labels = list(range(len(classes)))
    y_pred = proba.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0)
    macro_p, macro_r, macro_f1, _ = precision_recall_fscore_support(y_true, y_pred, average="macro",
                                                                    zero_division=0)
    per_class, aucs = {}, []
    for k, name in enumerate(classes):
        positives = y_true == k
        auc = None
        if 0 < positives.sum() < len(y_true):
            auc = float(roc_auc_score(positives, proba[:, k]))
            aucs.append(auc)
        per_class[name] = {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                           "support": int(support[k]), "roc_auc": auc}
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_precision": float(macro_p),
        "macro_recall": float(macro_r),
        "macro_f1": float(macro_f1),
        "roc_auc": float(np.mean(aucs)) if aucs else None,
        "roc_auc_classes": len(aucs),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


# --------------------------------------------------------------------------- segmentation

def segmentation_metrics(masks: np.ndarray, proba: np.ndarray, patient_ids: list, image_ids: list,
                         threshold: float = 0.5) -> dict:
    """Dice and HD95 per patient (slices stacked into a volume) and over tumour slices.

    ``dice``/``hd95``: means over patients (HD95 over the patients where it is defined);
    ``dice_tumour_slices``/``hd95_tumour_slices``: means over test slices whose truth has tumour.
    Images without a patient id are their own patient.
    """
    truth = np.asarray(masks)[..., 0] > 0
    prediction = np.asarray(proba)[..., 0] > threshold
    per_patient = {}
    for patient, rows in scores.patients(patient_ids, image_ids).items():
        # (slices, H, W) volume in slice order: HD95 measures distances across neighbouring slices too.
        dice, hd = dice_hd95(truth[rows], prediction[rows])
        per_patient[patient] = {"dice": dice, "hd95": hd, "slices": len(rows),
                                "tumour_slices": int(truth[rows].any(axis=(1, 2)).sum())}
    tumour = [i for i in range(len(truth)) if truth[i].any()]
    slice_scores = [dice_hd95(truth[i], prediction[i]) for i in tumour]
    return {
        "dice": defined_mean(p["dice"] for p in per_patient.values()),
        "hd95": defined_mean(p["hd95"] for p in per_patient.values()),
        "dice_tumour_slices": defined_mean(d for d, _ in slice_scores),
        "hd95_tumour_slices": defined_mean(h for _, h in slice_scores),
        "tumour_slices": len(tumour),
        "missed_tumour_slices": sum(1 for i in tumour if not prediction[i].any()),
        "false_positive_slices": int(sum(1 for i in range(len(truth)) if not truth[i].any() and prediction[i].any())),
        "per_patient": per_patient,
    }


def audit_report(run: str, audit: dict, epsilon: float | None, delta: float | None) -> list[str]:
    """Printed lines: the audit's numbers, a DP model's ceiling beside each TPR, a WARNING per excess."""
    if audit.get("status") != "audited":
        reason = f" ({audit['reason']})" if audit.get("reason") else ""
        return [f"membership audit {run}: {audit.get('status')}{reason}"]
    percent = {n: f"{100 * rate:g}%" for n, rate in membership_audit.FPRS.items()}
    aucs = ", ".join(f"{name} {a['auc']:.3f}" for name, a in audit["attacks"].items())
    tprs = []
    for n in membership_audit.FPRS:
        text = f"TPR at FPR <= {percent[n]} {audit[f'tpr_at_{n}_fpr']:.4f}"
        if audit["dp_ceiling"] is not None:
            text += f" (DP ceiling {audit['dp_ceiling'][n]:.4f})"
        tprs.append(text)
    lines = [f"membership audit {run}: {audit['members']} members vs {audit['nonmembers']} non-members; "
             f"AUC {aucs}; {'; '.join(tprs)}; accuracy members {audit['member_accuracy']:.3f}, "
             f"non-members {audit['nonmember_accuracy']:.3f} (gap {audit['accuracy_gap']:+.3f})"]
    if audit["violations"]:
        beaten = "; ".join(f"{name} attack TPR {tpr:.4f} at FPR <= {100 * rate:g}% > ceiling {ceiling:.4f}"
                           for name, rate, tpr, ceiling in audit["violations"])
        lines.append(f"WARNING: membership audit {run}: {beaten}: more than ({epsilon:.3g}, {delta or 0:.1e})-DP "
                     f"allows; the model leaks more than its epsilon claims, or the claim (accounting, card) is "
                     f"wrong (point estimates from {audit['members']} members and {audit['nonmembers']} non-members)")
    return lines


def federation_costs(card: dict) -> dict:
    """Median round wall time and MB moved per round of a federated run (its last round, which also
    drains the pipeline, left out when there are others)."""
    records = card.get("round_records") or []
    typical = records[:-1] or records
    if not typical:
        return {"round_time_s": None, "mb_per_round": None}
    return {"round_time_s": float(np.median([r["wall_time_s"] for r in typical])),
            "mb_per_round": float(np.median([(r["bytes_up"] + r["bytes_down"]) / 1e6 for r in typical]))}


# --------------------------------------------------------------------------- models

def discover(models: Path) -> list[Path]:
    """Every final model under ``models`` (not half-written temp files, not per-round checkpoints)."""
    models = Path(models)
    if not models.is_dir():
        raise InputError(f"{models}: no models folder; run train-centralized (or train-federated) first")
    found = sorted(p for p in models.rglob("*.keras")
                   if not p.name.startswith(".") and "checkpoints" not in p.relative_to(models).parts)
    if not found:
        raise InputError(f"{models}: no *.keras models found; run train-centralized (or train-federated) first")
    return found


def describe(path: Path, models: Path, model, card: dict) -> dict:
    """What a model is: from its card, else from where it lives and its output shape."""
    relative = path.relative_to(models).with_suffix("")
    parts = relative.parts
    training = card.get("training") or (parts[0] if len(parts) > 1 else "unknown")
    privacy = card.get("privacy") or (parts[1] if training == "federated" and len(parts) > 2 else "none")
    task = card.get("task") or ("segmentation" if len(model.output_shape) == 4 else "classification")
    history = card.get("history")
    if history is None and (path.parent / "history.json").is_file():
        history = json.loads((path.parent / "history.json").read_text()).get(path.stem)
    hospital = card.get("hospital")
    if hospital is None and training == "federated" and (folder := HOSPITAL_FOLDER.fullmatch(path.parent.name)):
        # A hospital's own model whose card is missing: still never registered as the consortium's.
        hospital = int(folder.group(1))
    personalization = card.get("personalization") or (None if hospital is None else "unknown")
    return {"run": relative.as_posix(), "training": training, "privacy": privacy, "task": task,
            "model": card.get("model") or model.name, "epsilon": card.get("epsilon"), "delta": card.get("delta"),
            "aggregation": card.get("aggregation", "fedavg" if training == "federated" else None),
            "personalization": personalization, "hospital": None if hospital is None else int(hospital),
            "run_id": card.get("run_id"), "train_time_s": card.get("train_time_s"), "history": history,
            "temperature": card.get("temperature"),
            "temperature_source": None if card.get("temperature") is None else "card",
            **federation_costs(card)}


def _clean(value):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _mia_cells(audit: dict) -> dict:
    """One model's ``MIA_COLUMNS`` (only the status for a skipped audit)."""
    loss = (audit.get("attacks") or {}).get("loss") or {}
    return {"mia_status": audit["status"], "mia_auc": audit.get("auc"), "mia_loss_auc": loss.get("auc"),
            **{f"mia_tpr_at_{n}_fpr": audit.get(f"tpr_at_{n}_fpr") for n in membership_audit.FPRS},
            "mia_accuracy_gap": audit.get("accuracy_gap"), "mia_exceeds_dp_bound": audit.get("exceeds_dp_bound")}


def _without_curves(audit: dict) -> dict:
    """An audit for evaluation.json: the ROC points (thousands per attack) stay in the plot, and the
    seconds it took stay out of a file that should change only when the results do."""
    audit = {k: v for k, v in audit.items() if k != "seconds"}
    if "attacks" not in audit:
        return audit
    return {**audit, "attacks": {name: {k: v for k, v in a.items() if k != "curve"}
                                 for name, a in audit["attacks"].items()}}


def run_scalars(info: dict, metrics: dict, audit: dict) -> dict:
    """A run's metrics.json entry (and its MLflow metrics): every defined scalar test metric as
    ``test_<name>``, a segmenter's per-site figures as ``test_site_<CODE>/<name>``, epsilon and delta for a
    DP run, a classifier's temperature, the audit's ``mia_*``."""
    flat = {f"test_{k}": v for k, v in {**metrics, **scores.site_scalars(metrics)}.items()
            if isinstance(v, (int, float)) or v is None}
    if info["epsilon"] is not None:
        flat.update(epsilon=info["epsilon"], delta=info["delta"])
    flat["temperature"] = info.get("temperature")
    flat.update(membership_audit.audit_scalars(audit))
    return {k: v for k, v in flat.items() if v is not None}


def headline(task: str, scalars: dict) -> dict:
    """A run's figures for ``dvc metrics show`` (epsilon only for a DP run)."""
    return {k: scalars[k] for k in (*HEADLINE.get(task, ()), *HEADLINE_PRIVACY) if k in scalars}


def write_headlines(folder: Path, headlines: dict[str, dict]) -> None:
    """``<folder>/<run>.json`` per run, the folder replaced whole: a run no longer evaluated leaves no file."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for run, figures in headlines.items():
        write_text_atomic(tmp / f"{run}.json", json.dumps(figures, indent=2) + "\n")
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def comparison_markdown(table: pd.DataFrame, sites: str = "") -> str:
    columns = [c for c in table.columns if c != "run_id"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for _, row in table.iterrows()]
    return ("# Test-set comparison\n\nEvery model on the same held-out test split "
            "(`fedbrain evaluate`). `dice`, `hd95`: per patient at the preprocessed size (HD95 in its pixels); "
            "`*_native_*`: per patient at the images' own resolution (`dice_native_source`), "
            "`_postprocessed`: after `segmentation_scores.postprocess` (a separate score, never applied to the "
            "others); `false_positive_volume_px`: predicted pixels on test slices without tumour. `ece`: "
            "expected calibration error (15 equal-width confidence bins; 0 = a probability p is right a share p of the time), "
            "`brier`: Brier score; `_calibrated`: after dividing the logits by `temperature`, fitted on "
            "the validation split (`temperature_source`). `mia_*`: membership "
            "inference, train images against as many test images (AUC 0.5 = no measurable leak, "
            "which is no proof of privacy); `mia_exceeds_dp_bound`: an attack's TPR beat what the "
            "model's (epsilon, delta) allows. `personalization`: a hospital's own model (its hospital in the "
            "run name), scored here like every model; per hospital in `personalization.md`.\n\n" + "\n".join(lines) + "\n" + sites)


def write_personalization(table: pd.DataFrame, out: Path) -> dict[str, Path]:
    """personalization.csv/.md (atomic) and one grouped-bar plot per task: {task: plot}."""
    markdown = personalization_markdown(table)
    write_text_atomic(out / "personalization.md", markdown)
    write_text_atomic(out / "personalization.csv", table.to_csv(index=False))
    figures = {}
    for task in table["task"].unique():
        panels, groups = {}, None
        for block_task, metric, block, models in blocks(table):
            if block_task != task:
                continue
            groups = [f"hospital {h}\n({n} images)" if h != MEAN_ROW else "mean over\nhospitals"
                      for h, n in zip(block["hospital"], block["test_images"])]
            panels[metric] = {c: [None if pd.isna(v) else float(v) for v in block[c]] for c in models}
        if (figure := plot_personalization(panels, groups, f"{task}: each hospital's held-out test part",
                                           out / "plots" / f"personalization_{task}.png")) is not None:
            figures[task] = figure
    return figures


def audit_classifier(model, membership, test_proba: np.ndarray, test: Split, info: dict, settings: dict) -> dict:
    """The membership audit of one classifier: only the members are predicted here; the non-members'
    predictions are evaluate's test predictions."""
    if isinstance(membership, dict):  # skipped, and why
        return dict(membership)
    member_proba = model.predict(membership.members.images, batch_size=settings["batch_size"], verbose=0)
    positions = membership.nonmember_positions
    return membership_audit.audit_model(member_proba, membership.members.labels, test_proba[positions],
                                        test.labels[positions], info["epsilon"], info["delta"],
                                        seed=settings.get("audit", {}).get("seed", 0))


def _temperature(model, val: Split | None, batch_size: int) -> dict:
    """A classifier's temperature when its card has none: fitted on the validation split, never the test split's."""
    if val is None or len(val) == 0:
        return {"temperature": 1.0, "temperature_source": "none: no validation split to fit it on"}
    return {"temperature": reliability.model_temperature(model, val, batch_size), "temperature_source": IN_EVALUATE}


def evaluate_model(path: Path, models: Path, test: Split, classes: list[str], settings: dict, plots: Path,
                   membership: membership_audit.MembershipSample | dict | None = None,
                   val: Split | None = None, reference: scores.Reference | None = None,
                   parts: dict[int, np.ndarray] | None = None) -> dict:
    """One model's test metrics and plots; with ``membership`` (a sample, or why there is none) also
    its membership audit (``result["audit"]``, classifiers only). ``val``: the validation split, to fit
    a classifier's temperature when its card has none. ``reference``: the test split's original masks
    and sites (`segmentation_scores.load_reference`); without it a segmenter is scored on the processed ones.
    ``parts``: each hospital's test part as positions in ``test`` (`hospital_test_parts`); with them the
    metrics hold ``by_hospital`` (`hospital_scores`)."""
    from fedbrain.models import load as load_model
    from fedbrain.train import load_card

    try:
        model = load_model(path)
    except Exception as exc:  # corrupt or foreign files fail in many ways
        raise InputError(f"{path}: cannot load model ({type(exc).__name__}: {exc}); retrain it or remove it") from exc
    info = describe(path, models, model, load_card(path))
    expected = tuple(model.input_shape[1:])
    if expected != tuple(test.images.shape[1:]):
        raise InputError(f"{path}: expects inputs {expected}, the test split has {tuple(test.images.shape[1:])}; "
                         "it was trained on other preprocessing: retrain it")
    if info["task"] == "segmentation":
        proba = test_time.segment(model, test.images, settings["batch_size"], settings.get("test_time_flips"))
    else:
        proba = model.predict(test.images, batch_size=settings["batch_size"], verbose=0)
    audit = None if membership is None else {"status": membership_audit.CLASSIFIERS_ONLY}
    run_plots = plots / info["run"]
    title = f"{info['run']} ({info['model']})"
    artifacts = []
    if info["task"] == "classification":
        if proba.shape[-1] != len(classes):
            raise InputError(f"{path}: has {proba.shape[-1]} outputs, the dataset {len(classes)} classes; retrain it")
        metrics = classification_metrics(test.labels, proba, classes)
        artifacts.append(plot_confusion_matrix(metrics["confusion_matrix"], classes, title,
                                               run_plots / "confusion_matrix.png"))
        artifacts.append(plot_roc(test.labels, proba, classes, title, run_plots / "roc.png"))
        if info["temperature"] is None:
            info.update(_temperature(model, val, settings["batch_size"]))
        metrics.update(reliability.assess(proba, test.labels, info["temperature"]))
        artifacts.append(reliability.plot_reliability_diagram(proba, test.labels, info["temperature"], title,
                                                              run_plots / "reliability.png"))
        try:
            artifacts.append(explain.plot_gallery(model, test.images, test.labels, reliability.scale(
                proba, info["temperature"]), classes, title, run_plots / "explanations.png"))
        except explain.NotExplainable as exc:
            print(f"explanations {info['run']}: none: {exc}")
        if membership is not None:
            started = time.perf_counter()
            audit = audit_classifier(model, membership, proba, test, info, settings)
            audit["seconds"] = time.perf_counter() - started
    else:
        if test.masks is None:
            raise InputError(f"{path}: is a segmenter but the test split has no masks (classes.json has_masks false)")
        metrics = segmentation_metrics(test.masks, proba, test.patient_ids, test.image_ids, settings["threshold"])
        metrics.update(scores.score(reference or scores.processed_reference(test, None, "no original masks given"),
                                    proba, test.patient_ids, test.image_ids, settings["threshold"],
                                    settings.get("postprocess_min_pixels")))
        artifacts.append(plot_dice_by_site(metrics, title, run_plots / "dice_by_site.png"))
        artifacts.append(plot_overlays(test, proba, settings["threshold"], settings["overlays"], title,
                                       run_plots / "overlays.png"))
    if info["history"]:
        artifacts.append(plot_history(info["history"], title, run_plots / "training_curves.png"))
    if parts:
        metrics["by_hospital"] = hospital_scores(info["task"], test, proba, parts, settings["threshold"])
    result = {"info": info, "metrics": _clean(metrics), "artifacts": [a for a in artifacts if a is not None]}
    return result if audit is None else {**result, "audit": audit}


def run(params: dict, processed: Path, partition: Path, models: Path, out: Path) -> pd.DataFrame:
    sec = params.get("evaluate") or {}
    settings = {**test_time.inference_settings(params),
                "overlays": get(sec, "overlays", int, "evaluate", default=6),
                "log_mlflow": get(sec, "log_mlflow", bool, "evaluate", default=True),
                "register": get(sec, "register", bool, "evaluate", default=True),
                "postprocess_min_pixels": get(sec, "postprocess_min_pixels", (int, type(None)), "evaluate",
                                              default=None)}
    audit_sec = sec.get("audit") or {}
    if not isinstance(audit_sec, dict):
        raise InputError("params.yaml: 'evaluate.audit' must be a mapping (members, seed)")
    settings["audit"] = {"members": get(audit_sec, "members", int, "evaluate.audit", default=250),
                         "seed": get(audit_sec, "seed", int, "evaluate.audit", default=0)}
    started = time.perf_counter()
    processed, partition, models, out = Path(processed), Path(partition), Path(models), Path(out)
    classes = list(load_classes(processed)["classes"])
    test = load_split(processed, partition, "test")
    if len(test) == 0:
        raise InputError(f"{partition}: the test split is empty; raise partition.test_fraction")
    audit_seconds = time.perf_counter()  # sampling and the ROC plot; each model's share is in its audit
    membership = (membership_audit.membership_sample(processed, partition, settings["audit"]["members"],
                                                     settings["audit"]["seed"], test)
                  if settings["audit"]["members"] > 0 else {"status": "audit skipped: evaluate.audit.members is 0"})
    audit_seconds = time.perf_counter() - audit_seconds
    paths = discover(models)
    val = load_split(processed, partition, "val")  # for temperatures no card holds
    reference = None if test.masks is None else scores.load_reference(processed, test)  # read once for all models
    parts = hospital_test_parts(partition)  # None: a partition written before hospitals had test parts
    scored_parts = parts if parts and len(parts) >= 2 else None  # one hospital: nothing to compare across
    results = [evaluate_model(path, models, test, classes, settings, out / "plots", membership, val, reference,
                              scored_parts) for path in paths]

    scalars, details, rows = {}, {}, []
    for result in results:
        info, metrics, audit = result["info"], result["metrics"], result["audit"]
        scalars[info["run"]] = run_scalars(info, metrics, audit)
        details[info["run"]] = {**{k: v for k, v in info.items() if k != "history"}, "metrics": metrics,
                                "membership_audit": _without_curves(audit)}
        rows.append({"run": info["run"], "training": info["training"], "model": info["model"], "task": info["task"],
                     "privacy": info["privacy"], "epsilon": info["epsilon"], "delta": info["delta"],
                     "aggregation": info["aggregation"], "personalization": info["personalization"],
                     "accuracy": metrics.get("accuracy"), "macro_f1": metrics.get("macro_f1"),
                     "roc_auc": metrics.get("roc_auc"), **{c: metrics.get(c, info.get(c)) for c in RELIABILITY_COLUMNS},
                     "dice": metrics.get("dice"), "hd95": metrics.get("hd95"),
                     "dice_tumour_slices": metrics.get("dice_tumour_slices"), **scores.comparison_cells(metrics),
                     "test_images": len(test),
                     "train_time_s": info["train_time_s"], "round_time_s": info["round_time_s"],
                     "mb_per_round": info["mb_per_round"], **_mia_cells(audit), "run_id": info["run_id"]})
    for task in ("classification", "segmentation"):
        # Per-round curve of every federated run, in the plots folder and in its MLflow run.
        if (figure := plot_rounds(results, task, out / "plots" / f"rounds_{task}.png")) is not None:
            for result in results:
                if result["info"]["task"] == task and result["info"]["training"] == "federated":
                    result["artifacts"].append(figure)
    write_curves([result["info"] for result in results], out / "curves")  # DVC data plots (curves.py)
    if (figure := plot_privacy_utility(rows, out / "plots" / "privacy_utility.png")) is not None:
        for result in results:
            if result["info"]["task"] == "classification":
                result["artifacts"].append(figure)
    plotted = time.perf_counter()
    if (figure := plot_membership_roc(results, out / "plots" / "membership_roc.png")) is not None:
        for result in results:
            if result["audit"]["status"] == "audited":
                result["artifacts"].append(figure)
    audit_seconds += time.perf_counter() - plotted
    personal = personalization_table(results, scored_parts)
    if personal is not None:
        for task, figure in write_personalization(personal, out).items():
            for result in results:
                if result["info"]["task"] == task and "by_hospital" in result["metrics"]:
                    result["artifacts"].append(figure)
    else:  # the files say why there is no table (DVC expects them); a previous evaluation's plots go
        no_table = ("was written before hospitals had test parts (re-run: dvc repro partition)" if parts is None
                    else f"has test parts for {len(parts)} hospital(s), fewer than 2")
        write_text_atomic(out / "personalization.md", f"# Per-hospital test scores\n\nNone: {partition / 'splits.parquet'} "
                                                f"{no_table}.\n")
        write_text_atomic(out / "personalization.csv", "task,metric,hospital,test_images\n")
        for stale in (out / "plots").glob("personalization_*.png"):
            stale.unlink(missing_ok=True)
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    write_text_atomic(out / "metrics.json", json.dumps(scalars, indent=2) + "\n")
    write_headlines(out / "headline", {r["info"]["run"]: headline(r["info"]["task"], scalars[r["info"]["run"]])
                                       for r in results})
    write_text_atomic(out / "evaluation.json", json.dumps(_clean(details), indent=2) + "\n")
    markdown = comparison_markdown(table, scores.sites_markdown(results))
    write_text_atomic(out / "comparison.md", markdown)
    tmp = out / ".comparison.csv.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, out / "comparison.csv")

    if settings["log_mlflow"]:
        from fedbrain import tracking

        evaluated = []
        for path, result in zip(paths, results):
            info = result["info"]
            tags = {"task": info["task"], "model": info["model"], "training": info["training"],
                    "privacy": str(info["privacy"])}
            run_id = info["run_id"]
            if info["hospital"] is not None:
                # A hospital's own model: an evaluation run of its own, even if its card names a run
                # (the federated run's test metrics are the global model's).
                tags.update(personalization=str(info["personalization"]), hospital=str(info["hospital"]))
                run_id = None
            run_id = tracking.log_to_run(params, run_id, f"evaluate-{info['run']}", tags,
                                         scalars[info["run"]], result["artifacts"] + [out / "metrics.json"])
            evaluated.append({**info, "run_id": run_id, "path": path, "metrics": result["metrics"]})
        if settings["register"]:
            from fedbrain import registry

            # Only the consortium's models compete for champion; a hospital's own model is not one of them.
            registry.register(params, [m for m in evaluated if m["hospital"] is None])
    print(f"evaluate: {len(results)} model(s) on {len(test)} test images -> {out / 'comparison.md'}")
    print(markdown.split("\n\n", 2)[-1])
    if personal is not None:
        print(f"per hospital -> {out / 'personalization.md'}")
        print(personalization_markdown(personal).split("\n\n", 2)[-1])
    elif any(r["info"]["hospital"] is not None for r in results):
        print(f"personalization: no per-hospital table: {partition / 'splits.parquet'} {no_table}")
    if reference is not None:
        print(f"segmentation scored per patient at {reference.source}")
    for result in results:
        info = result["info"]
        if info["task"] == "classification":
            print(reliability.summary_line(info["run"], info["temperature"], info["temperature_source"],
                                           result["metrics"]))
        for line in audit_report(info["run"], result["audit"], info["epsilon"], info["delta"]):
            print(line)
    spent = audit_seconds + sum(r["audit"].get("seconds", 0.0) for r in results)
    print(f"membership audit: {spent:.1f} s of evaluate's {time.perf_counter() - started:.1f} s")
    return table
