"""ingest: every layout from the shared sets and tiny fixtures; bad input stops with one line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import CLASSES, shared_path, write_jpeg
from fedbrain.errors import InputError
from fedbrain.ingest import COLUMNS, build_manifest, detect_layout


def write_volume(path, volume):
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), str(path))


def brain_volume(shape=(32, 32, 10), seed=0):
    rng = np.random.default_rng(seed)
    volume = np.zeros(shape, np.float32)
    volume[8:24, 8:24, 2:8] = 100 + rng.random((16, 16, 6)) * 50  # brain only in slices 2..7
    return volume


def test_class_folders_fixture(class_folder_root):
    manifest = build_manifest(class_folder_root, "auto", CLASSES)
    assert list(manifest.columns) == COLUMNS
    assert len(manifest) == 12 and manifest["image_id"].is_unique
    assert sorted(manifest["label"].unique()) == CLASSES
    assert (manifest["layout"] == "class_folders").all() and (manifest["channels"] == 1).all()
    assert manifest["content_hash"].notna().all() and manifest["content_hash"].nunique() == 12


def test_same_pixels_same_hash(class_folder_root):
    src = class_folder_root / "glioma" / "glioma_0.jpg"
    Image.open(src).save(class_folder_root / "glioma" / "copy.png")  # lossless re-encode of the decoded JPEG
    manifest = build_manifest(class_folder_root, "class_folders", CLASSES).set_index("image_id")
    assert manifest.at["glioma/copy", "content_hash"] == manifest.at["glioma/glioma_0", "content_hash"]


def test_tcga_fixture(tmp_path):
    root = tmp_path / "lgg"
    for patient, site in (("A001", "CS"), ("B002", "HT")):
        folder = root / f"TCGA_{site}_{patient}_20000101"
        folder.mkdir(parents=True)
        for n in (1, 2):
            Image.fromarray(np.full((16, 16, 3), 40 * n, np.uint8)).save(folder / f"{folder.name}_{n}.tif")
            mask = np.zeros((16, 16), np.uint8)
            if n == 2:
                mask[4:8, 4:8] = 255
            Image.fromarray(mask).save(folder / f"{folder.name}_{n}_mask.tif")
    manifest = build_manifest(root)
    assert detect_layout(root) == "tcga_lgg" and len(manifest) == 4
    assert set(manifest["patient_id"]) == {"TCGA_CS_A001", "TCGA_HT_B002"}
    assert set(manifest["site"]) == {"CS", "HT"}
    assert (manifest["channels"] == 3).all()
    assert manifest.groupby("label").size().to_dict() == {"no_tumor": 2, "tumor": 2}


def test_nifti_pairs_fixture(tmp_path):
    root = tmp_path / "pairs"
    volume = brain_volume()
    mask = np.zeros_like(volume)
    mask[10:14, 10:14, 4] = 1
    write_volume(root / "p1" / "Pre_Scan_T1.nii.gz", volume)
    write_volume(root / "p1" / "Pre_Mask.nii.gz", mask)
    manifest = build_manifest(root)
    assert (manifest["layout"] == "nifti_pairs").all()
    assert sorted(manifest["slice_index"]) == list(range(2, 8))  # only slices with brain
    assert manifest.set_index("slice_index").at[4, "label"] == "tumor"
    assert (manifest["label"] == "tumor").sum() == 1 and (manifest["patient_id"] == "p1").all()


@pytest.mark.parametrize("names", [
    ("BraTS20_Training_001_{}.nii.gz", ("flair", "t1", "t1ce", "t2"), "seg"),
    ("BraTS-GLI-00002-000-{}.nii.gz", ("t1c", "t1n", "t2f", "t2w"), "seg"),
])
def test_brats_fixture(tmp_path, names):
    pattern, modalities, seg = names
    root = tmp_path / "brats"
    for k, modality in enumerate(modalities):
        write_volume(root / "case" / pattern.format(modality), brain_volume(seed=k))
    labels = np.zeros((32, 32, 10))
    labels[12:16, 12:16, 5] = 2
    write_volume(root / "case" / pattern.format(seg), labels)
    manifest = build_manifest(root)
    assert detect_layout(root) == "brats" and (manifest["channels"] == 4).all()
    assert manifest["modality"].iat[0] == ",".join(modalities)
    assert (manifest["label"] == "tumor").sum() == 1


def test_shared_class_folders():
    root = shared_path("brain-tumor-mri/Training")
    manifest = build_manifest(root, "auto", CLASSES)
    assert set(manifest["label"]) == set(CLASSES)
    assert manifest["content_hash"].notna().all()
    assert manifest["content_hash"].duplicated().sum() > 0  # the set has exact duplicates


def test_shared_tcga():
    manifest = build_manifest(shared_path("lgg-mri-segmentation/kaggle_3m"))
    assert manifest["patient_id"].notna().all() and manifest["site"].notna().all()
    assert manifest.groupby("site")["patient_id"].nunique().sum() == manifest["patient_id"].nunique()
    assert manifest["mask_path"].notna().all()
    assert {"tumor", "no_tumor"} == set(manifest["label"])


def test_shared_nifti_pairs():
    manifest = build_manifest(shared_path("brain-tumor-progression"))
    assert (manifest["layout"] == "nifti_pairs").all()
    assert manifest["patient_id"].nunique() >= 2 and (manifest["label"] == "tumor").any()
    assert manifest["mask_path"].str.contains("Mask").all()


def test_shared_brats_2023_without_segmentation():
    manifest = build_manifest(shared_path("brats-sample"))
    assert (manifest["layout"] == "brats").all() and (manifest["channels"] == 4).all()
    assert manifest["label"].isna().all()  # no seg file: unlabelled, and validate will say so
    assert len(manifest) < 155  # only slices that contain brain


# --- bad input: one readable line naming the file or key ---

def test_missing_root(tmp_path):
    with pytest.raises(InputError, match="dataset root not found"):
        build_manifest(tmp_path / "nope")


def test_unknown_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="cannot tell the dataset layout"):
        build_manifest(tmp_path / "empty")
    with pytest.raises(InputError, match="layout 'dicom' is unknown"):
        build_manifest(tmp_path / "empty", "dicom")


def test_empty_class_folder(class_folder_root):
    for path in (class_folder_root / "pituitary").iterdir():
        path.unlink()
    with pytest.raises(InputError, match=r"pituitary: class folder has no JPEG/PNG"):
        build_manifest(class_folder_root, "class_folders", CLASSES)


def test_unknown_class_name(class_folder_root):
    write_jpeg(class_folder_root / "astrocytoma" / "a.jpg", seed=99)
    with pytest.raises(InputError, match=r"astrocytoma: folder is not a known class"):
        build_manifest(class_folder_root, "class_folders", CLASSES)


def test_corrupt_jpeg_is_kept_for_validation(class_folder_root):
    (class_folder_root / "glioma" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    manifest = build_manifest(class_folder_root, "class_folders", CLASSES).set_index("image_id")
    assert pd.isna(manifest.at["glioma/broken", "content_hash"])


def test_nifti_mask_shape_mismatch(tmp_path):
    write_volume(tmp_path / "p" / "scan.nii.gz", brain_volume())
    write_volume(tmp_path / "p" / "scan_mask.nii.gz", np.zeros((16, 16, 10)))
    with pytest.raises(InputError, match=r"scan_mask.nii.gz: mask shape \(16, 16, 10\) differs"):
        build_manifest(tmp_path)


def test_nifti_without_brain(tmp_path):
    write_volume(tmp_path / "p" / "scan.nii.gz", np.zeros((16, 16, 8)))
    with pytest.raises(InputError, match=r"scan.nii.gz: no axial slice contains brain"):
        build_manifest(tmp_path)


def test_corrupt_nifti(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "scan.nii.gz").write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"scan.nii.gz: cannot read NIfTI volume"):
        build_manifest(tmp_path)
