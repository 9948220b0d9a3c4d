"""The toy-data attribute judge: right on real toy images, robust to noise, and catching an image drawn with one
attribute changed."""

from dataclasses import replace

import numpy as np
import pytest

from data.toy import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, render, toy_attributes, toy_sample
from metrics.toy_attributes import ATTRIBUTES, attribute_accuracy, judge, parse_caption

OPTIONS = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "position": tuple(POSITIONS),
           "background": tuple(BACKGROUNDS)}


def test_captions_parse_back_to_their_attributes():
    for i in range(200):
        _, caption, meta = toy_sample(i, seed=5)
        assert parse_caption(caption) == toy_attributes(i, seed=5)
    assert parse_caption("a photograph of an astronaut riding a horse") is None
    assert parse_caption("a large red circle in the middle on a white background") is None


@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_real_toy_images_are_judged_right(resolution):
    images, captions = zip(*[toy_sample(i, seed=1, resolution=resolution)[:2] for i in range(600)])
    acc = attribute_accuracy(images, list(captions))
    assert all(acc[a] >= 0.99 for a in ATTRIBUTES), acc
    # with noise of σ = 16 grey levels (a generated image is not a clean render)
    rng = np.random.default_rng(0)
    noisy = [np.clip(np.asarray(im, np.float64) + rng.normal(0, 16, (resolution, resolution, 3)), 0, 255)
             .astype(np.uint8) for im in images[:300]]
    acc = attribute_accuracy(noisy, list(captions[:300]))
    assert all(acc[a] >= 0.99 for a in ATTRIBUTES), acc


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_an_image_with_one_attribute_changed_is_caught(attribute):
    """Drawn with another value of one attribute: that attribute is judged wrong, the other four right."""
    images, captions = [], []
    for i in range(120):
        want = toy_attributes(i, seed=3)
        others = [v for v in OPTIONS[attribute] if v != getattr(want, attribute)]
        images.append(render(replace(want, **{attribute: others[i % len(others)]}), 32))
        captions.append(want.caption)
    acc = attribute_accuracy(images, captions)
    assert acc[attribute] <= 0.01 and acc["all"] <= 0.01, acc
    assert all(acc[a] >= 0.99 for a in ATTRIBUTES if a != attribute), acc


def test_not_toy_captions_give_no_accuracy_and_bad_images_a_clear_error():
    img = toy_sample(0)[0]
    assert attribute_accuracy([img], ["a corgi on the beach"]) is None
    with pytest.raises(ValueError, match="square RGB image"):
        judge(np.zeros((8, 6, 3), np.uint8))
