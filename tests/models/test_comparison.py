"""The paired bootstrap the champion gate decides on, against cases computed by hand."""
from __future__ import annotations

import numpy as np
import pytest

from segmill.models.comparison import block_length, paired_bootstrap, resample_counts


def test_two_images_give_three_resamples_whose_gains_are_known() -> None:
    # One class. Image 1: a 50/100, b 80/100. Image 2: both 30/60. A resample of two images draws (2, 0), (1, 1) or
    # (0, 2) with chances 1/4, 1/2, 1/4, so the 2.5th and 97.5th percentiles are the gains of (0, 2) and (2, 0):
    #   (2, 0): a 100/200 = 0.5, b 160/200 = 0.8 -> +0.3;  (0, 2): a = b = 60/120 = 0.5 -> 0;
    #   all images (1, 1): a 80/160 = 0.5, b 110/160 = 0.6875 -> +0.1875.
    c = paired_bootstrap([[50], [30]], [[100], [60]], [[80], [30]], [[100], [60]], ("road",), resamples=4000)
    assert (c.images, c.miou_a, c.miou_b) == (2, 0.5, 0.6875)
    assert c.gain == pytest.approx(0.1875)
    assert (c.low, c.high) == (pytest.approx(0.0), pytest.approx(0.3))
    assert c.class_change == {"road": pytest.approx(0.1875)}


def test_the_same_model_gains_nothing_and_a_better_one_everywhere_clears_zero() -> None:
    rng = np.random.default_rng(1)
    inter = rng.integers(10, 90, size=(40, 3))
    union = inter + rng.integers(5, 50, size=(40, 3))
    same = paired_bootstrap(inter, union, inter, union, ("a", "b", "c"))
    assert same.gain == 0 and same.low == 0 and same.high == 0
    better = paired_bootstrap(inter, union, np.minimum(inter + 5, union), union, ("a", "b", "c"))
    assert better.low > 0 and better.gain > 0 and all(v > 0 for v in better.class_change.values())


def test_mixed_gains_straddle_zero_and_the_worst_class_is_named() -> None:
    rng = np.random.default_rng(2)
    union = rng.integers(100, 200, size=(30, 2))
    inter_a = union // 2
    noise = rng.integers(-20, 21, size=(30, 2))
    noise[:, 1] = -15  # class b loses on every image
    inter_b = np.clip(inter_a + noise, 0, union)
    c = paired_bootstrap(inter_a, union, inter_b, union, ("a", "b"))
    assert c.low < c.gain < c.high
    assert c.worst_class()[0] == "b" and c.worst_class()[1] < -0.05


def test_classes_never_seen_are_left_out_and_shapes_must_match() -> None:
    c = paired_bootstrap([[5, 0]], [[10, 0]], [[6, 0]], [[10, 0]], ("a", "never"))
    assert set(c.class_change) == {"a"} and c.miou_b == pytest.approx(0.6)
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap([[1]], [[2]], [[1], [1]], [[2], [2]], ("a",))


def test_a_block_as_long_as_the_set_draws_every_image_once_so_the_interval_is_the_point() -> None:
    # Circular blocks of n images starting anywhere are rotations of the whole set: each image drawn exactly once.
    rng = np.random.default_rng(4)
    union = rng.integers(50, 100, size=(12, 2))
    inter_a, inter_b = union // 3, union // 2
    c = paired_bootstrap(inter_a, union, inter_b, union, ("a", "b"), block=12)
    assert c.block == 12 and c.low == pytest.approx(c.gain) and c.high == pytest.approx(c.gain)
    counts = resample_counts(10, 50, 3, np.random.default_rng(0))
    assert counts.shape == (50, 10) and (counts.sum(1) == 10).all()
    ones = resample_counts(7, 20, 7, np.random.default_rng(0))
    assert (ones == 1).all()


def test_runs_of_near_identical_frames_widen_the_interval_past_what_independent_draws_claim() -> None:
    # 60 frames from 6 scenes, 10 consecutive frames each, the gain shared by a scene's frames: there are 6
    # independent pieces of evidence, not 60. Drawn one frame at a time the loss looks certain (interval below 0);
    # drawn in blocks (n^(1/3) = 4 frames for 60) the interval admits no loss at all, as 6 scenes should.
    union = np.full((60, 1), 100)
    inter_a = np.full((60, 1), 50)
    scene_gain = np.random.default_rng(3).integers(-20, 21, size=6)
    inter_b = inter_a + np.repeat(scene_gain, 10)[:, None]
    one_by_one = paired_bootstrap(inter_a, union, inter_b, union, ("a",), block=1)
    blocks = paired_bootstrap(inter_a, union, inter_b, union, ("a",))
    assert blocks.block == block_length(60) == 4
    assert one_by_one.high < 0 < blocks.high
    assert blocks.gain == one_by_one.gain and blocks.high - blocks.low > 1.5 * (one_by_one.high - one_by_one.low)
