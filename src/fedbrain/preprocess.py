"""preprocess: decode once, resize to size x size, intensities to [0, 1] per image and channel.

Transforms are small functions composed by `prepare_image` (MONAI style) so `predict` applies
exactly what training saw. Output follows the contract in fedbrain.dataset.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from fedbrain import imaging
from fedbrain.config import get, section
from fedbrain.errors import InputError

BINARY_CLASSES = ["no_tumor", "tumor"]


def bias_field(channel: np.ndarray) -> np.ndarray:
    """N4 bias-field correction (SimpleITK) of one 2D channel, fitted on a 2x shrunk copy for speed."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(channel.astype(np.float32))
    head = sitk.OtsuThreshold(image, 0, 1, 200)
    shrunk = sitk.Shrink(image, [2, 2])
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([20, 10])
    corrector.Execute(shrunk, sitk.Shrink(head, [2, 2]))
    log_field = corrector.GetLogBiasFieldAsImage(image)
    return (channel / np.exp(sitk.GetArrayFromImage(log_field))).astype(np.float32)


def intensity(channel: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant channel becomes zeros rather than NaN."""
    low, high = float(channel.min()), float(channel.max())
    if high - low < 1e-8:
        return np.zeros_like(channel, dtype=np.float32)
    return ((channel - low) / (high - low)).astype(np.float32)


def equalize(channel: np.ndarray) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation on a [0, 1] channel."""
    from skimage.exposure import equalize_adapthist

    return equalize_adapthist(channel, clip_limit=0.01).astype(np.float32)


def resize(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    from skimage.transform import resize as sk_resize

    if image.shape[:2] == (size, size):
        return image
    order = 0 if nearest else 1
    return sk_resize(image, (size, size) + image.shape[2:], order=order, anti_aliasing=not nearest,
                     preserve_range=True).astype(image.dtype)


def prepare_image(pixels: np.ndarray, size: int, equalize_histogram: bool = False,
                  correct_bias_field: bool = False) -> np.ndarray:
    """Raw (H, W, C) intensities -> float32 (size, size, C) in [0, 1].

    Bias field is fitted at full resolution; normalising after resizing makes every channel
    span exactly [0, 1] (resampling would otherwise shrink the range).
    """
    channels = []
    for c in range(pixels.shape[2]):
        channel = pixels[..., c].astype(np.float32)
        if correct_bias_field:
            channel = bias_field(channel)
        channel = intensity(resize(channel[..., None], size)[..., 0])
        if equalize_histogram:
            channel = equalize(channel)
        channels.append(channel)
    return np.clip(np.stack(channels, axis=-1), 0.0, 1.0)


def prepare_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return resize(mask[..., None].astype(np.uint8), size, nearest=True)


def class_names(params: dict, manifest: pd.DataFrame) -> list[str]:
    if (manifest["layout"] == "class_folders").all():
        return list(get(section(params, "data"), "classes", list, "data"))
    return list(BINARY_CLASSES)


def run(params: dict, manifest: Path, out: Path) -> dict:
    settings = section(params, "preprocess")
    size = get(settings, "size", int, "preprocess")
    use_equalize = get(settings, "equalize", bool, "preprocess")
    use_bias = get(settings, "bias_field", bool, "preprocess")
    if not 16 <= size <= 1024:
        raise InputError(f"params.yaml: 'preprocess.size' is {size}; use 16..1024 (128 is the default)")
    if not Path(manifest).is_file():
        raise InputError(f"{manifest}: manifest not found; run the ingest stage first (dvc repro ingest)")
    table = pd.read_parquet(manifest).reset_index(drop=True)
    classes = class_names(params, table)
    unknown = sorted(set(table["label"].dropna()) - set(classes)) + (["<none>"] if table["label"].isna().any() else [])
    if unknown:
        raise InputError(f"{manifest}: labels {', '.join(map(str, unknown))} are not among {', '.join(classes)}; "
                         "run validate to see which images, then fix data.classes or the dataset")
    channel_counts = sorted(table["channels"].unique())
    if len(channel_counts) != 1 or channel_counts[0] < 1:
        raise InputError(f"{manifest}: images have channel counts {channel_counts}; one dataset needs one channel "
                         "count and no undecodable files (run validate)")
    channels = int(channel_counts[0])
    has_masks = table["mask_path"].notna().all()

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.float32,
                                           shape=(len(table), size, size, channels))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(table), size, size, 1)) if has_masks else None
        for i, row in enumerate(tqdm(table.itertuples(), total=len(table), desc="preprocess", unit="img",
                                     mininterval=1.0)):
            pixels = imaging.read_image(row.source_path, row.slice_index)
            images[i] = prepare_image(pixels, size, use_equalize, use_bias)
            if masks is not None:
                mask = imaging.read_mask(row.mask_path, row.slice_index)
                if mask.shape != pixels.shape[:2]:
                    raise InputError(f"{row.mask_path}: mask shape {mask.shape} differs from its image "
                                     f"{pixels.shape[:2]} ({row.source_path}); use the matching mask")
                masks[i] = prepare_mask(mask, size)
        images.flush()
        del images, masks
        table["row"] = np.arange(len(table), dtype=np.int64)
        table["label_index"] = table["label"].map({name: k for k, name in enumerate(classes)}).astype("int64")
        table.to_parquet(tmp / "index.parquet", index=False)
        info = {"classes": classes, "has_masks": bool(has_masks), "channels": channels, "size": size,
                "n_images": len(table)}
        (tmp / "classes.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left for the next stage
        raise
    print(f"preprocess: {len(table)} images -> {out} ({size}x{size}x{channels}, masks: {has_masks})")
    return info
