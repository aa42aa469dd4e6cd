"""Reading MRI pixels: 2D files (JPEG, PNG, TIFF) and axial slices of NIfTI volumes.

Every stage reads pixels through these two functions, so a file that decodes here decodes
everywhere, and a file that does not gets the same readable error everywhere.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedbrain.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
MODALITY_SEPARATOR = ";"  # a multi-modal slice's source_path names one volume per channel


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


@lru_cache(maxsize=8)
def read_volume(path: str) -> np.ndarray:
    """A whole NIfTI volume in closest-canonical (RAS) orientation, as float32.

    Cached because ingest and preprocess read every axial slice of a volume in turn and a
    .nii.gz must be decompressed whole to read any of them.
    """
    import nibabel as nib

    try:
        image = nib.as_closest_canonical(nib.load(path))
        volume = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for truncated or foreign files
        raise InputError(f"{path}: cannot read NIfTI volume ({exc.__class__.__name__}: {exc}); "
                         "re-export or remove the file") from exc
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {volume.shape}")
    return volume


def _read_2d(path: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGB", "RGBA", "P") and not path.lower().endswith((".tif", ".tiff")):
                # MRI stored as JPEG/PNG is grey-scale even when saved with three equal channels.
                image = image.convert("L")
            elif image.mode in ("RGBA", "P"):
                image = image.convert("RGB")
            array = np.asarray(image, dtype=np.float32)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: file not found; re-run ingest if the dataset moved") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot decode image ({exc}); replace or remove the file") from exc
    return array[..., None] if array.ndim == 2 else array


def read_image(source_path: str, slice_index: int = -1) -> np.ndarray:
    """Raw intensities, shape (H, W, C): a 2D file, or axial slice `slice_index` of one or
    more co-registered NIfTI volumes (one channel per volume)."""
    if slice_index < 0:
        return _read_2d(source_path)
    channels = []
    for path in source_path.split(MODALITY_SEPARATOR):
        volume = read_volume(path)
        if not 0 <= slice_index < volume.shape[2]:
            raise InputError(f"{path}: slice {slice_index} out of range (volume has {volume.shape[2]} axial slices)")
        channels.append(volume[:, :, slice_index])
    shapes = {c.shape for c in channels}
    if len(shapes) != 1:
        raise InputError(f"{source_path}: modalities have different slice shapes {sorted(shapes)}; co-register them first")
    return np.stack(channels, axis=-1)


def read_mask(mask_path: str, slice_index: int = -1) -> np.ndarray:
    """A binary tumour mask, shape (H, W), values {0, 1}."""
    if slice_index < 0:
        array = _read_2d(mask_path)[..., 0]
    else:
        volume = read_volume(mask_path)
        if not 0 <= slice_index < volume.shape[2]:
            raise InputError(f"{mask_path}: slice {slice_index} out of range (mask has {volume.shape[2]} axial slices)")
        array = volume[:, :, slice_index]
    return (array > 0).astype(np.uint8)


def content_hash(pixels: np.ndarray) -> str:
    """SHA-256 of the decoded pixels (shape included), so re-encoded copies of one image match."""
    digest = hashlib.sha256(str(pixels.shape).encode())
    digest.update(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    return digest.hexdigest()
