"""validate: the Great Expectations suite passes clean data and names what is wrong otherwise.

Fixtures are a few real image files written with Pillow, ingested by the real ingest stage;
nothing in Great Expectations is mocked.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fedbrain import validate
from fedbrain.errors import InputError
from fedbrain.ingest import build_manifest

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def _params(classes=CLASSES, min_per_class=3, max_duplicates=0.2, layout="auto") -> dict:
    return {"data": {"root": "unused", "layout": layout, "classes": list(classes)},
            "validate": {"min_images_per_class": min_per_class, "max_duplicate_fraction": max_duplicates}}


def _noise(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def _class_folders(root: Path, per_class: int = 4, classes=CLASSES) -> Path:
    """A 4-class dataset of distinct grey-scale JPEGs and PNGs (noise, so no two hash alike)."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            suffix = "png" if k % 2 else "jpg"
            Image.fromarray(_noise(rng, (24, 24))).save(root / name / f"{name}_{k}.{suffix}")
    return root


def _manifest(root: Path, tmp_path: Path, layout="class_folders", classes=CLASSES) -> Path:
    path = tmp_path / "manifest.parquet"
    build_manifest(root, layout, list(classes)).to_parquet(path, index=False)
    return path


def _result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def _failed_checks(out: Path) -> set[str]:
    return {e["check"] for e in _result(out)["expectations"] if not e["success"]}


def test_clean_set_passes_and_writes_every_report(tmp_path):
    root = _class_folders(tmp_path / "raw")
    out = tmp_path / "validation"
    summary = validate.run(_params(), _manifest(root, tmp_path), out)

    assert summary["success"] is True
    assert summary["n_images"] == 16 and summary["n_classes"] == 4
    assert summary["class_counts"] == {name: 4 for name in CLASSES}
    assert summary["n_undecodable"] == 0 and summary["n_duplicate_rows"] == 0
    # summary.json is the headline for `dvc metrics show`; the whole summary is in result.json.
    assert json.loads((out / "summary.json").read_text()) == {
        "success": True, "n_images": 16, "n_undecodable": 0}
    result = _result(out)
    assert result["summary"] == summary
    assert result["success"] is True and result["failures"] == []
    assert {e["check"] for e in result["expectations"]} >= {
        "column", "not_null", "unique_id", "label", "decodes", "finite", "mask_shape", "duplicates", "class_size"}
    assert all(e["success"] for e in result["expectations"])
    index = (out / "data_docs" / "index.html").read_text()
    assert "validations/images/" in index and "validations/classes/" in index
    assert not (out / ".tmp").exists()
    _assert_offline(out / "data_docs")


REMOTE_RESOURCE = re.compile(r"<(?:link|script|img)\b[^>]*\b(?:href|src)\s*=\s*[\"']?(?:https?:)?//", re.I)


def _assert_offline(docs: Path):
    """Every Data Docs page renders without the internet: no remote stylesheet, script or image,
    its own stylesheet inline, and the index's tables drawn in HTML (not left to bootstrap-table)."""
    pages = sorted(docs.rglob("*.html"))
    assert len(pages) >= 5  # index, 2 suites, 2 validation results
    for page in pages:
        text = page.read_text()
        assert not REMOTE_RESOURCE.search(text), page
        assert not re.search(r"url\(\s*['\"]?https?:", text), page
        assert "<script" not in text and "<style>" in text and ".alert-secondary{" in text, page
        for src in re.findall(r"<img\b[^>]*\bsrc=\"([^\"]+)\"", text, re.S):
            assert (page.parent / src).is_file(), (page, src)
    index = (docs / "index.html").read_text()
    links = re.findall(r"<td><a href=\"(validations/[^\"]+\.html)\">", index)
    assert {link.split("/")[1] for link in links} == {"images", "classes"}
    assert all((docs / link).is_file() for link in links)
    assert re.search(r"<th>Status</th>.*fa-check-circle text-success", index, re.S)


def test_corrupt_jpeg_is_named_in_result_and_error(tmp_path):
    root = _class_folders(tmp_path / "raw")
    bad = root / "glioma" / "glioma_bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    out = tmp_path / "validation"
    # A previous successful run's summary must not survive a failed one saying success.
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"success": True}))

    with pytest.raises(InputError) as error:
        validate.run(_params(), _manifest(root, tmp_path), out)

    message = str(error.value)
    assert message.startswith("validation failed: 1 of 17 images do not decode")
    assert str(bad) in message and "result.json" in message
    assert "\n" not in message
    decode = next(e for e in _result(out)["expectations"] if e["check"] == "decodes")
    assert decode["success"] is False and decode["result"]["unexpected_count"] == 1
    assert decode["result"]["partial_unexpected_index_list"][0]["source_path"] == str(bad)
    assert "cannot decode" in decode["result"]["partial_unexpected_list"][0]
    # Decode is the only failure: the empty hash/size of the bad row is not reported twice.
    assert _failed_checks(out) == {"decodes"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success"] is False and summary["n_undecodable"] == 1
    page = next((out / "data_docs" / "validations" / "images").rglob("*.html")).read_text()
    assert "cannot decode image" in page  # the Data Docs page shows the failure too
    _assert_offline(out / "data_docs")
    assert "fa-times text-danger" in (out / "data_docs" / "index.html").read_text()


def test_unknown_label_fails(tmp_path):
    root = _class_folders(tmp_path / "raw")
    manifest = _manifest(root, tmp_path)
    out = tmp_path / "validation"
    # params changed after ingest: "pituitary" is no longer a class.
    with pytest.raises(InputError, match=r"4 of 16 images have a label outside glioma, meningioma, notumor"
                                         r" \(first: .*pituitary_0\.jpg: label 'pituitary'\)"):
        validate.run(_params(classes=CLASSES[:3]), manifest, out)
    label = next(e for e in _result(out)["expectations"] if e["check"] == "label")
    assert label["success"] is False and set(label["result"]["partial_unexpected_list"]) == {"pituitary"}


def test_too_few_images_per_class_fails(tmp_path):
    root = _class_folders(tmp_path / "raw", per_class=3)
    (root / "glioma" / "glioma_2.jpg").unlink()
    manifest = _manifest(root, tmp_path)
    # Exactly the minimum passes; one image short of it fails, naming the class.
    assert validate.run(_params(min_per_class=2), manifest, tmp_path / "ok")["success"] is True
    out = tmp_path / "validation"
    with pytest.raises(InputError, match=r"too few images per class \(glioma has 2; "
                                         r"validate\.min_images_per_class is 3\)"):
        validate.run(_params(min_per_class=3), manifest, out)
    assert _failed_checks(out) == {"class_size"}
    sizes = next(e for e in _result(out)["expectations"] if e["check"] == "class_size")
    assert sizes["result"]["partial_unexpected_index_list"] == [{"label": "glioma", "n_images": 2}]


def test_duplicates_are_counted_and_fail_past_the_allowed_share(tmp_path):
    root = _class_folders(tmp_path / "raw")
    shutil.copy(root / "glioma" / "glioma_0.jpg", root / "glioma" / "glioma_copy.jpg")
    shutil.copy(root / "glioma" / "glioma_0.jpg", root / "notumor" / "notumor_copy.jpg")
    shutil.copy(root / "pituitary" / "pituitary_1.png", root / "pituitary" / "pituitary_copy.png")
    manifest = _manifest(root, tmp_path)

    summary = validate.run(_params(), manifest, tmp_path / "ok")
    assert summary["success"] is True
    assert summary["n_duplicate_rows"] == 3 and summary["n_duplicate_groups"] == 2
    assert summary["n_cross_label_duplicate_groups"] == 1
    groups = (tmp_path / "ok" / "duplicates.csv").read_text().splitlines()
    assert len(groups) == 3  # header + two groups
    assert "glioma/glioma_0;glioma/glioma_copy;notumor/notumor_copy" in groups[1]
    assert _result(tmp_path / "ok")["duplicates"]["n_groups"] == 2

    # 3 extra copies in 19 rows is 15.8%: above a 10% allowance.
    with pytest.raises(InputError, match=r"15\.8% of the images are exact duplicates, more than "
                                         r"validate\.max_duplicate_fraction 0\.1"):
        validate.run(_params(max_duplicates=0.1), manifest, tmp_path / "strict")
    assert _failed_checks(tmp_path / "strict") == {"duplicates"}


def _tcga(root: Path, bad_mask_slice: int | None = None, nan_slice: int | None = None) -> Path:
    """Two TCGA-style patients, 3-channel TIFF slices with binary masks."""
    rng = np.random.default_rng(1)
    for patient in ("TCGA_CS_4941_19960909", "TCGA_DU_5849_19950405"):
        folder = root / patient
        folder.mkdir(parents=True)
        for n in range(1, 5):
            if n == nan_slice and patient.startswith("TCGA_CS"):
                # A float TIFF with a NaN pixel: decodes, but training on it would poison the loss.
                pixels = rng.random((32, 32)).astype(np.float32)
                pixels[5, 5] = np.nan
                Image.fromarray(pixels, mode="F").save(folder / f"{patient}_{n}.tif")
            else:
                Image.fromarray(_noise(rng, (32, 32, 3))).save(folder / f"{patient}_{n}.tif")
            shape = (16, 16) if n == bad_mask_slice and patient.startswith("TCGA_DU") else (32, 32)
            mask = np.zeros(shape, np.uint8)
            if n % 2:
                mask[4:10, 4:10] = 255  # tumour on odd slices: both labels present
            Image.fromarray(mask).save(folder / f"{patient}_{n}_mask.tif")
    return root


def test_mask_layout_passes_and_mask_with_wrong_shape_fails(tmp_path):
    good = _tcga(tmp_path / "good")
    summary = validate.run(_params(min_per_class=2), _manifest(good, tmp_path, layout="tcga_lgg"), tmp_path / "ok")
    assert summary["success"] is True and summary["class_counts"] == {"tumor": 4, "no_tumor": 4}

    bad = _tcga(tmp_path / "bad", bad_mask_slice=3)
    out = tmp_path / "validation"
    with pytest.raises(InputError, match=r"1 of 8 images have a mask whose shape differs from the image "
                                         r"\(first: .*TCGA_DU_5849_19950405_3_mask\.tif: mask 16x16 vs image 32x32\)"):
        validate.run(_params(min_per_class=2), _manifest(bad, tmp_path, layout="tcga_lgg"), out)
    assert _failed_checks(out) == {"mask_shape"}


def test_non_finite_intensities_fail(tmp_path):
    root = _tcga(tmp_path / "raw", nan_slice=2)
    out = tmp_path / "validation"
    with pytest.raises(InputError, match=r"1 of 8 images have NaN or infinite intensities "
                                         r"\(first: .*TCGA_CS_4941_19960909_2\.tif\)"):
        validate.run(_params(min_per_class=2), _manifest(root, tmp_path, layout="tcga_lgg"), out)
    assert _failed_checks(out) == {"finite"}


def test_missing_manifest_is_a_readable_error(tmp_path):
    with pytest.raises(InputError, match="manifest not found; run the ingest stage first"):
        validate.run(_params(), tmp_path / "nope.parquet", tmp_path / "validation")


def test_manifest_without_a_required_column_names_the_column(tmp_path):
    manifest = _manifest(_class_folders(tmp_path / "raw", per_class=3), tmp_path)
    pd.read_parquet(manifest).drop(columns=["content_hash"]).to_parquet(manifest)
    with pytest.raises(InputError, match=r"validation failed: the manifest lacks column\(s\) content_hash"):
        validate.run(_params(), manifest, tmp_path / "validation")
    assert "column" in _failed_checks(tmp_path / "validation")


@pytest.mark.parametrize("key, value", [("max_duplicate_fraction", "lots"), ("max_duplicate_fraction", 1.5),
                                        ("min_images_per_class", 2.5)])
def test_unreadable_params_value_names_the_key(tmp_path, key, value):
    params = _params()
    params["validate"][key] = value
    with pytest.raises(InputError, match=rf"params\.yaml: 'validate\.{key}'"):
        validate.run(params, tmp_path / "unused.parquet", tmp_path / "validation")
    assert not (tmp_path / "validation").exists()


@pytest.mark.slow
def test_real_four_class_training_set_passes_and_reports_duplicates(tmp_path, shared_data):
    root = shared_data("brain-tumor-mri/Training")  # skips, saying why, when the shared sets are absent
    manifest = _manifest(root, tmp_path)
    started = time.perf_counter()
    summary = validate.run(_params(min_per_class=10), manifest, tmp_path / "validation")
    seconds = time.perf_counter() - started

    assert summary["success"] is True and summary["n_undecodable"] == 0
    assert summary["n_classes"] == 4 and sum(summary["class_counts"].values()) == summary["n_images"]
    assert summary["n_duplicate_rows"] > 0  # the compilation holds exact copies; partition drops them
    assert seconds < 60, f"validation took {seconds:.0f} s"
