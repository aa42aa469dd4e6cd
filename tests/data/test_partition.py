"""partition: duplicates, leakage-free splits, hospitals by iid / dirichlet / site, files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedbrain import partition
from fedbrain.dataset import hospital_dir, hospital_test_parts, load_split
from fedbrain.errors import InputError
from fedbrain.partition import PartitionSettings, drop_duplicates, partition_index, site_hospitals

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
FOUR = ["glioma", "meningioma", "notumor", "pituitary"]
BINARY = ["no_tumor", "tumor"]


def make_index(rows: list[dict], classes: list[str]) -> pd.DataFrame:
    """An index table as preprocess writes it (manifest columns used here + row + label_index)."""
    table = pd.DataFrame(rows)
    for column in ("patient_id", "site"):
        if column not in table:
            table[column] = None
    table["row"] = np.arange(len(table), dtype=np.int64)
    table["label_index"] = table["label"].map({c: k for k, c in enumerate(classes)}).astype("int64")
    return table


def images(n: int, classes: list[str] = FOUR, seed: int = 0) -> pd.DataFrame:
    """n distinct images without patient ids (class-folder style)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(classes, size=n)
    return make_index([{"image_id": f"{lab}/{i:04d}", "label": lab, "content_hash": f"h{i:04d}"}
                       for i, lab in enumerate(labels)], classes)


def patients(sites: dict[str, int], slices: int = 8, seed: int = 0) -> pd.DataFrame:
    """Patients (count per site) with `slices` slices each, about a third labelled tumour."""
    rng = np.random.default_rng(seed)
    rows = []
    for site, count in sites.items():
        for p in range(count):
            patient = f"TCGA_{site}_{p:03d}"
            for s in range(slices):
                rows.append({"image_id": f"{patient}_{s}", "patient_id": patient, "site": site,
                             "label": "tumor" if rng.random() < 0.35 else "no_tumor",
                             "content_hash": f"{patient}-{s}"})
    return make_index(rows, BINARY)


def settings(**overrides) -> PartitionSettings:
    base = dict(seed=7, val_fraction=0.15, test_fraction=0.15, hospitals=3, scheme="iid", alpha=0.5)
    return PartitionSettings(**{**base, **overrides})


def assert_groups_whole(table: pd.DataFrame, column: str) -> None:
    """No value of `column` in two splits, nor in two hospitals, nor in two hospitals' test parts."""
    present = table[table[column].notna()]
    assert (present.groupby(column)["split"].nunique() == 1).all()
    assert (present.groupby(column)["hospital"].nunique() == 1).all()
    assert (present.groupby(column)["test_hospital"].nunique() == 1).all()


# --- duplicates ----------------------------------------------------------------------------------

def test_duplicates_keep_first_by_image_id_and_conflicts_drop_every_copy():
    index = make_index([
        {"image_id": "glioma/c", "label": "glioma", "content_hash": "A"},
        {"image_id": "glioma/a", "label": "glioma", "content_hash": "A"},
        {"image_id": "glioma/b", "label": "glioma", "content_hash": "A"},
        {"image_id": "notumor/x", "label": "notumor", "content_hash": "B"},
        {"image_id": "glioma/y", "label": "glioma", "content_hash": "C"},
        {"image_id": "pituitary/y", "label": "pituitary", "content_hash": "C"},
        {"image_id": "pituitary/z", "label": "pituitary", "content_hash": "C"},
    ], FOUR)
    kept, duplicates, conflicts = drop_duplicates(index)
    assert sorted(kept["image_id"]) == ["glioma/a", "notumor/x"]
    assert (duplicates, conflicts) == (2, 3)
    assert kept["row"].is_monotonic_increasing  # array order kept for the trainers


def test_report_counts_duplicates_and_conflicts_and_no_hash_in_two_splits():
    index = images(200)
    extra = index.iloc[:12].copy()  # 10 exact copies and 2 copies with another label
    extra["image_id"] = [f"zz/{i}" for i in range(12)]
    relabel = extra.index[10:]
    extra.loc[relabel, "label_index"] = (extra.loc[relabel, "label_index"] + 1) % 4
    extra.loc[relabel, "label"] = [FOUR[k] for k in extra.loc[relabel, "label_index"]]
    index = pd.concat([index, extra], ignore_index=True)
    index["row"] = np.arange(len(index))
    table, report = partition_index(index, FOUR, settings())
    assert report["duplicates_dropped"] == 10
    assert report["label_conflicts_dropped"] == 4  # both copies of each of the 2 conflicting hashes
    assert len(table) == 200 - 2
    assert table["content_hash"].is_unique
    assert report["leakage_free"]
    assert report["leakage_check"] == {"patients_in_two_splits": 0, "content_hashes_in_two_splits": 0}


def test_leakage_check_counts_patients_and_hashes_in_two_splits():
    table = pd.DataFrame({"patient_id": ["p1", "p1", "p2", None, None],
                          "content_hash": ["a", "b", "c", "d", "d"],
                          "split": ["train", "test", "val", "val", "train"]})
    assert partition.leakage(table) == {"patients_in_two_splits": 1, "content_hashes_in_two_splits": 1}


def test_missing_hash_names_the_image():
    index = images(20)
    index.loc[3, "content_hash"] = None
    with pytest.raises(InputError, match=index.loc[3, "image_id"]):
        partition_index(index, FOUR, settings())


# --- train / val / test --------------------------------------------------------------------------

def test_split_by_image_is_stratified_seeded_and_sized():
    index = images(600)
    table, report = partition_index(index, FOUR, settings(val_fraction=0.2, test_fraction=0.1))
    shares = table["split"].value_counts(normalize=True)
    assert abs(shares["val"] - 0.2) < 0.02 and abs(shares["test"] - 0.1) < 0.02
    overall = table["label"].value_counts(normalize=True)
    for part in ("train", "val", "test"):
        within = table.loc[table["split"] == part, "label"].value_counts(normalize=True)
        assert (within - overall).abs().max() < 0.03, part
    assert report["grouped_by"] == "content_hash"
    assert partition_index(index, FOUR, settings(val_fraction=0.2, test_fraction=0.1))[0].equals(table)
    other = partition_index(index, FOUR, settings(val_fraction=0.2, test_fraction=0.1, seed=8))[0]
    assert not other["split"].equals(table["split"])


def test_split_by_patient_keeps_patients_whole():
    index = patients({"AA": 30, "BB": 20}, slices=10)
    table, report = partition_index(index, BINARY, settings())
    assert_groups_whole(table, "patient_id")
    assert report["grouped_by"] == "patient_id"
    assert report["groups_per_split"]["train"] + report["groups_per_split"]["val"] + \
        report["groups_per_split"]["test"] == 50
    assert report["groups_per_split"]["test"] >= 5  # about 15% of 50 patients
    # site x label stratification: both institutions are represented in val and test
    for part in ("val", "test"):
        assert set(table.loc[table["split"] == part, "site"]) == {"AA", "BB"}


def test_too_few_groups_is_an_input_error():
    with pytest.raises(InputError, match="at least 3"):
        partition_index(images(2), FOUR, settings())


# --- hospitals -----------------------------------------------------------------------------------

def test_iid_deals_groups_evenly():
    index = patients({"AA": 40}, slices=5)
    table, report = partition_index(index, BINARY, settings(scheme="iid", hospitals=4))
    assert_groups_whole(table, "patient_id")
    for part in ("train", "val"):
        per_hospital = table[table["split"] == part].groupby("hospital")["patient_id"].nunique()
        assert list(per_hospital.index) == [0, 1, 2, 3]
        assert per_hospital.max() - per_hospital.min() <= 1
    assert (table.loc[table["split"] == "test", "hospital"] == -1).all()
    assert (table.loc[table["split"] != "test", "hospital"] >= 0).all()


def _skew(table: pd.DataFrame) -> float:
    """Mean total-variation distance between each hospital's train labels and the pooled train labels."""
    train = table[table["split"] == "train"]
    pooled = train["label"].value_counts(normalize=True)
    distances = []
    for _, held in train.groupby("hospital"):
        share = held["label"].value_counts(normalize=True).reindex(pooled.index, fill_value=0)
        distances.append(0.5 * (share - pooled).abs().sum())
    return float(np.mean(distances))


def test_dirichlet_small_alpha_skews_labels_and_large_alpha_does_not():
    index = images(800)
    skewed, report = partition_index(index, FOUR, settings(scheme="dirichlet", alpha=0.3))
    even, _ = partition_index(index, FOUR, settings(scheme="dirichlet", alpha=1000.0))
    assert _skew(skewed) > 0.2 > 0.05 > _skew(even)
    assert all(n > 0 for n in report["hospital_sizes"]["train"].values())
    assert sum(report["hospital_sizes"]["train"].values()) == report["n_per_split"]["train"]


def test_dirichlet_partitions_patients_not_slices():
    index = patients({"AA": 30, "BB": 30}, slices=6)
    table, _ = partition_index(index, BINARY, settings(scheme="dirichlet", alpha=0.5))
    assert_groups_whole(table, "patient_id")
    assert set(table.loc[table["split"] == "train", "hospital"]) == {0, 1, 2}


def test_dirichlet_empty_hospital_names_it_and_suggests_alpha():
    index = images(40, seed=1)
    with pytest.raises(InputError, match=r"hospital \d+ got no training examples.*larger partition\.alpha"):
        partition_index(index, FOUR, settings(scheme="dirichlet", alpha=0.01, hospitals=12))


# --- each hospital's held-out test part ---------------------------------------------------------

def assert_test_parts_partition_the_test_split(table: pd.DataFrame, hospitals: int) -> None:
    """Every test row in at most one hospital's part, no train/val row in any, groups whole."""
    test = table["split"] == "test"
    assert (table.loc[~test, "test_hospital"] == -1).all()
    assert set(table.loc[test, "test_hospital"]) <= set(range(-1, hospitals))
    assert (table.loc[test, "hospital"] == -1).all()  # the common test split is still held out centrally
    groups = partition.group_ids(table[test])  # a patient (or image) in one hospital's test part at most
    assert (table[test].groupby(groups.to_numpy())["test_hospital"].nunique() == 1).all()


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_test_parts_partition_the_test_split_by_patient(scheme):
    index = patients({"AA": 40, "BB": 30}, slices=4)
    table, report = partition_index(index, BINARY, settings(scheme=scheme))
    assert_test_parts_partition_the_test_split(table, 3)
    test = table[table["split"] == "test"]
    # Nothing is taken from train/val: the parts together are the common test split.
    assert sum(report["hospital_sizes"]["test"].values()) + report["test_without_hospital"] == len(test)
    assert report["test_without_hospital"] == 0 and report["hospitals_without_test"] == []
    for k in range(3):
        part = test[test["test_hospital"] == k]
        assert report["hospital_sizes"]["test"][str(k)] == len(part)
        assert sum(report["hospital_label_counts"]["test"][str(k)].values()) == len(part)
    if scheme == "iid":  # dealt evenly, like train and val
        per_hospital = test.groupby("test_hospital")["patient_id"].nunique()
        assert per_hospital.max() - per_hospital.min() <= 1


def test_dirichlet_test_parts_follow_their_hospitals_label_skew_and_are_seeded():
    index = images(1200)
    table, _ = partition_index(index, FOUR, settings(scheme="dirichlet", alpha=0.3))
    assert_test_parts_partition_the_test_split(table, 3)
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]

    def share(rows):
        return rows["label"].value_counts(normalize=True).reindex(FOUR, fill_value=0)

    # The same seed draws the same per-label proportions: each hospital's test part looks like its
    # own train part (total variation distance), far more than like another hospital's.
    for k in range(3):
        own = share(train[train["hospital"] == k])
        distance = {j: 0.5 * (own - share(test[test["test_hospital"] == j])).abs().sum() for j in range(3)}
        assert distance[k] < 0.2 and distance[k] < min(d for j, d in distance.items() if j != k), (k, distance)
    again, _ = partition_index(index, FOUR, settings(scheme="dirichlet", alpha=0.3))
    assert again["test_hospital"].equals(table["test_hospital"])
    other, _ = partition_index(index, FOUR, settings(scheme="dirichlet", alpha=0.3, seed=8))
    assert not other["test_hospital"].equals(table["test_hospital"])


def test_dirichlet_with_fewer_test_groups_than_hospitals_has_no_test_parts():
    # One fold of 40 images is the test split: too few images to draw a share for 5 hospitals. The
    # stage still writes its partition (val and train are large enough); only the test parts are absent.
    index = images(40, seed=2)
    table, report = partition_index(index, FOUR, settings(scheme="dirichlet", alpha=100.0, hospitals=5,
                                                          val_fraction=0.4, test_fraction=0.05))
    test = table["split"] == "test"
    assert 0 < test.sum() < 5 and (table["test_hospital"] == -1).all()
    assert report["hospitals_without_test"] == [0, 1, 2, 3, 4] and report["test_without_hospital"] == test.sum()


def test_site_bin_packing_merges_the_smallest_sites():
    index = patients({"AA": 10, "BB": 6, "CC": 3, "DD": 1}, slices=2)
    groups = partition.group_ids(index)
    assert site_hospitals(index, groups, 3) == {"AA": 0, "BB": 1, "CC": 2, "DD": 2}
    assert site_hospitals(index, groups, 2) == {"AA": 0, "BB": 1, "CC": 1, "DD": 1}
    assert site_hospitals(index, groups, 1) == {"AA": 0, "BB": 0, "CC": 0, "DD": 0}


def test_site_scheme_gives_whole_institutions_and_records_them():
    index = patients({"AA": 20, "BB": 14, "CC": 8, "DD": 6}, slices=4)
    table, report = partition_index(index, BINARY, settings(scheme="site", hospitals=3))
    assert report["sites_per_hospital"] == {"0": ["AA"], "1": ["BB"], "2": ["CC", "DD"]}
    held = table[table["split"] != "test"]
    assert (held.groupby("site")["hospital"].nunique() == 1).all()
    for k, sites in report["sites_per_hospital"].items():
        assert set(held.loc[held["hospital"] == int(k), "site"]) == set(sites)
    # Each hospital's held-out test part is its own institutions' test patients.
    test = table[table["split"] == "test"]
    assert_test_parts_partition_the_test_split(table, 3)
    assert (test["test_hospital"] >= 0).all()
    for k, sites in report["sites_per_hospital"].items():
        assert set(test.loc[test["test_hospital"] == int(k), "site"]) == set(sites)


def test_site_scheme_errors_suggest_other_schemes():
    with pytest.raises(InputError, match="no site.*dirichlet or iid"):
        partition_index(images(60), FOUR, settings(scheme="site"))
    with pytest.raises(InputError, match="only 2 sites.*dirichlet or iid"):
        partition_index(patients({"AA": 10, "BB": 10}), BINARY, settings(scheme="site", hospitals=3))
    mixed = patients({"AA": 10, "BB": 10})
    mixed.loc[5, "site"] = None
    with pytest.raises(InputError, match="have no site"):
        partition_index(mixed, BINARY, settings(scheme="site", hospitals=2))


def test_site_with_no_training_patients_names_the_hospital():
    # EE's single patient can only land in val or test: its hospital has nothing to train on.
    index = patients({"AA": 20, "BB": 20, "CC": 20, "EE": 1}, slices=3)
    # the split does not depend on the scheme: find a seed that holds EE's patient out of train
    ee = index["site"] == "EE"
    seeds = [s for s in range(40) if (partition.split_groups(index, settings(seed=s))[ee] != "train").all()]
    assert seeds, "expected some seed to hold EE's patient out"
    with pytest.raises(InputError, match=r"hospital 3 got no training examples.*fewer partition\.hospitals"):
        partition_index(index, BINARY, settings(scheme="site", hospitals=4, seed=seeds[0]))


@pytest.mark.parametrize("key, value, message", [
    ("val_fraction", 1.5, "partition.val_fraction"),
    ("test_fraction", "a lot", "partition.test_fraction"),
    ("scheme", "random", "partition.scheme"),
    ("hospitals", 0, "partition.hospitals"),
    ("alpha", -1.0, "partition.alpha"),
])
def test_bad_params_name_the_key(key, value, message):
    params = {"partition": {"seed": 1, "val_fraction": 0.1, "test_fraction": 0.1, "hospitals": 3,
                            "scheme": "dirichlet", "alpha": 0.5, key: value}}
    with pytest.raises(InputError, match=message):
        PartitionSettings.from_params(params)


# --- files on disk -------------------------------------------------------------------------------

def _processed(tmp_path: Path, index: pd.DataFrame, classes: list[str]) -> Path:
    """A tiny processed dir: index, classes.json and images whose pixel value is the row number."""
    processed = tmp_path / "processed"
    processed.mkdir()
    index.to_parquet(processed / "index.parquet", index=False)
    pixels = np.broadcast_to(index["row"].to_numpy(np.float32)[:, None, None, None], (len(index), 4, 4, 1))
    np.save(processed / "images.npy", np.ascontiguousarray(pixels))
    (processed / "classes.json").write_text(json.dumps({"classes": classes, "has_masks": False,
                                                        "channels": 1, "size": 4}))
    return processed


def test_run_writes_the_contract_load_split_reads(tmp_path):
    index = patients({"AA": 12, "BB": 9, "CC": 5}, slices=4)
    processed = _processed(tmp_path, index, BINARY)
    out = tmp_path / "partition"
    params = {"partition": {"seed": 3, "val_fraction": 0.15, "test_fraction": 0.15, "hospitals": 2,
                            "scheme": "site", "alpha": 0.5}}
    report = partition.run(params, processed, out)

    assert sorted(p.name for p in out.iterdir()) == ["hospital_0", "hospital_1", "label_counts.png",
                                                     "report.json", "splits.parquet", "summary.json"]
    assert json.loads((out / "report.json").read_text()) == report
    # The headline for `dvc metrics show`: a few numbers, not the report's per-hospital counts.
    assert json.loads((out / "summary.json").read_text()) == {
        "duplicates_dropped": report["duplicates_dropped"], "label_conflicts_dropped": report["label_conflicts_dropped"],
        "n_train": report["n_per_split"]["train"], "n_val": report["n_per_split"]["val"],
        "n_test": report["n_per_split"]["test"]}
    assert (out / "label_counts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    splits = pd.read_parquet(out / "splits.parquet")
    assert list(splits.columns) == ["row", "image_id", "patient_id", "site", "label", "label_index", "split",
                                    "hospital", "test_hospital"]
    assert (splits.loc[splits["split"] == "test", "hospital"] == -1).all()
    assert (splits.loc[splits["split"] != "test", "test_hospital"] == -1).all()
    for k in range(2):
        held = pd.read_parquet(hospital_dir(out, k) / "index.parquet")
        assert list(held.columns) == ["row", "split", "label_index", "image_id"]
        assert set(held["split"]) == {"train", "val"}
        for part in ("train", "val"):
            split = load_split(processed, out, part, hospital=k)
            assert len(split) == report["hospital_sizes"][part][str(k)]
            # the pixel value is the row number: the arrays line up with the index rows
            assert (split.images[:, 0, 0, 0] == held.loc[held["split"] == part, "row"].to_numpy()).all()
    pooled = load_split(processed, out, "train")
    assert len(pooled) == report["n_per_split"]["train"] == sum(report["hospital_sizes"]["train"].values())
    test = load_split(processed, out, "test")
    assert set(pooled.patient_ids).isdisjoint(test.patient_ids)
    # Each hospital's held-out test part: its test_hospital rows, at the positions hospital_test_parts gives.
    parts = hospital_test_parts(out)
    assert sorted(parts) == [0, 1]
    assert sorted(np.concatenate(list(parts.values()))) == list(range(len(test)))  # a partition of the test split
    for k in range(2):
        part = load_split(processed, out, "test", hospital=k)
        rows = splits.loc[(splits["split"] == "test") & (splits["test_hospital"] == k), "row"].to_numpy()
        assert len(part) == report["hospital_sizes"]["test"][str(k)] > 0
        assert (part.images[:, 0, 0, 0] == rows).all()
        assert part.image_ids == [test.image_ids[i] for i in parts[k]]
        assert (part.labels == test.labels[parts[k]]).all()
    with pytest.raises(InputError, match="has no hospital 5"):
        load_split(processed, out, "test", hospital=5)


def test_a_splits_file_without_test_parts_says_to_rerun_the_partition(tmp_path):
    index = images(60)
    processed = _processed(tmp_path, index, FOUR)
    out = tmp_path / "partition"
    partition.run({"partition": {"seed": 3, "val_fraction": 0.15, "test_fraction": 0.15, "hospitals": 2,
                                 "scheme": "iid"}}, processed, out)
    # As the partition stage wrote it before hospitals had test parts.
    pd.read_parquet(out / "splits.parquet").drop(columns="test_hospital").to_parquet(out / "splits.parquet")
    with pytest.raises(InputError, match=r"splits.parquet: has no test_hospital column.*dvc repro partition"):
        load_split(processed, out, "test", hospital=0)
    assert hospital_test_parts(out) is None  # evaluate then makes no per-hospital table
    assert len(load_split(processed, out, "test")) > 0 and len(load_split(processed, out, "train", hospital=0)) > 0


def test_failed_write_keeps_the_previous_partition_and_leaves_no_temp(tmp_path, monkeypatch):
    index = images(60)
    processed = _processed(tmp_path, index, FOUR)
    out = tmp_path / "partition"
    params = {"partition": {"seed": 3, "val_fraction": 0.15, "test_fraction": 0.15, "hospitals": 2,
                            "scheme": "iid"}}
    partition.run(params, processed, out)
    before = (out / "splits.parquet").read_bytes()

    def broken_plot(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(partition, "plot_label_counts", broken_plot)
    with pytest.raises(OSError):
        partition.run({"partition": {**params["partition"], "seed": 4}}, processed, out)
    assert (out / "splits.parquet").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partition", "processed"]

    monkeypatch.undo()
    partition.run({"partition": {**params["partition"], "seed": 4}}, processed, out)  # replaces it
    assert (out / "splits.parquet").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partition", "processed"]


def test_run_without_preprocess_output_says_what_to_run(tmp_path):
    params = {"partition": {"seed": 1, "val_fraction": 0.1, "test_fraction": 0.1, "hospitals": 3,
                            "scheme": "iid"}}
    with pytest.raises(InputError, match="run the preprocess stage"):
        partition.run(params, tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- leave one institution out -------------------------------------------------------------------

@pytest.mark.parametrize("left_out", ["CS", "DU", "HT"])
def test_leave_site_out_keeps_every_patient_of_the_site_out_of_training(tmp_path, left_out):
    index = patients({"CS": 4, "DU": 9, "EZ": 1, "HT": 6}, slices=5, seed=3)
    table, report = partition.leave_site_out(index, BINARY, left_out, seed=5)
    test = table[table["split"] == "test"]
    held = table[table["split"] != "test"]
    assert set(test["site"]) == {left_out} and (test["hospital"] == -1).all()
    # The held-out institution is no hospital's own test data.
    assert (table["test_hospital"] == -1).all()
    assert report["hospitals_without_test"] == [0, 1] and report["test_without_hospital"] == len(test)
    assert len(test) == (index["site"] == left_out).sum()  # all of its patients: nothing dropped
    assert left_out not in set(held["site"]) and set(held["split"]) == {"train", "val"}
    assert set(held["patient_id"]).isdisjoint(test["patient_id"])
    assert_groups_whole(table, "patient_id")
    # Hospitals are the training institutions with 2+ patients; single-patient EZ joins one of them.
    sites = report["sites_per_hospital"]
    assert sorted(s for listed in sites.values() for s in listed) == sorted({"CS", "DU", "EZ", "HT"} - {left_out})
    assert report["hospitals"] == 2 and not any(listed == ["EZ"] for listed in sites.values())
    assert report["left_out_site"] == left_out and report["leakage_free"]
    # Written with the stage's own writer, read back through load_split as every trainer reads it.
    processed = _processed(tmp_path, index, BINARY)
    partition.write_partition(tmp_path / "partition", table, report, BINARY)
    for part in ("train", "val"):
        pooled = load_split(processed, tmp_path / "partition", part)
        assert not any(p.startswith(f"TCGA_{left_out}_") for p in pooled.patient_ids)
        for k in range(report["hospitals"]):
            held_k = load_split(processed, tmp_path / "partition", part, hospital=k)
            assert not any(p.startswith(f"TCGA_{left_out}_") for p in held_k.patient_ids)
    test_split = load_split(processed, tmp_path / "partition", "test")
    assert all(p.startswith(f"TCGA_{left_out}_") for p in test_split.patient_ids)
    # Seeded: the same call gives the same partition.
    again, _ = partition.leave_site_out(index, BINARY, left_out, seed=5)
    assert again.equals(table)


def test_leave_site_out_unknown_site_lists_the_known_ones():
    index = patients({"CS": 3, "DU": 4}, slices=2)
    with pytest.raises(InputError, match=r"site 'XX' is not in the data; known sites: CS \(3 patients\), "
                                         r"DU \(4 patients\)"):
        partition.leave_site_out(index, BINARY, "XX")
    with pytest.raises(InputError, match="needs a site for every image"):
        partition.leave_site_out(images(12, BINARY), BINARY, "CS")


# --- real data -----------------------------------------------------------------------------------

def _real_index(root: Path, layout: str, classes: list[str]) -> pd.DataFrame:
    if not root.is_dir():
        pytest.skip(f"{root} is absent: the shared real datasets are not on this machine")
    from fedbrain.ingest import build_manifest

    manifest = build_manifest(root, layout, classes)
    return make_index(manifest.to_dict("records"), classes)


@pytest.fixture(scope="module")
def four_class_index() -> pd.DataFrame:
    return _real_index(SHARED / "brain-tumor-mri" / "Training", "class_folders", FOUR)


@pytest.fixture(scope="module")
def lgg_index() -> pd.DataFrame:
    return _real_index(SHARED / "lgg-mri-segmentation" / "kaggle_3m", "tcga_lgg", BINARY)


def test_real_four_class_drops_duplicates_and_no_hash_in_two_splits(four_class_index):
    table, report = partition_index(four_class_index, FOUR, settings(scheme="dirichlet", seed=42))
    assert report["duplicates_dropped"] > 0
    assert report["duplicates_dropped"] + report["label_conflicts_dropped"] + len(table) == len(four_class_index)
    assert table["content_hash"].is_unique
    assert (table.groupby("content_hash")["split"].nunique() == 1).all()
    assert report["leakage_free"]
    assert all(n > 0 for n in report["hospital_sizes"]["train"].values())


def test_real_lgg_patients_stay_whole_and_sites_make_hospitals(lgg_index):
    table, report = partition_index(lgg_index, BINARY, settings(scheme="site", seed=42))
    assert_groups_whole(table, "patient_id")
    assert report["leakage_free"] and report["grouped_by"] == "patient_id"
    held = table[table["split"] != "test"]
    # whole institutions: every site lives in exactly one hospital, and the report says which
    assert (held.groupby("site")["hospital"].nunique() == 1).all()
    listed = [site for sites in report["sites_per_hospital"].values() for site in sites]
    assert sorted(listed) == sorted(lgg_index["site"].unique())
    for k, sites in report["sites_per_hospital"].items():
        assert set(held.loc[held["hospital"] == int(k), "site"]) == set(sites)
    assert all(n > 0 for n in report["hospital_sizes"]["train"].values())


def test_real_lgg_dirichlet_keeps_patients_in_one_hospital(lgg_index):
    table, report = partition_index(lgg_index, BINARY, settings(scheme="dirichlet", seed=42))
    assert_groups_whole(table, "patient_id")
    assert report["leakage_free"]
