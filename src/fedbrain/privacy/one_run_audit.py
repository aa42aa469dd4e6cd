"""An empirical epsilon from one training run: Steinke, Nasr & Jagielski, "Privacy auditing with one
(1) training run", NeurIPS 2023 (arXiv:2305.08846).

The audit, end to end (``bench/privacy_audit.py`` runs it on the federated classifier):
1. ``choose_canaries``: m canaries, each a distinct training image of one hospital with a
   deliberately wrong label (a seeded draw among the other classes), and each independently "in"
   with probability 1/2 (the theorem's S, uniform on {-1, +1}^m).
2. ``write_canaried_partition``: a copy of the partition in which every "in" canary is one more
   training row of the hospital that holds its image (same image row, the wrong label). The
   original partition is only read. A hospital loads its canaries through ``load_split`` like any
   other row, so its DP-SGD plan (sampling rate, steps, noise for a target epsilon) counts them.
3. train once, through the real federation;
4. ``score_canaries``: each canary's score is the trained model's log-probability of the canary's
   wrong label (minus its loss; higher = more likely "in");
5. ``guess``: "in" for the k+ highest scores, "out" for the k- lowest, the rest abstain; count the
   right guesses; ``epsilon_lower_bound`` turns the count into the largest epsilon the run refutes.

Why canaries are extra copies with a wrong label rather than training images removed when "out":
the embedded sample has about 280 training images; holding out or relabelling 100-200 of them
would take a third or more of the training set away (or turn it into label noise) and change the
model being audited. As extra rows the training set is the original one plus about m/2 mislabelled
duplicates. An "out" canary's image is still trained on with its true label, so the model gives
the wrong label a low probability; an "in" canary's image is seen with both labels, and as the
model memorises the mislabelled copy that probability climbs towards one half (label smoothing
caps it). That is the contrast expected of a 2.8M-parameter cnn after 10 rounds x 5 local epochs
(bench/privacy_audit.py measures it; a bound of 0 for the non-private run would say it is not
there). For the DP guarantee the canary (image, wrong label) is an example of its own, added or
removed, which is the neighbouring relation DP-SGD's accountant (Poisson sampling, add/remove) is
computed for; the true-label copy belongs to the fixed part of the data.

Only the number of guesses r = k+ + k- and the number right enter the bound: the theorem needs the
guesser to make exactly r non-abstaining guesses, whatever the split between "in" and "out". k+ and
k- must be fixed before looking at the scores: picking them to maximise the bound afterwards is a
multiple test the bound does not cover.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedbrain.dataset import hospital_dir, replaced_folder
from fedbrain.errors import InputError
from fedbrain.privacy import audit

CANARIES_FILE = "canaries.parquet"
CANARIES_REPORT = "canaries.json"
# Columns of canaries.parquet: one row per canary, "in" or not.
COLUMNS = ("canary", "row", "image_id", "hospital", "true_label", "canary_label", "included")
_TINY = 1e-12  # probability floor: a softmax saturated in float32 must give a finite score


# --------------------------------------------------------------------------- the bound

def epsilon_lower_bound(m: int, k_plus: int, k_minus: int, correct: int, delta: float,
                        confidence: float = 0.95) -> float:
    """The largest epsilon that ``correct`` right guesses refute at ``confidence``: m canaries, each
    included independently with probability 1/2; k+ guesses "in" and k- guesses "out" (r = k+ + k-),
    the other m - r abstentions. 0.0 when not even epsilon 0 is refuted (chance-level guessing).

    Steinke, Nasr & Jagielski 2023 (arXiv:2305.08846v1), main theorem, Theorem 3.1 (a public port
    cites the same p-value as Corollary 5.4, the approximate-DP analysis of Section 5; the paper's
    own text was not at hand here to settle the number), for an (epsilon, delta)-DP algorithm and W
    the number of right guesses:
        P[W >= v] <= f(v) + 2 m delta max_{i = 1..m} (f(v - i) - f(v)) / i,
        f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v];
    delta = 0 leaves the pure-DP statement P[W >= v] <= f(v). The bound is the largest eps whose
    right-hand side at v = ``correct`` is at most 1 - ``confidence``. The formula was checked against
    the authors' own code for it (``p_value_DP_audit`` / ``get_eps_audit``, the paper's Appendix D,
    as reproduced in public repositories, and DeepMind's jax_privacy ``_one_run_p_value``), and
    reproduces two values the paper prints, as a public port quotes them (Appendix D's example,
    0.673, and one of Section 7's, 2.675: tests/privacy/test_one_run_audit.py). A refined numerical
    computation for delta > 0 (an Algorithm 2 of the paper) could not be read here: this closed form
    is the one every implementation above uses; a tighter refinement would only raise the bound.

    Computed with exact binomial tails (scipy.stats.binom) and bisection over epsilon, never a normal
    approximation: ``fedbrain.privacy.audit.epsilon_lower_bound``, the project's one implementation
    of it, which this checks the arguments for. Monotone in ``correct``; at most the bound of
    perfect guessing (``correct = r``) for the same m, r, delta and confidence.
    """
    for name, value in (("m", m), ("k_plus", k_plus), ("k_minus", k_minus), ("correct", correct)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    guesses = int(k_plus) + int(k_minus)
    if guesses > m:
        raise ValueError(f"k_plus + k_minus = {guesses} guesses about only m = {m} canaries")
    if correct > guesses:
        raise ValueError(f"correct = {correct} exceeds the {guesses} guesses made")
    return audit.epsilon_lower_bound(int(m), guesses, int(correct), float(delta), confidence)


def perfect_guessing_bound(m: int, k_plus: int, k_minus: int, delta: float, confidence: float = 0.95) -> float:
    """The most this audit can show with these counts: every guess right."""
    return epsilon_lower_bound(m, k_plus, k_minus, k_plus + k_minus, delta, confidence)


# --------------------------------------------------------------------------- canaries

def training_rows(partition: Path) -> pd.DataFrame:
    """Every hospital's training rows (row, image_id, hospital, label_index), checked against
    splits.parquet when it exists: a canary must never be a val or test image."""
    partition = Path(partition)
    hospitals = sorted(int(p.parent.name.split("_", 1)[1]) for p in partition.glob("hospital_*/index.parquet"))
    if not hospitals:
        raise InputError(f"{partition}: no hospital_<k>/index.parquet; run the partition stage first")
    parts = []
    for k in hospitals:
        index = pd.read_parquet(hospital_dir(partition, k) / "index.parquet")
        train = index[index["split"] == "train"]
        parts.append(pd.DataFrame({"row": train["row"].to_numpy(np.int64), "image_id": train["image_id"].astype(str),
                                   "hospital": k, "label_index": train["label_index"].to_numpy(np.int64)}))
    rows = pd.concat(parts, ignore_index=True)
    if rows["row"].duplicated().any():
        first = int(rows.loc[rows["row"].duplicated(), "row"].iloc[0])
        raise InputError(f"{partition}: image row {first} is a training row of more than one hospital, or twice; "
                         f"choose canaries from an original partition, not a canaried one")
    splits_path = partition / "splits.parquet"
    if splits_path.is_file():
        splits = pd.read_parquet(splits_path, columns=["row", "split"]).set_index("row")["split"]
        outside = rows[~rows["row"].isin(splits.index) | (splits.reindex(rows["row"]).to_numpy() != "train")]
        if len(outside):
            raise InputError(f"{partition}: hospital {int(outside['hospital'].iloc[0])} trains on row "
                             f"{int(outside['row'].iloc[0])}, which splits.parquet does not list as a train row")
    return rows.sort_values("row", kind="stable").reset_index(drop=True)


def choose_canaries(partition: Path, m: int, seed: int, num_classes: int) -> pd.DataFrame:
    """m canaries from the partition's training images (seeded): distinct images drawn uniformly from
    every hospital's training rows, each with a wrong label drawn uniformly among the other classes,
    each "in" (``included``) independently with probability 1/2. Columns: ``COLUMNS``."""
    return draw_canaries(training_rows(partition), m, seed, num_classes)


def draw_canaries(rows: pd.DataFrame, m: int, seed: int, num_classes: int) -> pd.DataFrame:
    """``choose_canaries`` on the training rows already read (``training_rows``)."""
    if num_classes < 2:
        raise InputError(f"a canary needs a wrong label: {num_classes} class(es)")
    if not 1 <= m <= len(rows):
        raise InputError(f"{m} canaries asked for, the partition has {len(rows)} training images: "
                         f"use between 1 and {len(rows)}")
    rng = np.random.default_rng(seed)
    picked = rows.iloc[np.sort(rng.choice(len(rows), m, replace=False))].reset_index(drop=True)
    true = picked["label_index"].to_numpy(np.int64)
    if (true < 0).any() or (true >= num_classes).any():
        raise InputError(f"training rows with a label_index outside 0..{num_classes - 1}")
    wrong = (true + rng.integers(1, num_classes, size=m)) % num_classes  # any class but the true one
    included = rng.random(m) < 0.5
    return pd.DataFrame({"canary": np.arange(m), "row": picked["row"].to_numpy(np.int64),
                         "image_id": picked["image_id"].tolist(), "hospital": picked["hospital"].to_numpy(np.int64),
                         "true_label": true, "canary_label": wrong.astype(np.int64), "included": included})


def canary_image_id(canary: int, image_id: str) -> str:
    return f"canary-{canary:05d}:{image_id}"


def write_canaried_partition(partition: Path, canaries: pd.DataFrame, out: Path) -> Path:
    """A copy of ``partition`` at ``out`` with every included canary appended to its hospital's
    training rows (split train, the canary's wrong label); ``canaries.parquet`` (all m, in or out)
    and ``canaries.json`` beside them, and report.json's ``canaries`` entry. The original folder is
    only read; ``out`` is written in a temporary folder and renamed over, never half-written.
    splits.parquet stays the original split (one row per image): the canaries are extra examples
    of images already in train, never val or test ones."""
    partition, out = Path(partition).resolve(), Path(out).resolve()
    if out == partition or partition in out.parents or out in partition.parents:
        raise InputError(f"{out}: the canaried partition must be outside {partition}, not in it or around it")
    missing = [c for c in COLUMNS if c not in canaries.columns]
    if missing:
        raise InputError(f"canaries lack column(s) {', '.join(missing)}")
    if (canaries["canary_label"] == canaries["true_label"]).any():
        raise InputError("a canary has its true label: canaries must be mislabelled")
    held = training_rows(partition).set_index("row")
    unknown = canaries[~canaries["row"].isin(held.index)]
    if len(unknown):
        raise InputError(f"canary {int(unknown['canary'].iloc[0])}: row {int(unknown['row'].iloc[0])} is not a "
                         f"training image of {partition}")
    wrong_home = canaries[held.loc[canaries["row"], "hospital"].to_numpy() != canaries["hospital"].to_numpy()]
    if len(wrong_home):
        raise InputError(f"canary {int(wrong_home['canary'].iloc[0])}: its image is not held by hospital "
                         f"{int(wrong_home['hospital'].iloc[0])}")

    with replaced_folder(out) as tmp:
        for item in partition.iterdir():
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        sizes = {}
        for index_path in sorted(tmp.glob("hospital_*/index.parquet")):
            k = int(index_path.parent.name.split("_", 1)[1])
            index = pd.read_parquet(index_path)
            mine = canaries[canaries["included"].astype(bool) & (canaries["hospital"] == k)]
            extra = pd.DataFrame({"row": mine["row"].to_numpy(np.int64), "split": "train",
                                  "label_index": mine["canary_label"].to_numpy(np.int64),
                                  "image_id": [canary_image_id(int(c), str(i))
                                               for c, i in zip(mine["canary"], mine["image_id"])]})
            extended = pd.concat([index, extra[list(index.columns)]], ignore_index=True)
            extended = extended.astype({c: index[c].dtype for c in index.columns})
            extended.to_parquet(index_path, index=False)
            sizes[str(k)] = {"train": int((index["split"] == "train").sum()), "canaries_in": int(len(mine)),
                             "train_with_canaries": int((extended["split"] == "train").sum())}
        canaries[list(COLUMNS)].to_parquet(tmp / CANARIES_FILE, index=False)
        summary = {"m": int(len(canaries)), "included": int(canaries["included"].sum()),
                   "source": str(partition), "hospitals": sizes,
                   "rule": "each canary is a training image with a wrong label, in with probability 1/2; an included "
                           "one is one more training row of its image's hospital"}
        (tmp / CANARIES_REPORT).write_text(json.dumps(summary, indent=2) + "\n")
        report_path = tmp / "report.json"
        if report_path.is_file():
            report = json.loads(report_path.read_text())
            report["canaries"] = summary
            report_path.write_text(json.dumps(report, indent=2) + "\n")
    return out


def load_canaries(partition: Path) -> pd.DataFrame:
    path = Path(partition) / CANARIES_FILE
    if not path.is_file():
        raise InputError(f"{path}: not found; build the partition with write_canaried_partition")
    return pd.read_parquet(path)


# --------------------------------------------------------------------------- scoring and guessing

def canary_scores(proba: np.ndarray, canary_labels: np.ndarray) -> np.ndarray:
    """log p(canary's wrong label), i.e. minus its cross-entropy loss: higher = more likely "in"."""
    proba = np.asarray(proba, dtype=np.float64)
    labels = np.asarray(canary_labels, dtype=np.int64)
    return np.log(np.clip(proba[np.arange(len(labels)), labels], _TINY, 1.0))


def score_canaries(model_path: Path, processed: Path, canaries: pd.DataFrame, batch_size: int = 64) -> np.ndarray:
    """Each canary's score under the trained classifier at ``model_path`` (a .keras file)."""
    from fedbrain.models import load as load_model

    images = np.load(Path(processed) / "images.npy", mmap_mode="r")
    x = np.asarray(images[canaries["row"].to_numpy(np.int64)], dtype=np.float32)
    model = load_model(model_path)
    proba = model.predict(x, batch_size=batch_size, verbose=0)
    return canary_scores(proba, canaries["canary_label"].to_numpy())


@dataclass(frozen=True)
class Guesses:
    k_plus: int
    k_minus: int
    correct_in: int   # of the k+ "in" guesses, canaries that were in
    correct_out: int  # of the k- "out" guesses, canaries that were out

    @property
    def guesses(self) -> int:
        return self.k_plus + self.k_minus

    @property
    def correct(self) -> int:
        return self.correct_in + self.correct_out


def guess(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int) -> Guesses:
    """"in" for the k+ highest scores, "out" for the k- lowest; ties broken by canary order (which is
    independent of who is in, so the guesser stays a function of the trained model alone)."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be one value per canary")
    if not np.isfinite(scores).all():
        raise ValueError("canary scores must be finite")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(scores):
        raise ValueError(f"k_plus {k_plus} + k_minus {k_minus} guesses about {len(scores)} canaries")
    order = np.argsort(-scores, kind="stable")  # highest first
    top, bottom = order[:k_plus], order[len(order) - k_minus:]
    return Guesses(k_plus, k_minus, int(included[top].sum()), int((~included[bottom]).sum()))


def audit_canaries(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int, delta: float,
                   confidence: float = 0.95) -> dict:
    """The one-run audit's numbers: m, k+, k-, right guesses, the epsilon lower bound at ``delta``,
    the most perfect guessing could show, and the canary scores' ROC AUC (0.5 = no signal)."""
    from sklearn.metrics import roc_auc_score

    included = np.asarray(included, dtype=bool)
    g = guess(scores, included, k_plus, k_minus)
    m = len(included)
    both = included.any() and not included.all()
    return {"m": m, "included": int(included.sum()), "k_plus": k_plus, "k_minus": k_minus,
            "correct_in": g.correct_in, "correct_out": g.correct_out, "correct": g.correct,
            "delta": delta, "confidence": confidence,
            "epsilon_lower_bound": epsilon_lower_bound(m, k_plus, k_minus, g.correct, delta, confidence),
            "perfect_guessing_bound": perfect_guessing_bound(m, k_plus, k_minus, delta, confidence),
            "score_auc": float(roc_auc_score(included, scores)) if both else float("nan"),
            "median_score_in": float(np.median(np.asarray(scores)[included])) if included.any() else float("nan"),
            "median_score_out": float(np.median(np.asarray(scores)[~included])) if (~included).any() else float("nan")}
