"""segmentation_scores: per-patient Dice at native resolution against hand-computed volumes, the
resize back to the native grid, post-processing, and the fallback when the original masks are gone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fedbrain.dataset import Split
from fedbrain.preprocess import prepare_mask
from fedbrain.segmentation_scores import (Reference, load_reference, postprocess, score, site_scalars,
                                          to_native)


def _square(shape, y, x, h, w):
    mask = np.zeros(shape, dtype=bool)
    mask[y:y + h, x:x + w] = True
    return mask


def _proba(predictions):
    return np.stack(predictions)[..., None].astype(np.float32) * 0.9


def test_per_patient_dice_by_hand_including_patients_without_tumour():
    z = np.zeros((8, 8), dtype=bool)
    truth = [_square((8, 8), 2, 2, 2, 2), z,            # A: tumour on slice 0; slice 1 tumour-free
             z, z,                                      # B: no tumour, nothing predicted
             z,                                         # C: no tumour, a 3-pixel false-positive blob
             _square((8, 8), 1, 1, 2, 2)]               # D: tumour missed
    prediction = [_square((8, 8), 2, 2, 2, 2), _square((8, 8), 2, 2, 1, 2),
                  z, z,
                  _square((8, 8), 5, 5, 1, 3),
                  z]
    patients = ["A", "A", "B", "B", "C", "D"]
    reference = Reference(truth, ["X", "X", "X", "X", "Y", "Y"], "native 8x8")
    # Image ids out of natural order: A's slices are stacked as 2, 10 (slice order), not as sorted text.
    m = score(reference, _proba(prediction), patients, ["a_2", "a_10", "b_1", "b_2", "c_1", "d_1"])
    per = m["per_patient_native"]
    # A: Dice 2*4 / (4 + 6); the 2 extra pixels sit right above the tumour on the next slice: HD95 1.
    assert per["A"]["dice"] == pytest.approx(0.8) and per["A"]["hd95"] == pytest.approx(1.0)
    assert per["A"]["false_positive_px"] == 2
    # The code's rule for an empty mask: empty prediction Dice 1 (HD95 0), any pixel Dice 0 (no HD95).
    assert (per["B"]["dice"], per["B"]["hd95"], per["B"]["false_positive_px"]) == (1.0, 0.0, 0)
    assert (per["C"]["dice"], per["C"]["hd95"], per["C"]["false_positive_px"]) == (0.0, None, 3)
    assert (per["D"]["dice"], per["D"]["hd95"]) == (0.0, None)
    assert m["dice_native_mean"] == pytest.approx((0.8 + 1 + 0 + 0) / 4)
    assert m["dice_native_median"] == pytest.approx(0.4)
    assert m["hd95_native_mean"] == pytest.approx(0.5)  # A and B: the only defined ones
    assert (m["false_positive_volume_px"], m["tumour_free_patients"], m["tumour_free_slices"]) == (5, 2, 4)
    assert m["per_site"]["X"]["dice_native_mean"] == pytest.approx(0.9)
    assert m["per_site"]["Y"] == pytest.approx({"patients": 2, "dice_native_mean": 0.0, "dice_native_median": 0.0,
                                                "hd95_native_mean": None, "hd95_native_median": None,
                                                "false_positive_volume_px": 3})
    scalars = site_scalars(m)
    assert scalars["site_X/dice_native_mean"] == pytest.approx(0.9) and scalars["site_Y/patients"] == 2
    assert "dice_native_postprocessed_mean" not in m  # post-processing is asked for, never implied


def test_resizing_back_to_native_is_aligned_and_a_one_pixel_shift_is_caught():
    native = 256
    yy, xx = np.mgrid[:native, :native]
    disk = (yy - 101) ** 2 + (xx - 140) ** 2 <= 23 ** 2
    # 8x8 blocks on the 2-pixel grid survive nearest-neighbour halving exactly: any misalignment of
    # the way back shows as lost and gained rows of pixels.
    blocks = np.zeros((native, native), dtype=bool)
    for y, x in ((20, 30), (60, 180), (200, 90), (150, 150)):
        blocks[y:y + 8, x:x + 8] = True

    def round_trip(mask, reference):
        small = prepare_mask(mask.astype(np.uint8), 128)[..., 0].astype(np.float32)  # as preprocess does
        return score(Reference([reference], [None], "native"), small[None, ..., None], ["p"], ["i"])["dice_native_mean"]

    assert round_trip(disk, disk) >= 0.95
    assert round_trip(blocks, blocks) == pytest.approx(1.0)
    for axis in (0, 1):
        assert round_trip(blocks, np.roll(blocks, 1, axis=axis)) < 0.95
    # The probabilities are interpolated, not the thresholded mask: a 0.5 edge lands between pixels.
    assert to_native(np.array([[0.0, 1.0]]), (2, 4)).tolist()[0] == pytest.approx([0.0, 0.25, 0.75, 1.0])


def _random_prediction(seed):
    rng = np.random.default_rng(seed)
    volume = np.zeros((6, 32, 32), dtype=bool)
    for _ in range(rng.integers(1, 8)):
        k, y, x = rng.integers(0, 6), rng.integers(0, 28), rng.integers(0, 28)
        h, w = rng.integers(1, 6, size=2)
        volume[k, y:y + h, x:x + w] = True
    return volume


@pytest.mark.parametrize("seed", range(12))
def test_postprocessing_never_adds_pixels_and_never_empties_a_prediction(seed):
    prediction = _random_prediction(seed)
    for min_pixels in (0, 4, 20, 1000):
        cleaned = postprocess(prediction, min_pixels)
        assert not (cleaned & ~prediction).any()
        assert cleaned.any() == prediction.any()


def test_postprocessing_keeps_the_only_component_and_the_lesion_across_slices():
    tiny = np.zeros((3, 16, 16), dtype=bool)
    tiny[1, 4, 4:6] = True  # 2 pixels, far below min_pixels, but the only predicted tumour
    assert np.array_equal(postprocess(tiny, 20), tiny)
    lesion = np.zeros((5, 32, 32), dtype=bool)
    lesion[1, 10:16, 10:16] = lesion[2, 8:18, 8:18] = lesion[3, 12:15, 12:20] = True  # overlapping across slices
    assert np.array_equal(postprocess(lesion, 5), lesion)
    noisy = lesion.copy()
    noisy[2, 28:30, 28:30] = True             # speckle on a lesion slice
    noisy[4, 0:6, 0:6] = True                 # a second blob, touching the lesion on no slice
    assert np.array_equal(postprocess(noisy, 5), lesion)
    assert np.array_equal(postprocess(noisy[2], 5), lesion[2])  # one slice alone


def test_score_reports_the_postprocessed_dice_beside_the_raw_one():
    truth = _square((32, 32), 8, 8, 8, 8)
    prediction = truth | _square((32, 32), 26, 26, 3, 3)  # the tumour and a 9-pixel false blob
    m = score(Reference([truth], ["S"], "native"), _proba([prediction]), ["p"], ["i"], min_pixels=4)
    assert m["dice_native_mean"] == pytest.approx(2 * 64 / (64 + 73))
    assert m["dice_native_postprocessed_mean"] == pytest.approx(1.0)
    assert m["per_site"]["S"]["dice_native_postprocessed_mean"] == pytest.approx(1.0)


def _split(masks: np.ndarray, ids: list[str]) -> Split:
    return Split(np.zeros(masks.shape[:3] + (1,), np.float32), np.zeros(len(ids), np.int64), masks, ids,
                 ["p"] * len(ids))


def test_reference_reads_the_original_masks_and_falls_back_when_they_are_gone(tmp_path):
    native = np.zeros((2, 64, 64), dtype=np.uint8)
    native[0, 10:30, 12:40] = 255
    paths = []
    for k, mask in enumerate(native):
        paths.append(tmp_path / f"s_{k}_mask.tif")
        Image.fromarray(mask).save(paths[-1])
    processed = tmp_path / "processed"
    processed.mkdir()
    ids = ["s_0", "s_1"]
    index = pd.DataFrame({"row": [0, 1], "image_id": ids, "site": ["CS", "CS"],
                          "mask_path": [str(p) for p in paths], "slice_index": [-1, -1]})
    index.to_parquet(processed / "index.parquet")
    split = _split(np.stack([prepare_mask(m > 0, 32) for m in native]), ids)
    reference = load_reference(processed, split)
    assert reference.source == "native 64x64" and reference.sites == ["CS", "CS"]
    assert np.array_equal(reference.masks[0], native[0] > 0)

    paths[1].unlink()  # the data moved
    fallback = load_reference(processed, split)
    assert fallback.source.startswith("processed 32x32 (original masks not found") and fallback.sites == ["CS", "CS"]
    assert fallback.masks[0].shape == (32, 32)
    index.drop(columns=["mask_path", "site"]).to_parquet(processed / "index.parquet")  # no masks, no sites
    bare = load_reference(processed, split)
    assert bare.source.startswith("processed 32x32") and bare.sites == [None, None]
    m = score(bare, split.masks.astype(np.float32), split.patient_ids, split.image_ids)
    assert m["per_site"] == {} and site_scalars(m) == {} and m["dice_native_mean"] == pytest.approx(1.0)
