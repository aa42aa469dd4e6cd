"""validate: a Great Expectations suite over the manifest and per-image statistics.

Every image (and mask) is read once through `fedbrain.imaging`, the same reader every later
stage uses, and its statistics are joined onto the manifest. Two GE validation definitions run
over that: `images` (one row per image: columns, ids, labels, decoding, intensities, mask
shapes, duplicate share) and `classes` (one row per class: enough images).

Writes under `out/`:
  result.json     the GE results: each expectation, its success and unexpected examples
  summary.json    the headline for `dvc metrics show`: success, images, undecodable images
                  (the full summary, with class counts and duplicate groups, is result.json's "summary")
  duplicates.csv  one row per group of images with the same pixel hash
  data_docs/      GE Data Docs HTML (index.html), self-contained: no styles or scripts from the
                  internet (fedbrain.data_docs)
On failure the reports are still written, then InputError names the failing checks and the
first offending files, so the pipeline stops before preprocess.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from fedbrain import data_docs, imaging
from fedbrain.config import get, section
from fedbrain.errors import InputError
from fedbrain.ingest import COLUMNS, NO_TUMOR, TUMOR

# Columns that every manifest row must fill; content_hash, width and height are checked only on
# rows that decode, because ingest leaves them empty for a file it cannot read (and the decode
# check already names that file).
NOT_NULL = ("image_id", "label", "source_path", "slice_index", "layout")
NOT_NULL_WHEN_DECODED = ("content_hash", "width", "height")
STAT_COLUMNS = ("decodes", "decode_error", "min_intensity", "max_intensity", "finite",
                "image_shape", "mask_shape", "mask_shape_matches", "shape_matches_manifest")
# Example rows kept per failing expectation in result.json (GE's partial_unexpected_count).
EXAMPLES = 20
DUPLICATE_GROUPS_IN_RESULT = 10
# summary.json, a DVC metrics file: one column each in `dvc metrics show`, so only the headline
# (the duplicates partition drops are its own summary.json's).
HEADLINE = ("success", "n_images", "n_undecodable")


def run(params: dict, manifest: Path, out: Path) -> dict:
    checks = section(params, "validate")
    min_per_class = get(checks, "min_images_per_class", int, "validate")
    max_duplicates = get(checks, "max_duplicate_fraction", float, "validate")
    if min_per_class < 0:
        raise InputError(f"params.yaml: 'validate.min_images_per_class' is {min_per_class}; expected 0 or more")
    if not 0.0 <= max_duplicates <= 1.0:
        raise InputError(f"params.yaml: 'validate.max_duplicate_fraction' is {max_duplicates}; "
                         "expected a share between 0 and 1")
    manifest, out = Path(manifest), Path(out)
    if not manifest.is_file():
        raise InputError(f"{manifest}: manifest not found; run the ingest stage first (dvc repro ingest)")
    try:
        table = pd.read_parquet(manifest).reset_index(drop=True)  # the join below aligns on a 0..n-1 index
    except Exception as exc:  # pyarrow raises several types for a truncated or foreign file
        raise InputError(f"{manifest}: cannot read the manifest ({exc}); re-run the ingest stage") from exc

    out.mkdir(parents=True, exist_ok=True)
    # A stale summary from an earlier run must not outlive a run that fails or crashes.
    (out / "summary.json").unlink(missing_ok=True)
    tmp = out / ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    labels = allowed_labels(params, table)
    images = table.join(image_statistics(table)) if "source_path" in table else table
    classes = class_counts(table, labels)
    results = run_suites(images, classes, labels, min_per_class, max_duplicates, tmp / "data_docs")
    duplicates = duplicate_groups(table)
    failures = describe_failures(results["expectations"], images, classes, min_per_class, max_duplicates)
    results["failures"] = failures
    results["duplicates"] = {"n_groups": len(duplicates),
                             "first_groups": duplicates.head(DUPLICATE_GROUPS_IN_RESULT).to_dict("records")}
    summary = summarise(images, classes, duplicates, results["success"])
    results["summary"] = summary

    _write_json(tmp / "result.json", results)
    duplicates.to_csv(tmp / "duplicates.csv", index=False)
    _write_json(tmp / "summary.json", headline(summary))
    _publish(tmp, out)

    print(f"validate: {summary['n_images']} images, {summary['n_classes']} classes, "
          f"{summary['n_duplicate_rows']} duplicate rows, {summary['n_undecodable']} undecodable; "
          f"{'passed' if summary['success'] else 'FAILED'} -> {out}", file=sys.stderr)
    if not summary["success"]:
        raise InputError(f"validation failed: {'; '.join(failures)}; see {out / 'result.json'}")
    return summary


def allowed_labels(params: dict, table: pd.DataFrame) -> list[str]:
    """The data.classes for class folders; tumour / no tumour for the mask-labelled layouts."""
    data = section(params, "data")
    layouts = set(table["layout"].dropna()) if "layout" in table else set()
    layouts = layouts or {get(data, "layout", str, "data")}  # a manifest without layouts: trust params
    if layouts & {"class_folders", "auto"}:
        return [str(c) for c in get(data, "classes", list, "data")]
    return [TUMOR, NO_TUMOR]


def image_statistics(table: pd.DataFrame) -> pd.DataFrame:
    """Read every image (and mask) once; one row of statistics per manifest row."""
    slices = table["slice_index"] if "slice_index" in table else pd.Series(-1, index=table.index)
    masks = table["mask_path"] if "mask_path" in table else pd.Series(None, index=table.index, dtype=object)
    widths = table["width"] if "width" in table else pd.Series(pd.NA, index=table.index)
    heights = table["height"] if "height" in table else pd.Series(pd.NA, index=table.index)
    rows = [
        _measure(source, int(k), mask, width, height)
        for source, k, mask, width, height in tqdm(
            zip(table["source_path"], slices, masks, widths, heights), total=len(table),
            desc="validate", unit="img", mininterval=1.0, file=sys.stderr)
    ]
    stats = pd.DataFrame(rows, index=table.index, columns=list(STAT_COLUMNS))
    for column in ("finite", "mask_shape_matches", "shape_matches_manifest"):
        stats[column] = stats[column].astype("boolean")  # null = not applicable (no pixels or no mask)
    return stats


def _measure(source, slice_index: int, mask_path, width, height) -> dict:
    stats = dict.fromkeys(STAT_COLUMNS)
    stats.update(decodes=False, min_intensity=math.nan, max_intensity=math.nan)
    if not isinstance(source, str) or not source:
        stats["decode_error"] = "no source_path"
        return stats
    try:
        pixels = imaging.read_image(source, slice_index)
    except Exception as exc:  # any failure to read is a finding to report, not a crash
        stats["decode_error"] = _reason(exc, source)
        return stats
    with np.errstate(invalid="ignore"):
        stats.update(min_intensity=float(np.min(pixels)), max_intensity=float(np.max(pixels)))
    stats["finite"] = bool(np.isfinite(pixels).all())
    stats["image_shape"] = "x".join(map(str, pixels.shape[:2]))
    if not (pd.isna(width) or pd.isna(height)):
        stats["shape_matches_manifest"] = pixels.shape[:2] == (int(height), int(width))
    if isinstance(mask_path, str) and mask_path:
        try:
            mask = imaging.read_mask(mask_path, slice_index)
        except Exception as exc:
            stats["decode_error"] = f"mask {mask_path}: {_reason(exc, mask_path)}"
            return stats
        stats["mask_shape"] = "x".join(map(str, mask.shape[:2]))
        stats["mask_shape_matches"] = mask.shape[:2] == pixels.shape[:2]
    stats["decodes"] = True
    return stats


def _reason(exc: Exception, path: str) -> str:
    """The reader's message without the leading path (the report shows the path beside it)."""
    message = str(exc) or exc.__class__.__name__
    return message[len(path) + 2:] if message.startswith(f"{path}: ") else message


def class_counts(table: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Images per allowed class, zero for a class with none (a class nobody can learn)."""
    counts = table["label"].value_counts() if "label" in table else pd.Series(dtype="int64")
    return pd.DataFrame({"label": labels, "n_images": [int(counts.get(c, 0)) for c in labels]})


def duplicate_groups(table: pd.DataFrame) -> pd.DataFrame:
    """One row per pixel hash held by more than one image, largest groups first."""
    columns = ["content_hash", "n_copies", "labels", "image_ids"]
    if not {"content_hash", "image_id", "label"} <= set(table.columns):
        return pd.DataFrame(columns=columns)
    hashed = table.dropna(subset=["content_hash"])
    shared = hashed[hashed.duplicated("content_hash", keep=False)]
    groups = shared.groupby("content_hash", sort=False).agg(
        n_copies=("image_id", "size"),
        labels=("label", lambda s: ";".join(sorted(set(s.dropna().astype(str))))),
        image_ids=("image_id", lambda s: ";".join(s.astype(str))))
    groups = groups.reset_index().sort_values(["n_copies", "image_ids"], ascending=[False, True])
    return groups[columns].reset_index(drop=True)


# --- Great Expectations ------------------------------------------------------------------


def _images_suite(gx, labels: list[str], max_duplicates: float):
    from great_expectations.expectations.row_conditions import Column

    e = gx.expectations
    decoded = Column("decodes") == True  # noqa: E712 (a GE condition, not a Python comparison)
    suite = gx.ExpectationSuite(name="images")
    suite.add_expectation(e.ExpectTableRowCountToBeBetween(
        min_value=1, meta={"check": "rows"}, description="the manifest has at least one image"))
    for column in COLUMNS:
        suite.add_expectation(e.ExpectColumnToExist(
            column=column, meta={"check": "column"}, description=f"the manifest has column {column}"))
    for column in NOT_NULL:
        suite.add_expectation(e.ExpectColumnValuesToNotBeNull(
            column=column, meta={"check": "not_null"}, description=f"every image has a value for {column}"))
    for column in NOT_NULL_WHEN_DECODED:
        suite.add_expectation(e.ExpectColumnValuesToNotBeNull(
            column=column, row_condition=decoded, meta={"check": "not_null"},
            description=f"every image that decodes has a value for {column}"))
    suite.add_expectation(e.ExpectColumnValuesToBeUnique(
        column="image_id", meta={"check": "unique_id"}, description="image ids are unique"))
    suite.add_expectation(e.ExpectColumnValuesToBeInSet(
        column="label", value_set=labels, meta={"check": "label"},
        description=f"labels are among {', '.join(labels)}"))
    suite.add_expectation(e.ExpectColumnValuesToBeNull(
        column="decode_error", meta={"check": "decodes"}, description="every image and mask file decodes"))
    suite.add_expectation(e.ExpectColumnValuesToBeInSet(
        column="finite", value_set=[True], meta={"check": "finite"},
        description="intensities are finite (no NaN or infinity)"))
    suite.add_expectation(e.ExpectColumnValuesToBeInSet(
        column="mask_shape_matches", value_set=[True], meta={"check": "mask_shape"},
        description="each mask has the shape of its image"))
    suite.add_expectation(e.ExpectColumnValuesToBeInSet(
        column="shape_matches_manifest", value_set=[True], meta={"check": "manifest_shape"},
        description="decoded sizes equal the manifest's width and height"))
    # Share of duplicate rows = 1 - unique hashes / rows, so "at most f duplicates" is
    # "at least 1 - f of the hashes unique". Partition drops the extra copies later.
    suite.add_expectation(e.ExpectColumnProportionOfUniqueValuesToBeBetween(
        column="content_hash", min_value=round(1.0 - max_duplicates, 12), meta={"check": "duplicates"},
        description=f"at most {max_duplicates:.0%} of the images are exact duplicates"))
    return suite


def _classes_suite(gx, min_per_class: int):
    suite = gx.ExpectationSuite(name="classes")
    suite.add_expectation(gx.expectations.ExpectColumnValuesToBeBetween(
        column="n_images", min_value=min_per_class, meta={"check": "class_size"},
        description=f"every class has at least {min_per_class} images"))
    return suite


def run_suites(images: pd.DataFrame, classes: pd.DataFrame, labels: list[str], min_per_class: int,
               max_duplicates: float, docs_dir: Path) -> dict:
    """Run both suites in an in-memory GE context; Data Docs go to `docs_dir`."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig, InMemoryStoreBackendDefaults, ProgressBarsConfig)

    # In memory: nothing to keep between runs but the reports. The one Data Docs site lives in
    # the stage's output; no usage statistics from a pipeline stage; our own bar covers the
    # slow part (reading), so GE's per-metric bars stay off.
    context = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={"local_site": {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(Path(docs_dir).resolve())},  # GE needs it absolute
        }},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False)))
    source = context.data_sources.add_pandas("fedbrain")
    runs = [("images", images, _images_suite(gx, labels, max_duplicates),
             [c for c in ("image_id", "source_path") if c in images]),
            ("classes", classes, _classes_suite(gx, min_per_class), ["label"])]
    validations = []
    for name, frame, suite, index_columns in runs:
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=context.suites.add(suite)))
        # One definition per table: a Checkpoint passes the same dataframe to all of its
        # definitions, and the two suites read different tables.
        validations.append(definition.run(
            batch_parameters={"dataframe": frame},
            result_format={"result_format": "SUMMARY", "partial_unexpected_count": EXAMPLES,
                           "unexpected_index_column_names": index_columns or None}))
    context.build_data_docs(site_names=["local_site"])
    data_docs.make_offline(docs_dir)  # GE's pages load their styles and scripts from CDNs

    expectations = []
    for name, validation in zip(("images", "classes"), validations):
        for result in validation.results:
            config = result.expectation_config
            described = result.describe_dict()
            kwargs = {k: v for k, v in described["kwargs"].items() if k != "batch_id"}
            expectations.append({
                "suite": name, "check": config.meta.get("check"), "description": config.description,
                "expectation_type": described["expectation_type"], "kwargs": kwargs,
                "success": bool(result.success), "result": described["result"],
                "exception": _exception_message(result.exception_info or {})})
    return {"success": all(v.success for v in validations),
            "statistics": {name: v.describe_dict()["statistics"] for name, v in zip(("images", "classes"), validations)},
            "expectations": expectations}


def _exception_message(info: dict) -> str | None:
    """The first line of the error GE caught while checking, if any (no tracebacks in reports).

    GE keeps one {raised_exception, exception_message} entry per expectation, or one per
    metric id when a metric failed to compute.
    """
    entries = [info] + [v for v in info.values() if isinstance(v, dict)]
    for entry in entries:
        if entry.get("raised_exception"):
            return str(entry.get("exception_message") or "raised an exception").strip().splitlines()[0]
    return None


# --- messages and summary ----------------------------------------------------------------


def describe_failures(expectations: list[dict], images: pd.DataFrame, classes: pd.DataFrame,
                      min_per_class: int, max_duplicates: float) -> list[str]:
    """Readable phrases for the failed expectations, the most fundamental first."""
    failed = [r for r in expectations if not r["success"]]
    missing = [r["kwargs"]["column"] for r in failed if r["check"] == "column"]
    if missing:
        # Checks on a missing column fail as a consequence; the missing columns are the news.
        return [f"the manifest lacks column(s) {', '.join(missing)} (re-run the ingest stage)"]
    if not len(images):
        return ["the manifest has no images"]
    failed.sort(key=lambda r: r["check"] != "decodes")  # unreadable files first: they explain the rest
    return [describe_failure(r, images, classes, min_per_class, max_duplicates) for r in failed]


def describe_failure(result: dict, images: pd.DataFrame, classes: pd.DataFrame,
                     min_per_class: int, max_duplicates: float) -> str:
    """One phrase naming a failed expectation and its first offending file."""
    check, details, column = result["check"], result["result"], result["kwargs"].get("column")
    if result["exception"]:
        return f"'{result['description']}' could not be checked ({result['exception']})"
    if check == "duplicates":
        observed = details.get("observed_value")
        share = 1.0 - observed if isinstance(observed, (int, float)) else math.nan
        return (f"{share:.1%} of the images are exact duplicates, more than validate.max_duplicate_fraction "
                f"{max_duplicates} (groups in duplicates.csv)")
    if check == "class_size":
        small = classes[classes["n_images"] < min_per_class]
        listed = ", ".join(f"{r.label} has {r.n_images}" for r in small.itertuples())
        return f"too few images per class ({listed}; validate.min_images_per_class is {min_per_class})"
    count, total = details.get("unexpected_count", 0), details.get("element_count", len(images))
    first = _first_offender(check, details, images)
    if check == "not_null":
        what = f"have no {column}"
    elif check == "label":
        what = f"have a label outside {', '.join(map(str, result['kwargs'].get('value_set', [])))}"
    else:
        what = {"unique_id": "share an image_id with another row",
                "decodes": "do not decode",
                "finite": "have NaN or infinite intensities",
                "mask_shape": "have a mask whose shape differs from the image",
                "manifest_shape": "differ in size from the manifest (re-run ingest)",
                }.get(check, f"fail '{result['description']}'")
    return f"{count} of {total} images {what}" + (f" (first: {first})" if first else "")


def _first_offender(check: str, details: dict, images: pd.DataFrame) -> str | None:
    examples = details.get("partial_unexpected_index_list") or []
    if not examples:
        return None
    example = examples[0]
    if "image_id" in example and "image_id" in images:
        row = images.loc[images["image_id"] == example["image_id"]].iloc[0]
    else:
        return ", ".join(f"{k}={v}" for k, v in example.items())
    path = row.get("source_path", row["image_id"])
    if isinstance(path, str) and int(row.get("slice_index", -1)) >= 0:
        # A multi-modal slice names one volume per channel: the first and the slice suffice.
        path = f"{path.split(imaging.MODALITY_SEPARATOR)[0]} slice {int(row['slice_index'])}"
    if check == "decodes":
        return f"{path}: {row['decode_error']}"
    if check == "label":
        return f"{path}: label {row['label']!r}"
    if check == "mask_shape":
        return f"{row['mask_path']}: mask {row['mask_shape']} vs image {row['image_shape']}"
    if check == "manifest_shape":
        return f"{path}: decoded {row['image_shape']} vs manifest {row['height']}x{row['width']}"
    return str(path)


def summarise(images: pd.DataFrame, classes: pd.DataFrame, duplicates: pd.DataFrame, success: bool) -> dict:
    decodes = images["decodes"] if "decodes" in images else pd.Series(dtype=bool)
    return {
        "success": bool(success),
        "n_images": int(len(images)),
        "n_classes": int((classes["n_images"] > 0).sum()),
        "class_counts": {r.label: int(r.n_images) for r in classes.itertuples()},
        "n_undecodable": int((~decodes.astype(bool)).sum()),
        # Extra copies: the rows partition drops when it keeps one image per pixel hash.
        "n_duplicate_rows": int(duplicates["n_copies"].sum() - len(duplicates)),
        "n_duplicate_groups": int(len(duplicates)),
        "n_cross_label_duplicate_groups": int(duplicates["labels"].str.contains(";").sum()),
    }


def headline(summary: dict) -> dict:
    """summary.json: the figures of ``summarise`` that `dvc metrics show` lists."""
    return {key: summary[key] for key in HEADLINE}


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished reports into `out`, summary last, so a crash leaves no summary at all."""
    for name in ("result.json", "duplicates.csv"):
        os.replace(tmp / name, out / name)
    shutil.rmtree(out / "data_docs", ignore_errors=True)
    if (tmp / "data_docs").is_dir():
        os.replace(tmp / "data_docs", out / "data_docs")
    os.replace(tmp / "summary.json", out / "summary.json")
    shutil.rmtree(tmp, ignore_errors=True)
