"""The one-run audit (fedbrain.privacy.one_run_audit): its epsilon bound against independent
computations and printed values, and the canaries (choice, in/out draw, derived partition).
Nothing here trains: tiny numpy arrays and parquet files only."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq

from helpers import binomial_tail, one_run_p_value_by_hand

from fedbrain.dataset import load_split
from fedbrain.errors import InputError
from fedbrain.privacy.one_run_audit import (CANARIES_FILE, audit_canaries, canary_scores, choose_canaries,
                                            draw_canaries, epsilon_lower_bound, guess, load_canaries,
                                            perfect_guessing_bound, training_rows, write_canaried_partition)

CLASSES = 4
SIGNIFICANCE = 0.05


# --------------------------------------------------------------------------- the bound, independently

def bound_by_hand(m: int, r: int, v: int, delta: float) -> float:
    if one_run_p_value_by_hand(m, r, v, 0.0, delta) > SIGNIFICANCE:
        return 0.0
    return brentq(lambda e: one_run_p_value_by_hand(m, r, v, e, delta) - SIGNIFICANCE, 0.0, 30.0, xtol=1e-12)


@pytest.mark.parametrize("m,k_plus,k_minus,correct", [(100, 20, 20, 36), (100, 25, 25, 50), (60, 30, 0, 24),
                                                      (500, 100, 100, 170), (1000, 10, 40, 41)])
def test_pure_dp_bound_matches_the_binomial_tail_by_hand(m, k_plus, k_minus, correct):
    found = epsilon_lower_bound(m, k_plus, k_minus, correct, 0.0, confidence=1 - SIGNIFICANCE)
    assert found == pytest.approx(bound_by_hand(m, k_plus + k_minus, correct, 0.0), abs=1e-6)
    # Refuted at the value returned, not refuted just above it.
    assert binomial_tail(k_plus + k_minus, correct, math.exp(found) / (1 + math.exp(found))) <= SIGNIFICANCE + 1e-9
    above = found + 1e-4
    assert binomial_tail(k_plus + k_minus, correct, math.exp(above) / (1 + math.exp(above))) > SIGNIFICANCE


@pytest.mark.parametrize("m,k_plus,k_minus,correct,delta", [(100, 20, 20, 38, 1e-5), (200, 50, 50, 90, 1e-5),
                                                            (100, 25, 25, 45, 1e-3), (400, 75, 75, 120, 1e-6)])
def test_approximate_dp_bound_matches_the_theorem_by_hand(m, k_plus, k_minus, correct, delta):
    found = epsilon_lower_bound(m, k_plus, k_minus, correct, delta, confidence=1 - SIGNIFICANCE)
    assert found == pytest.approx(bound_by_hand(m, k_plus + k_minus, correct, delta), abs=1e-6)
    assert found <= epsilon_lower_bound(m, k_plus, k_minus, correct, 0.0)  # delta only weakens what is refuted


def test_perfect_guessing_closed_form():
    # Pure DP, every one of r guesses right: P = q^r, so the bound is log(q / (1 - q)) with q = alpha^(1/r).
    for r in (10, 40, 200):
        q = SIGNIFICANCE ** (1 / r)
        assert perfect_guessing_bound(1000, r // 2, r - r // 2, 0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)


def test_values_printed_in_the_paper():
    # arXiv:2305.08846v1: Appendix D's example (m 1000, r 100, v 75, delta 1e-4, 95%: 0.673) and a
    # Section 7 figure's (m 100,000, r 1510, v 1439, delta 1e-5: 2.675, printed truncated), as quoted
    # by a public port that pins its implementation to them.
    assert epsilon_lower_bound(1000, 50, 50, 75, 1e-4) == pytest.approx(0.673, abs=5e-4)
    assert 2.675 <= epsilon_lower_bound(100_000, 1000, 510, 1439, 1e-5) < 2.676


def test_chance_level_guessing_gives_zero():
    for r in (10, 40, 200, 1000):
        for delta in (0.0, 1e-5):
            assert epsilon_lower_bound(2 * r, r // 2, r - r // 2, r // 2, delta) == 0.0
            assert epsilon_lower_bound(2 * r, r // 2, r - r // 2, r // 4, delta) == 0.0  # worse than chance
    assert epsilon_lower_bound(100, 0, 0, 0, 1e-5) == 0.0  # every canary abstained


def test_bound_is_monotone_and_capped_by_perfect_guessing():
    m, k_plus, k_minus = 100, 20, 20
    for delta in (0.0, 1e-5):
        bounds = [epsilon_lower_bound(m, k_plus, k_minus, v, delta) for v in range(k_plus + k_minus + 1)]
        assert all(a <= b for a, b in zip(bounds, bounds[1:]))
        assert bounds[-1] == perfect_guessing_bound(m, k_plus, k_minus, delta) > 0
        assert max(bounds) <= bounds[-1]


def test_bound_refuses_impossible_counts():
    with pytest.raises(ValueError):
        epsilon_lower_bound(10, 6, 6, 5, 1e-5)  # 12 guesses about 10 canaries
    with pytest.raises(ValueError):
        epsilon_lower_bound(100, 5, 5, 11, 1e-5)  # more right than guessed
    with pytest.raises(ValueError):
        epsilon_lower_bound(100, -1, 5, 2, 1e-5)
    with pytest.raises(ValueError):
        epsilon_lower_bound(100, 5, 5, 5, 1e-5, confidence=1.0)


# --------------------------------------------------------------------------- guessing and scoring

def test_scores_and_guesses():
    proba = np.array([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 1.0, 0.0, 0.0]])
    scores = canary_scores(proba, np.array([1, 2, 0]))
    assert scores[:2] == pytest.approx(np.log([0.1, 0.25]))
    assert np.isfinite(scores[2]) and scores[2] < -20  # p = 0 is floored, not -inf

    included = np.array([True] * 10 + [False] * 10)
    separated = np.r_[np.linspace(-1, 0, 10), np.linspace(-9, -5, 10)]  # every "in" scores above every "out"
    g = guess(separated, included, 5, 5)
    assert (g.correct_in, g.correct_out, g.correct, g.guesses) == (5, 5, 10, 10)
    assert guess(-separated, included, 5, 5).correct == 0
    result = audit_canaries(separated, included, 5, 5, 1e-5)
    assert result["correct"] == 10 and result["score_auc"] == 1.0
    assert result["epsilon_lower_bound"] == result["perfect_guessing_bound"] > 0
    assert audit_canaries(-separated, included, 5, 5, 1e-5)["epsilon_lower_bound"] == 0.0
    with pytest.raises(ValueError):
        guess(separated, included, 15, 6)


# --------------------------------------------------------------------------- canaries on disk

TRAIN, VAL, TEST = 90, 15, 15


def tiny_dataset(root: Path) -> tuple[Path, Path]:
    """processed/ (8x8 images) and partition/ as the stages write them: train rows 0..89 over 3
    hospitals, val 90..104 over the same hospitals, test 105..119 held out."""
    rng = np.random.default_rng(7)
    n = TRAIN + VAL + TEST
    processed, partition = root / "processed", root / "partition"
    processed.mkdir(parents=True)
    np.save(processed / "images.npy", rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32))
    labels = np.arange(n) % CLASSES
    ids = [f"img{i:03d}" for i in range(n)]
    pd.DataFrame({"row": np.arange(n), "image_id": ids, "patient_id": None, "label_index": labels}).to_parquet(
        processed / "index.parquet")
    split = np.array(["train"] * TRAIN + ["val"] * VAL + ["test"] * TEST, dtype=object)
    hospital = np.where(split == "test", -1, np.arange(n) % 3)
    table = pd.DataFrame({"row": np.arange(n), "image_id": ids, "patient_id": None, "site": None,
                          "label": [f"c{k}" for k in labels], "label_index": labels, "split": split,
                          "hospital": hospital})
    (partition).mkdir()
    table.to_parquet(partition / "splits.parquet", index=False)
    for k in range(3):
        (partition / f"hospital_{k}").mkdir()
        table[table["hospital"] == k][["row", "split", "label_index", "image_id"]].to_parquet(
            partition / f"hospital_{k}" / "index.parquet", index=False)
    (partition / "report.json").write_text(json.dumps({"hospitals": 3, "settings": {"scheme": "iid"}}) + "\n")
    return processed, partition


def digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_canary_choice_is_seeded_and_mislabelled(tmp_path):
    _, partition = tiny_dataset(tmp_path)
    a, b = choose_canaries(partition, 40, seed=3, num_classes=CLASSES), choose_canaries(partition, 40, 3, CLASSES)
    pd.testing.assert_frame_equal(a, b)
    other = choose_canaries(partition, 40, seed=4, num_classes=CLASSES)
    assert not (a["row"].tolist() == other["row"].tolist() and a["included"].tolist() == other["included"].tolist())
    assert a["row"].is_unique and len(a) == 40
    assert (a["canary_label"] != a["true_label"]).all()
    assert a["canary_label"].between(0, CLASSES - 1).all()
    truth = pd.read_parquet(partition / "splits.parquet").set_index("row")["label_index"]
    assert (a["true_label"].to_numpy() == truth.loc[a["row"]].to_numpy()).all()
    # Every wrong class is drawn for a true class, about uniformly (3 choices, 90 images x 20 seeds).
    rows = training_rows(partition)
    many = pd.concat([draw_canaries(rows, TRAIN, s, CLASSES) for s in range(20)])
    offsets = (many["canary_label"] - many["true_label"]) % CLASSES
    counts = offsets.value_counts()
    assert set(counts.index) == {1, 2, 3}
    assert counts.min() > 0.8 * len(many) / 3


def test_in_out_draw_is_a_fair_coin_per_canary(tmp_path):
    _, partition = tiny_dataset(tmp_path)
    rows = training_rows(partition)
    draws = np.array([draw_canaries(rows, 50, seed, CLASSES)["included"].to_numpy() for seed in range(400)])
    n = draws.size
    assert abs(draws.mean() - 0.5) < 4 * math.sqrt(0.25 / n)
    per_run = draws.sum(axis=1)  # Binomial(50, 1/2): variance 12.5
    assert 12.5 * 0.75 < per_run.var() < 12.5 * 1.25
    # Independent of the canary's position: neighbours uncorrelated, each position in about half the runs.
    assert abs(np.corrcoef(draws[:, :-1].ravel(), draws[:, 1:].ravel())[0, 1]) < 0.05
    assert np.abs(draws.mean(axis=0) - 0.5).max() < 5 * math.sqrt(0.25 / len(draws))


def test_no_canary_is_a_val_or_test_image(tmp_path):
    _, partition = tiny_dataset(tmp_path)
    splits = pd.read_parquet(partition / "splits.parquet")
    held_out = set(splits.loc[splits["split"] != "train", "row"])
    for seed in range(10):
        canaries = choose_canaries(partition, TRAIN, seed, CLASSES)  # all training images: none else qualifies
        assert not set(canaries["row"]) & held_out
        assert set(canaries["row"]) == set(splits.loc[splits["split"] == "train", "row"])
    with pytest.raises(InputError):
        choose_canaries(partition, TRAIN + 1, 0, CLASSES)
    # A hospital index that trains on a test image is refused, not drawn from.
    index_path = partition / "hospital_0" / "index.parquet"
    index = pd.read_parquet(index_path)
    pd.concat([index, pd.DataFrame({"row": [110], "split": ["train"], "label_index": [2],
                                    "image_id": ["img110"]})]).to_parquet(index_path, index=False)
    with pytest.raises(InputError, match="splits.parquet"):
        training_rows(partition)


def test_canaried_partition_adds_the_in_canaries_and_leaves_the_original_untouched(tmp_path):
    processed, partition = tiny_dataset(tmp_path)
    before = digest(partition)
    original = {k: load_split(processed, partition, "train", hospital=k) for k in range(3)}
    canaries = choose_canaries(partition, 30, seed=1, num_classes=CLASSES)
    out = write_canaried_partition(partition, canaries, tmp_path / "canaried")
    assert digest(partition) == before  # not one byte nor one timestamp changed
    pd.testing.assert_frame_equal(load_canaries(out), canaries)
    assert (out / "splits.parquet").read_bytes() == (partition / "splits.parquet").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["canaries"]["m"] == 30 and report["canaries"]["included"] == int(canaries["included"].sum())
    total_in = 0
    for k in range(3):
        mine = canaries[canaries["included"] & (canaries["hospital"] == k)]
        total_in += len(mine)
        train = load_split(processed, out, "train", hospital=k)
        # The hospital trains on its original images plus its in-canaries, with their wrong labels:
        # len(train) is what its DP-SGD plan counts.
        assert len(train) == len(original[k]) + len(mine)
        assert report["canaries"]["hospitals"][str(k)]["train_with_canaries"] == len(train)
        assert (train.labels[:len(original[k])] == original[k].labels).all()
        assert train.labels[len(original[k]):].tolist() == mine["canary_label"].tolist()
        images = np.load(processed / "images.npy")
        assert np.array_equal(train.images[len(original[k]):], images[mine["row"].to_numpy()])
        # Validation data is not touched.
        assert load_split(processed, out, "val", hospital=k).image_ids == \
            load_split(processed, partition, "val", hospital=k).image_ids
    assert total_in == int(canaries["included"].sum())
    out_only = canaries[~canaries["included"]]
    for k in range(3):
        rows = pd.read_parquet(out / f"hospital_{k}" / "index.parquet")
        extra = rows.iloc[len(pd.read_parquet(partition / f"hospital_{k}" / "index.parquet")):]
        assert not set(extra["row"]) & set(out_only["row"])  # an "out" canary adds nothing
    # Rewriting gives the same files; a canaried partition cannot be the source of new canaries.
    write_canaried_partition(partition, canaries, out)
    assert canaries["included"].any()
    with pytest.raises(InputError, match="more than one hospital, or twice"):
        choose_canaries(out, 10, 0, CLASSES)
    with pytest.raises(InputError):
        write_canaried_partition(partition, canaries, partition / "inside")
    assert digest(partition) == before


def test_canaried_partition_refuses_bad_canaries(tmp_path):
    _, partition = tiny_dataset(tmp_path)
    canaries = choose_canaries(partition, 10, seed=2, num_classes=CLASSES)
    relabelled = canaries.assign(canary_label=canaries["true_label"])
    with pytest.raises(InputError, match="true label"):
        write_canaried_partition(partition, relabelled, tmp_path / "a")
    moved = canaries.assign(hospital=(canaries["hospital"] + 1) % 3)
    with pytest.raises(InputError, match="not held by hospital"):
        write_canaried_partition(partition, moved, tmp_path / "b")
    val_row = canaries.assign(row=canaries["row"].where(canaries["canary"] != 0, TRAIN))  # row 90 is val
    with pytest.raises(InputError, match="not a training image"):
        write_canaried_partition(partition, val_row, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partition", "processed"]  # nothing half-written
    assert not (partition / CANARIES_FILE).exists()
