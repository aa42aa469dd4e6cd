"""preprocess: arrays in [0, 1] at the configured size, masks nearest-neighbour, no half-written output."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import CLASSES, shared_path
from fedbrain import ingest, preprocess
from fedbrain.errors import InputError


def params_for(root, **pre):
    return {"data": {"root": str(root), "layout": "auto", "classes": CLASSES},
            "preprocess": {"size": 32, "equalize": False, "bias_field": False, **pre}}


def stage(tmp_path, root, **pre):
    params = params_for(root, **pre)
    ingest.run(params, out=tmp_path / "manifest.parquet")
    info = preprocess.run(params, manifest=tmp_path / "manifest.parquet", out=tmp_path / "processed")
    return params, info


def test_class_folders(tmp_path, class_folder_root):
    _, info = stage(tmp_path, class_folder_root)
    images = np.load(tmp_path / "processed" / "images.npy")
    index = pd.read_parquet(tmp_path / "processed" / "index.parquet")
    assert images.shape == (12, 32, 32, 1) and images.dtype == np.float32
    assert (images.min(axis=(1, 2, 3)) == 0).all() and (images.max(axis=(1, 2, 3)) == 1).all()
    assert list(index["row"]) == list(range(12))
    assert [CLASSES[k] for k in index["label_index"]] == list(index["label"])
    assert info["classes"] == CLASSES and not info["has_masks"]
    assert not (tmp_path / "processed" / "masks.npy").exists()
    assert json.loads((tmp_path / "processed" / "classes.json").read_text())["size"] == 32


@pytest.mark.parametrize("options", [{"equalize": True}, {"bias_field": True}])
def test_optional_transforms_stay_in_range(options):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    pixels = ((50 + xx) * (1 + rng.random((64, 64))))[..., None].astype(np.float32)  # a smooth bias
    out = preprocess.prepare_image(pixels, 32, options.get("equalize", False), options.get("bias_field", False))
    assert out.shape == (32, 32, 1) and np.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert not np.allclose(out, preprocess.prepare_image(pixels, 32))


def test_constant_image_is_zero_not_nan():
    out = preprocess.prepare_image(np.full((20, 20, 2), 7.0, np.float32), 16)
    assert np.isfinite(out).all() and (out == 0).all()


def test_masks_resized_nearest(tmp_path):
    root = tmp_path / "lgg" / "TCGA_CS_0001_20000101"
    root.mkdir(parents=True)
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / f"{root.name}_1.tif")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(root / f"{root.name}_1_mask.tif")
    _, info = stage(tmp_path, tmp_path / "lgg")
    masks = np.load(tmp_path / "processed" / "masks.npy")
    assert info["has_masks"] and info["classes"] == ["no_tumor", "tumor"]
    assert set(np.unique(masks)) == {0, 1} and masks.sum() == 16 * 16


def test_unlabelled_dataset_is_refused_and_nothing_written(tmp_path):
    root = shared_path("brats-sample")
    params = params_for(root)
    ingest.run(params, out=tmp_path / "manifest.parquet")
    with pytest.raises(InputError, match="labels <none> are not among no_tumor, tumor"):
        preprocess.run(params, manifest=tmp_path / "manifest.parquet", out=tmp_path / "processed")
    assert not (tmp_path / "processed").exists()


def test_failure_midway_leaves_previous_output_intact(tmp_path, class_folder_root):
    stage(tmp_path, class_folder_root)
    before = (tmp_path / "processed" / "images.npy").read_bytes()
    (class_folder_root / "notumor" / "notumor_1.jpg").write_bytes(b"broken")  # breaks after ingest
    with pytest.raises(InputError, match="notumor_1.jpg: cannot decode image"):
        preprocess.run(params_for(class_folder_root), manifest=tmp_path / "manifest.parquet",
                       out=tmp_path / "processed")
    assert (tmp_path / "processed" / "images.npy").read_bytes() == before
    assert not (tmp_path / "processed.tmp").exists()


def test_bad_size_param(tmp_path, class_folder_root):
    params = params_for(class_folder_root, size="big")
    with pytest.raises(InputError, match="'preprocess.size' is 'big'; expected int"):
        preprocess.run(params, manifest=tmp_path / "m.parquet", out=tmp_path / "p")
