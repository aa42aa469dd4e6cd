"""partition: a leakage-free train/val/test split, then the train and val parts across hospitals.

Steps (each a pure function over the index DataFrame, so tests need no image arrays):
1. `drop_duplicates`: one row per content hash. Copies with the same label are redundant (keep the
   first by image_id); copies with different labels are label conflicts (drop every copy: no one
   can say which label is right).
2. `split_groups`: train/val/test by *group*: the patient where a patient id exists, otherwise the
   image itself (its content hash, unique after step 1), so no patient and no pixel-identical image
   is in two splits. Stratified by label (site x label when every image has a site) with
   scikit-learn: the groups are dealt into 20 folds of about 5% each (StratifiedGroupKFold balances
   the *slice* labels of each fold while keeping each patient whole), and val and test take whole
   folds, so the fractions are rounded to 5%.
3. `assign_hospitals`: the train part, and separately the val part, across hospitals, again by
   group (a patient is never split across hospitals):
     iid        seeded shuffle of the groups, dealt evenly;
     dirichlet  flwr-datasets' DirichletPartitioner over the groups' labels (label skew, alpha);
     site       whole real institutions per hospital (several small sites merged, recorded).
   A hospital's val part comes from the same scheme as its train part (same site mapping; for
   dirichlet the same seed, so the per-label proportions drawn are the same unless flwr had to
   redraw the train part), so each hospital validates on data like its own.
   The test split stays one common held-out split (``hospital`` -1), and is also dealt, by the same
   scheme, into one held-out test part per hospital (``test_hospital``): a partition of the test
   split, groups whole, so a hospital's own model can be scored on data like its own (evaluate's
   personalization table). Test rows no hospital takes (too few test groups for dirichlet, or
   `leave_site_out`'s held-out institution) have ``test_hospital`` -1.

`leave_site_out` builds another partition of the same shape for benchmarks: one institution's
patients all test, the others' train/val across hospitals by site (bench/segmenter_sites.py).

Output contract: see `fedbrain.dataset` (`load_split` reads what `write_partition` writes).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedbrain.config import get, section
from fedbrain.dataset import SPLITS, hospital_dir, load_classes, replaced_folder
from fedbrain.errors import InputError


SCHEMES = ("site", "dirichlet", "iid")
REQUIRED = ("row", "image_id", "patient_id", "site", "label", "label_index", "content_hash")
# Split granularity: the groups are dealt into this many stratified folds (about 5% each) and
# val/test take whole folds; fewer folds when there are fewer groups.
FOLDS = 20
TEST_HOSPITAL = -1  # `hospital` of a test row: the common test split is held out centrally
NO_TEST_PART = -1  # `test_hospital` of a train/val row, and of a test row no hospital's test part takes
COLUMNS = ["row", "image_id", "patient_id", "site", "label", "label_index", "split", "hospital", "test_hospital"]


@dataclass(frozen=True)
class PartitionSettings:
    seed: int = 42
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    hospitals: int = 3
    scheme: str = "dirichlet"
    alpha: float = 0.5

    @classmethod
    def from_params(cls, params: dict) -> PartitionSettings:
        sec = section(params, "partition")
        where = "partition"
        settings = cls(
            seed=get(sec, "seed", int, where),
            val_fraction=get(sec, "val_fraction", float, where),
            test_fraction=get(sec, "test_fraction", float, where),
            hospitals=get(sec, "hospitals", int, where),
            scheme=get(sec, "scheme", str, where, choices=SCHEMES),
            alpha=get(sec, "alpha", float, where, default=cls.alpha),
        )
        settings.check()
        return settings

    def check(self) -> None:
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                raise InputError(f"params.yaml: 'partition.{key}' is {value}; use a fraction between 0 and 1")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise InputError("params.yaml: 'partition.val_fraction' + 'partition.test_fraction' leave nothing "
                             "for training; lower them")
        if self.hospitals < 1:
            raise InputError(f"params.yaml: 'partition.hospitals' is {self.hospitals}; use 1 or more")
        if self.scheme not in SCHEMES:
            raise InputError(f"params.yaml: 'partition.scheme' is {self.scheme!r}; "
                             f"expected one of {', '.join(SCHEMES)}")
        if self.scheme == "dirichlet" and not self.alpha > 0:
            raise InputError(f"params.yaml: 'partition.alpha' is {self.alpha}; use a positive number "
                             "(smaller = more label skew, e.g. 0.5)")


# --- 1. duplicates -------------------------------------------------------------------------------

def drop_duplicates(index: pd.DataFrame) -> tuple[pd.DataFrame, int, int]:
    """(index with one row per content hash, duplicates dropped, label-conflict rows dropped)."""
    if index["content_hash"].isna().any():
        first = index.loc[index["content_hash"].isna(), "image_id"].iloc[0]
        raise InputError(f"image {first}: has no content hash (it did not decode); fix or remove it and "
                         "re-run ingest and validate")
    ordered = index.sort_values("image_id", kind="stable")
    labels_per_hash = ordered.groupby("content_hash", sort=False)["label"].transform("nunique")
    conflict = labels_per_hash > 1
    clean = ordered[~conflict]
    redundant = clean["content_hash"].duplicated(keep="first")
    kept = clean[~redundant].sort_values("row", kind="stable").reset_index(drop=True)
    return kept, int(redundant.sum()), int(conflict.sum())


# --- 2. train / val / test -----------------------------------------------------------------------

def group_ids(index: pd.DataFrame) -> pd.Series:
    """The unit that never crosses a split or hospital: the patient, else the image (its hash)."""
    by_image = "hash:" + index["content_hash"].astype(str)
    patient = index["patient_id"]
    return ("patient:" + patient.astype(str)).where(patient.notna(), by_image).rename("group")


def group_labels(index: pd.DataFrame, groups: pd.Series) -> pd.Series:
    """One label_index per group: the majority of its slices (ties -> lower class index).

    Used where a whole group gets one label: Dirichlet label skew across hospitals. For an image
    group it is simply the image's label.
    """
    counts = pd.crosstab(groups.to_numpy(), index["label_index"].to_numpy())
    return counts.idxmax(axis=1).astype("int64")  # idxmax takes the first (lowest) column on ties


def stratification_labels(index: pd.DataFrame) -> np.ndarray:
    """Label per row, joined with the site when every row has one.

    Stratifying on site x label gives every institution its share of val and test patients, so
    with the site scheme each hospital also gets a local validation set (on TCGA-LGG, label
    alone left the smallest merged hospital without any val patient).
    """
    key = index["label_index"].astype(str)
    if index["site"].notna().all():
        key = index["site"].astype(str) + "|" + key
    return pd.factorize(key, sort=True)[0]


def split_groups(index: pd.DataFrame, settings: PartitionSettings) -> pd.Series:
    """'train' | 'val' | 'test' per row; groups stay whole, labels stratified, seeded."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    groups = group_ids(index).to_numpy()
    labels = stratification_labels(index)
    n_groups = len(set(groups))
    if n_groups < 3:
        raise InputError(f"only {n_groups} patients/images after removing duplicates; train/val/test "
                         "needs at least 3 (use a larger dataset)")
    one_per_group = len(groups) == n_groups
    # StratifiedKFold refuses more folds than the largest stratum has members
    n_folds = min(FOLDS, n_groups, int(np.bincount(labels).max()) if one_per_group else FOLDS)
    n_test = max(1, round(settings.test_fraction * n_folds))
    n_val = max(1, round(settings.val_fraction * n_folds))
    if n_test + n_val >= n_folds:
        raise InputError(f"only {n_groups} patients/images: partition.val_fraction and partition.test_fraction "
                         "leave no training data; lower them or use a larger dataset")
    if one_per_group:
        # One image per group: plain stratification is equivalent and much faster than the
        # group-aware search (14 s vs milliseconds for 5.5k images).
        folds = StratifiedKFold(n_folds, shuffle=True, random_state=settings.seed)
    else:
        folds = StratifiedGroupKFold(n_folds, shuffle=True, random_state=settings.seed)
    split = np.full(len(index), "train", dtype=object)
    with warnings.catch_warnings():
        # "The least populated class has only k members": a rare class cannot be in every fold;
        # the split stays valid (groups whole), only less evenly stratified for that class.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        grouped = groups if isinstance(folds, StratifiedGroupKFold) else None  # StratifiedKFold warns on groups
        for k, (_, fold) in enumerate(folds.split(np.zeros(len(labels)), labels, grouped)):
            if k < n_test:
                split[fold] = "test"
            elif k < n_test + n_val:
                split[fold] = "val"
    return pd.Series(split, index=index.index, name="split")


# --- 3. hospitals --------------------------------------------------------------------------------

def iid_hospitals(groups: list[str], hospitals: int, seed: int) -> dict[str, int]:
    """Seeded shuffle of the groups, dealt into `hospitals` near-equal parts."""
    order = np.random.default_rng(seed).permutation(np.asarray(sorted(groups), dtype=object))
    return {g: k for k, part in enumerate(np.array_split(order, hospitals)) for g in part}


def dirichlet_hospitals(groups: pd.DataFrame, hospitals: int, alpha: float, seed: int,
                        min_size: int, part: str = "train") -> dict[str, int]:
    """flwr-datasets' DirichletPartitioner over the groups' labels (`groups`: group, label_index).

    Patients, not slices, are partitioned, so a patient is never split across hospitals.
    `min_size` groups per hospital: flwr redraws up to 10 times to meet it, then we draw once
    more without the minimum so the caller can name the hospital that came out empty.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    if len(groups) < hospitals:
        more = "a larger partition.val_fraction" if part == "val" else "a larger dataset"
        raise InputError(f"only {len(groups)} patients/images in the {part} split to spread over {hospitals} "
                         f"hospitals with the dirichlet scheme; lower partition.hospitals or use {more}")
    table = Dataset.from_pandas(groups[["group", "label_index"]].sort_values("group").reset_index(drop=True),
                                preserve_index=False)

    def draw(minimum: int) -> dict[str, int]:
        partitioner = DirichletPartitioner(num_partitions=hospitals, partition_by="label_index", alpha=alpha,
                                           min_partition_size=minimum, self_balancing=False, seed=seed)
        partitioner.dataset = table
        return {g: k for k in range(hospitals) for g in partitioner.load_partition(k)["group"]}

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
        try:
            return draw(min_size)
        except ValueError:  # "The max number of attempts (10) was reached": reported by the caller
            return draw(0)


def site_hospitals(index: pd.DataFrame, groups: pd.Series, hospitals: int) -> dict[str, int]:
    """Whole institutions per hospital: {site: hospital}.

    More sites than hospitals: greedy largest-first bin packing on the number of patients
    (each site, biggest first, joins the hospital with the fewest patients so far), so the
    smallest sites are the ones merged.
    """
    sites = index["site"]
    if sites.isna().all():
        raise InputError("partition.scheme is 'site' but the dataset has no site/institution column; "
                         "use partition.scheme: dirichlet or iid")
    if sites.isna().any():
        first = index.loc[sites.isna(), "image_id"].iloc[0]
        raise InputError(f"partition.scheme is 'site' but {int(sites.isna().sum())} images have no site "
                         f"(first: {first}); use partition.scheme: dirichlet or iid")
    size = groups.groupby(sites.to_numpy()).nunique()
    if len(size) < hospitals:
        raise InputError(f"partition.scheme is 'site' but the dataset has only {len(size)} sites "
                         f"({', '.join(sorted(size.index))}) for {hospitals} hospitals; lower partition.hospitals "
                         f"to {len(size)} or use partition.scheme: dirichlet or iid")
    load = [0] * hospitals
    mapping: dict[str, int] = {}
    for site, n in sorted(size.items(), key=lambda item: (-item[1], item[0])):
        k = min(range(hospitals), key=lambda h: (load[h], h))
        mapping[site] = k
        load[k] += int(n)
    return mapping


def _part_assignment(index: pd.DataFrame, groups: pd.Series, labels: pd.Series, rows: pd.Series, part: str,
                     settings: PartitionSettings, mapping: dict[str, int]) -> dict[str, int]:
    """{group: hospital} for the groups of one split part, by the settings' scheme."""
    part_groups = groups[rows]
    if settings.scheme == "site":
        return dict(zip(part_groups, index.loc[rows, "site"].map(mapping)))
    if settings.scheme == "iid":
        return iid_hospitals(part_groups.unique().tolist(), settings.hospitals, settings.seed)
    unique = pd.DataFrame({"group": part_groups.unique()})
    if part == "test" and len(unique) < settings.hospitals:
        # Too few test groups to draw a share for every hospital: no test parts. The common test
        # split is unaffected, and it is only evaluate's per-hospital table that needs them; failing
        # the stage for it would stop a pipeline that trains and evaluates fine.
        return {}
    unique["label_index"] = labels.loc[unique["group"]].to_numpy()
    return dirichlet_hospitals(unique, settings.hospitals, settings.alpha, settings.seed,
                               min_size=1 if part == "train" else 0, part=part)


def assign_hospitals(index: pd.DataFrame, split: pd.Series, settings: PartitionSettings
                     ) -> tuple[pd.Series, pd.Series, dict[int, list[str]]]:
    """(hospital per row, -1 for test; test_hospital per row: the hospital whose held-out test part a
    test row is in, -1 for train/val rows and test rows no hospital takes; for the site scheme, the
    sites that make each hospital).

    Every part is dealt by the same scheme (site mapping; iid and dirichlet with the same seed, the
    test part with min_size 0 as val), so a hospital's val and test parts look like its train part.
    """
    groups = group_ids(index)
    hospital = pd.Series(TEST_HOSPITAL, index=index.index, name="hospital", dtype="int64")
    test_hospital = pd.Series(NO_TEST_PART, index=index.index, name="test_hospital", dtype="int64")
    sites: dict[int, list[str]] = {}
    mapping: dict[str, int] = {}
    if settings.scheme == "site":
        mapping = site_hospitals(index, groups, settings.hospitals)
        sites = {k: sorted(s for s, h in mapping.items() if h == k) for k in range(settings.hospitals)}
    labels = group_labels(index, groups)
    for part in SPLITS:
        rows = split == part
        assignment = _part_assignment(index, groups, labels, rows, part, settings, mapping)
        if part == "test":  # a test row no hospital takes stays in the common test split only
            test_hospital[rows] = groups[rows].map(assignment).fillna(NO_TEST_PART).astype("int64")
            continue
        hospital[rows] = groups[rows].map(assignment).astype("int64")
        if part == "train":  # before val, so the error names the real problem
            _check_training_examples(hospital[rows], settings)
    return hospital, test_hospital, sites


def _check_training_examples(train_hospitals: pd.Series, settings: PartitionSettings) -> None:
    counts = train_hospitals.value_counts()
    for k in range(settings.hospitals):
        if counts.get(k, 0) == 0:
            hint = {"dirichlet": f"a larger partition.alpha (now {settings.alpha}) or fewer partition.hospitals",
                    "iid": "fewer partition.hospitals or a larger dataset",
                    "site": "fewer partition.hospitals (its sites' patients all fell in val/test)"}[settings.scheme]
            raise InputError(f"partition: hospital {k} got no training examples (scheme {settings.scheme}); use {hint}")


# --- checks and report ---------------------------------------------------------------------------

def leakage(table: pd.DataFrame) -> dict[str, int]:
    """How many patient ids and content hashes appear in more than one split (0 and 0 = leakage-free)."""
    out = {}
    for column, name in (("patient_id", "patients"), ("content_hash", "content_hashes")):
        present = table[table[column].notna()]
        out[f"{name}_in_two_splits"] = int((present.groupby(column)["split"].nunique() > 1).sum())
    return out


def _label_counts(table: pd.DataFrame, classes: list[str]) -> dict[str, int]:
    counts = table["label_index"].value_counts()
    return {name: int(counts.get(k, 0)) for k, name in enumerate(classes)}


def partition_index(index: pd.DataFrame, classes: list[str], settings: PartitionSettings
                    ) -> tuple[pd.DataFrame, dict]:
    """The whole stage on a DataFrame: (split table with split/hospital per kept row, report)."""
    settings.check()
    _check_index(index, classes)
    kept, duplicates, conflicts = drop_duplicates(index)
    kept["split"] = split_groups(kept, settings)
    kept["hospital"], kept["test_hospital"], sites = assign_hospitals(kept, kept["split"], settings)
    return checked_report(index, kept, classes, settings, sites, duplicates, conflicts)


def _check_index(index: pd.DataFrame, classes: list[str]) -> None:
    missing = [c for c in REQUIRED if c not in index.columns]
    if missing:
        raise InputError(f"index is missing columns {', '.join(missing)}; re-run the preprocess stage")
    bad = index[(index["label_index"] < 0) | (index["label_index"] >= len(classes))]
    if len(bad):
        raise InputError(f"image {bad['image_id'].iloc[0]}: label_index {bad['label_index'].iloc[0]} is not one of "
                         f"the {len(classes)} classes in classes.json; re-run the preprocess stage")


def checked_report(index: pd.DataFrame, kept: pd.DataFrame, classes: list[str], settings: PartitionSettings,
                   sites: dict[int, list[str]], duplicates: int, conflicts: int) -> tuple[pd.DataFrame, dict]:
    """The split table and report of ``kept`` (split, hospital and test_hospital set), after checking
    that no patient or pixel-identical image is in two splits, two hospitals or two hospitals' test parts."""
    groups = group_ids(kept)
    spread = groups.groupby(kept["split"].to_numpy()).unique()
    seen: set[str] = set()
    for members in spread:  # internal invariant: the splitters keep groups whole
        if seen & set(members):
            raise RuntimeError("partition: a patient/image group landed in two splits (bug in split_groups)")
        seen |= set(members)
    if (groups.groupby(kept["hospital"].to_numpy()).unique().explode().duplicated()).any():
        raise RuntimeError("partition: a patient/image group landed in two hospitals (bug in assign_hospitals)")
    is_test = kept["split"] == "test"
    if (kept.loc[~is_test, "test_hospital"] != NO_TEST_PART).any():
        raise RuntimeError("partition: a train/val row has a test_hospital (bug in assign_hospitals)")
    if (groups[is_test].groupby(kept.loc[is_test, "test_hospital"].to_numpy()).unique().explode().duplicated()).any():
        raise RuntimeError("partition: a patient/image group landed in two hospitals' test parts "
                           "(bug in assign_hospitals)")
    leaks = leakage(kept)
    leakage_free = not any(leaks.values())
    if not leakage_free:
        raise RuntimeError(f"partition: split is not leakage-free ({leaks}); refusing to write it")

    has_patients = kept["patient_id"].notna()
    hospitals = range(settings.hospitals)
    part = {s: kept[kept["split"] == s] for s in SPLITS}
    held = {"train": "hospital", "val": "hospital", "test": "test_hospital"}  # which column says whose a row is
    report = {
        "scheme": settings.scheme,
        "seed": settings.seed,
        "hospitals": settings.hospitals,
        "alpha": settings.alpha if settings.scheme == "dirichlet" else None,
        "settings": asdict(settings),
        "grouped_by": ("patient_id" if has_patients.all() else
                       "content_hash" if not has_patients.any() else "patient_id, else content_hash"),
        "stratified_by": ("site x label" if kept["site"].notna().all() else "label")
                         + " of each slice/image, groups kept whole; dirichlet skews each group's majority label",
        "n_input": int(len(index)),
        "duplicates_dropped": duplicates,
        "label_conflicts_dropped": conflicts,
        "n_per_split": {s: int(len(part[s])) for s in SPLITS},
        "groups_per_split": {s: int(groups[kept["split"] == s].nunique()) for s in SPLITS},
        "fraction_per_split": {s: round(len(part[s]) / len(kept), 4) for s in SPLITS},
        "label_counts": {s: _label_counts(part[s], classes) for s in SPLITS},
        # test: each hospital's held-out test part (test_hospital), a partition of the common test split
        "hospital_label_counts": {
            s: {str(k): _label_counts(part[s][part[s][held[s]] == k], classes) for k in hospitals}
            for s in SPLITS},
        "hospital_sizes": {s: {str(k): int((part[s][held[s]] == k).sum()) for k in hospitals}
                           for s in SPLITS},
        # site scheme: the institutions assigned to each hospital; otherwise the sites that happen
        # to be present in the hospital's data (empty without a site column).
        "sites_per_hospital": {
            str(k): sites.get(k) if settings.scheme == "site" else
            sorted(kept.loc[kept["hospital"] == k, "site"].dropna().astype(str).unique().tolist())
            for k in hospitals},
        "hospitals_without_val": [k for k in hospitals if not (part["val"]["hospital"] == k).any()],
        "hospitals_without_test": [k for k in hospitals if not (part["test"]["test_hospital"] == k).any()],
        "test_without_hospital": int((part["test"]["test_hospital"] == NO_TEST_PART).sum()),
        "leakage_free": leakage_free,
        "leakage_check": leaks,
    }
    table = kept[COLUMNS + ["content_hash"]].sort_values("row", kind="stable").reset_index(drop=True)
    return table, report


# --- files ---------------------------------------------------------------------------------------

def plot_label_counts(report: dict, classes: list[str], path: Path) -> None:
    """Stacked bars: label counts per hospital, train, val and held-out test part side by side."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg canvas

    fig = Figure(figsize=(6 + 1.8 * report["hospitals"], 4.5), layout="constrained")
    axes = fig.subplots(1, len(SPLITS))  # own y scales: val and test are ~5x smaller than train
    names = []
    for k in range(report["hospitals"]):
        sites = report["sites_per_hospital"][str(k)]
        suffix = f"\n({', '.join(sites)})" if report["scheme"] == "site" and sites else ""
        names.append(f"hospital {k}{suffix}")
    colours = [f"C{i % 10}" for i in range(len(classes))]
    for ax, part in zip(axes, SPLITS):
        counts = report["hospital_label_counts"][part]
        bottom = np.zeros(len(names))
        for c, name in enumerate(classes):
            values = np.array([counts[str(k)][name] for k in range(len(names))])
            ax.bar(names, values, bottom=bottom, label=name, color=colours[c])
            bottom += values
        # A test row no hospital takes is still in the common test split: say how many the parts hold.
        of = f" of {report['n_per_split'][part]}" if int(bottom.sum()) != report["n_per_split"][part] else ""
        ax.set_title(f"{'test parts' if part == 'test' else part} ({int(bottom.sum())}{of} images)")
        ax.set_xlabel("hospital")
        ax.tick_params(axis="x", labelsize=8)
    axes[0].set_ylabel("images")
    axes[-1].legend(title="label", fontsize=8)
    detail = f", alpha={report['alpha']}" if report["scheme"] == "dirichlet" else ""
    fig.suptitle(f"Label counts per hospital (scheme {report['scheme']}{detail}, seed {report['seed']})")
    fig.savefig(path, dpi=100)


def headline(report: dict) -> dict:
    """The partition's figures for ``dvc metrics show`` (summary.json); the rest stays in report.json."""
    return {"duplicates_dropped": report["duplicates_dropped"],
            "label_conflicts_dropped": report["label_conflicts_dropped"],
            **{f"n_{split}": report["n_per_split"][split] for split in SPLITS}}


def write_partition(out: Path, table: pd.DataFrame, report: dict, classes: list[str]) -> None:
    """All files into a temp dir next to `out`, then renamed over it: never half-written."""
    with replaced_folder(out) as tmp:
        table[COLUMNS].to_parquet(tmp / "splits.parquet", index=False)
        for k in range(report["hospitals"]):  # train and val only: the test parts stay central (test_hospital)
            held = table[table["hospital"] == k]
            hospital_dir(tmp, k).mkdir()
            held[["row", "split", "label_index", "image_id"]].to_parquet(
                hospital_dir(tmp, k) / "index.parquet", index=False)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "summary.json").write_text(json.dumps(headline(report), indent=2) + "\n")
        plot_label_counts(report, classes, tmp / "label_counts.png")


def run(params: dict, processed: Path, out: Path) -> dict:
    settings = PartitionSettings.from_params(params)
    processed = Path(processed)
    index_path = processed / "index.parquet"
    if not index_path.is_file():
        raise InputError(f"{index_path}: not found; run the preprocess stage first (dvc repro preprocess)")
    index = pd.read_parquet(index_path)
    classes = list(load_classes(processed)["classes"])
    table, report = partition_index(index, classes, settings)
    write_partition(Path(out), table, report, classes)
    n = report["n_per_split"]
    print(f"partition: {report['n_input']} images, {report['duplicates_dropped']} duplicates and "
          f"{report['label_conflicts_dropped']} label conflicts dropped; train {n['train']} / val {n['val']} / "
          f"test {n['test']}; {settings.hospitals} hospitals ({settings.scheme}) -> {out}")
    return report


# --- leave one institution out -------------------------------------------------------------------

def leave_site_out(index: pd.DataFrame, classes: list[str], site: str, seed: int = 42,
                   val_fraction: float = 0.15) -> tuple[pd.DataFrame, dict]:
    """A partition that tests on an institution no model has seen (same table and report as
    `partition_index`, so `write_partition` and every trainer read it unchanged; ``test_hospital`` is
    -1 throughout: the held-out institution is no hospital's own test data).

    Every patient of ``site`` is test. The other institutions' patients are split train/val by
    patient (seeded, stratified by site x label as `split_groups` does), and each institution with
    two or more patients is a hospital; a single-patient one (TCGA-LGG's EZ) cannot hold both a
    train and a val part alone and joins the smallest hospital (the site scheme's bin packing).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    _check_index(index, classes)
    if index["site"].isna().any():
        first = index.loc[index["site"].isna(), "image_id"].iloc[0]
        raise InputError(f"leaving an institution out needs a site for every image; {int(index['site'].isna().sum())} "
                         f"have none (first: {first})")
    patients = group_ids(index).groupby(index["site"].astype(str).to_numpy()).nunique()
    if site not in patients.index:
        known = ", ".join(f"{s} ({n} patients)" for s, n in patients.sort_index().items())
        raise InputError(f"site {site!r} is not in the data; known sites: {known}")
    kept, duplicates, conflicts = drop_duplicates(index)
    held_out = kept["site"].astype(str) == site
    rest = kept[~held_out]
    groups = group_ids(rest).to_numpy()
    n_folds = min(FOLDS, len(set(groups)))
    n_val = max(1, round(val_fraction * n_folds))
    if n_val >= n_folds:
        raise InputError(f"only {n_folds} patients outside site {site}: too few to both train and validate on")
    split = pd.Series("test", index=kept.index, name="split", dtype=object)
    rest_split = np.full(len(rest), "train", dtype=object)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        folds = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
        for k, (_, fold) in enumerate(folds.split(np.zeros(len(rest)), stratification_labels(rest), groups)):
            if k < n_val:
                rest_split[fold] = "val"
    split[~held_out] = rest_split
    training_sites = patients.drop(site)
    settings = PartitionSettings(seed=seed, val_fraction=val_fraction, test_fraction=float(held_out.mean()),
                                 hospitals=max(1, int((training_sites >= 2).sum())), scheme="site")
    hospital = pd.Series(TEST_HOSPITAL, index=kept.index, name="hospital", dtype="int64")
    hospital[~held_out], _, sites = assign_hospitals(rest, split[~held_out], settings)
    # The test split is one institution no hospital is: no hospital has a test part of it.
    kept["split"], kept["hospital"], kept["test_hospital"] = split, hospital, NO_TEST_PART
    table, report = checked_report(index, kept, classes, settings, sites, duplicates, conflicts)
    report["left_out_site"] = site
    report["stratified_by"] = f"site x label among the other sites; all of {site} is test"
    return table, report
