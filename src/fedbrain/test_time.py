"""Test-time flips for the segmenter: average its tumour probability over mirrored copies of a slice.

The U-Net trains on randomly flipped slices (train.augment hflip / vflip), so a mirrored slice is
as familiar to it as the original; its errors on the two are partly independent, and averaging the
maps (each flipped back first) removes some of them. It costs one more prediction per flip. Used by
`evaluate` and `predict` when `evaluate.test_time_flips` names flips: the score of a model is then
the score of what a user gets from `fedbrain predict`.
"""

from __future__ import annotations

import numpy as np

from fedbrain.config import get
from fedbrain.errors import InputError

# name -> image axes (batch, height, width, channels) the flip reverses
FLIPS = {"horizontal": (2,), "vertical": (1,), "both": (1, 2)}


def check_flips(flips, where: str = "evaluate.test_time_flips") -> tuple[str, ...]:
    """The configured flips as a tuple; anything else stops with the key and the choices."""
    flips = tuple(flips or ())
    unknown = [f for f in flips if f not in FLIPS]
    if unknown or len(set(flips)) != len(flips):
        raise InputError(f"params.yaml: '{where}' is {list(flips)}; use a list of distinct flips from "
                         f"{', '.join(FLIPS)} ([] for none)")
    return flips


def inference_settings(params: dict) -> dict:
    """How a model runs at test time, read once for `evaluate` and `predict` alike (params.yaml
    `evaluate`): the segmenter's mask threshold, the batch size (the memory bound), the flips."""
    sec = params.get("evaluate") or {}
    return {"threshold": get(sec, "threshold", float, "evaluate", default=0.5),
            "batch_size": get(sec, "batch_size", int, "evaluate", default=64),
            "test_time_flips": check_flips(sec.get("test_time_flips"))}


def segment(model, images: np.ndarray, batch_size: int, flips=()) -> np.ndarray:
    """The model's probability maps of ``images`` (N, H, W, C), averaged with each flip's (mapped back)."""
    flips = check_flips(flips)
    total = np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)
    for name in flips:
        axes = FLIPS[name]
        mirrored = model.predict(np.flip(images, axis=axes), batch_size=batch_size, verbose=0)
        total += np.flip(np.asarray(mirrored, dtype=np.float64), axis=axes)
    return (total / (1 + len(flips))).astype(np.float32)
