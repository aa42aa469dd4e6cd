"""Test-time flips (fedbrain.test_time): each mirrored prediction is mapped back before averaging."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from fedbrain.errors import InputError
from fedbrain.test_time import check_flips, segment


def position_model(size: int = 8):
    """A 'segmenter' whose output depends on where a pixel is: input x ramp along the width."""
    ramp = tf.constant(np.linspace(0.0, 1.0, size, dtype="float32")[None, None, :, None])
    inputs = tf.keras.Input((size, size, 1))
    return tf.keras.Model(inputs, tf.keras.layers.Lambda(lambda x: x * ramp)(inputs))


def test_flipped_predictions_are_mapped_back_before_averaging():
    images = np.random.default_rng(0).uniform(0, 1, (3, 8, 8, 1)).astype("float32")
    model = position_model()
    ramp = np.linspace(0.0, 1.0, 8)[None, None, :, None]
    np.testing.assert_allclose(segment(model, images, 2), images * ramp, rtol=1e-6)
    # horizontal: f(x) and flip(f(flip(x))) = x * flip(ramp): the average is x * (ramp + flip(ramp)) / 2 = x / 2.
    np.testing.assert_allclose(segment(model, images, 2, ["horizontal"]), images * 0.5, rtol=1e-5)
    # vertical: the ramp runs along the width, so a vertical flip mapped back changes nothing.
    np.testing.assert_allclose(segment(model, images, 2, ["vertical"]), images * ramp, rtol=1e-5)
    # Not mapping back would have given a different map (the test can fail).
    unmapped = (model.predict(images, verbose=0) + model.predict(images[:, :, ::-1], verbose=0)) / 2
    assert not np.allclose(unmapped, images * 0.5, atol=1e-3)


def test_unknown_or_repeated_flips_stop_with_the_key_and_choices():
    assert check_flips(None) == () and check_flips(["both", "vertical"]) == ("both", "vertical")
    with pytest.raises(InputError, match=r"evaluate\.test_time_flips.*horizontal, vertical, both"):
        check_flips(["diagonal"])
    with pytest.raises(InputError, match="distinct"):
        check_flips(["horizontal", "horizontal"])
