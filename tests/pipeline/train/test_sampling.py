"""What an epoch is made of: class weights and pixel-mass weights against hand computations, the epoch plans
of each sampling, hard-class crops placed on hard-class pixels (counted on real CamVid labels where present), and
the same plan for the same seed."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from segmill.models.training import random_scale_crop_flip
from segmill.pipeline.common.classes import load_class_file
from segmill.pipeline.common.scenes import SCENE_CLASSES, write_scenes
from segmill.pipeline.train.bootstrap import INDEX_SCHEMA, class_presence_index, default_index_uri
from segmill.pipeline.train.data import decode_and_augment
from segmill.pipeline.train.sampling import (
    NO_HARD_CROP,
    choose_sampling,
    class_stats,
    class_weights,
    epoch_plan,
    hard_class_probabilities,
    pixel_mass_weights,
    plan_summary,
)
from testkit import CAMVID

POLE, SIGN = SCENE_CLASSES.index("pole"), SCENE_CLASSES.index("sign")


def _index(pixels: list[list[int]]) -> pa.Table:
    """A class index with these pixel counts per image (and one bad label, which every epoch leaves out)."""
    rows = [{"image_uri": f"i{n}.png", "label_uri": f"l{n}.png", "label_fingerprint": "f", "status": "ok",
             "error": None, "present": [c for c, v in enumerate(p) if v], "pixels": p} for n, p in enumerate(pixels)]
    rows.append({"image_uri": "bad.png", "label_uri": "bad.png", "label_fingerprint": "f", "status": "error",
                 "error": "unreadable", "present": [], "pixels": []})
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)


# Three classes; class 2 is rare. Image pixel counts:
PIXELS = [[90, 10, 0], [50, 40, 10], [80, 0, 20], [100, 0, 0]]


def test_median_frequency_weights_equal_a_hand_computation() -> None:
    stats = class_stats(_index(PIXELS), 3)
    # freq_c = pixels of c / pixels of the images holding c
    freq = np.array([320 / 400, 50 / 200, 30 / 200])
    expected = np.median(freq) / freq
    np.testing.assert_allclose(class_weights(stats, "median_frequency"), expected)
    np.testing.assert_allclose(class_weights(stats, "inverse_sqrt_frequency"), np.sqrt(expected))
    assert class_weights(stats, "none") is None
    absent = class_weights(class_stats(_index([[5, 5, 0]]), 3), "median_frequency")
    assert absent[2] == 1.0, "a class with no training pixel meets no target: neutral weight"


def test_pixel_mass_weights_equal_a_hand_computation() -> None:
    stats = class_stats(_index(PIXELS), 3)
    hard = [1, 2]
    f = np.array([50, 30]) / 400  # the hard classes' shares of all pixels
    p = np.exp((1 - f) / 0.5) / np.exp((1 - f) / 0.5).sum()
    np.testing.assert_allclose(hard_class_probabilities(stats, hard, 0.5), p)
    expected = p[0] * np.array([10, 40, 0, 0]) / 50 + p[1] * np.array([0, 10, 20, 0]) / 30
    np.testing.assert_allclose(pixel_mass_weights(stats, hard, 0.5), expected)
    assert pixel_mass_weights(stats, hard, 0.5).sum() == pytest.approx(1.0)
    assert hard_class_probabilities(stats, hard, 0.01)[1] > 0.99, "a low temperature draws the rarest class"


@pytest.mark.parametrize("sampling", ["none", "presence", "pixel_mass"])
def test_epoch_plans_hold_every_usable_image_and_the_same_seed_gives_the_same_plan(sampling: str) -> None:
    index = _index(PIXELS)
    stats = class_stats(index, 3)
    plan = epoch_plan(stats, [2], sampling=sampling, factor=3, hard_crop_share=0.0, temperature=0.1, seed=4, epoch=0)
    counts = Counter(plan.rows.tolist())
    assert set(counts) == {0, 1, 2, 3}, "every usable image, never the bad label"
    if sampling == "presence":
        assert counts == {0: 1, 1: 3, 2: 3, 3: 1}  # images holding class 2, three times in all
    elif sampling == "pixel_mass":
        assert sum(counts.values()) == 4 + 2 * 2 and counts[0] == counts[3] == 1  # extras only where class 2 is
    again = epoch_plan(stats, [2], sampling=sampling, factor=3, hard_crop_share=0.0, temperature=0.1, seed=4, epoch=0)
    assert plan.rows.tolist() == again.rows.tolist() and plan.seeds.tolist() == again.seeds.tolist()
    other = epoch_plan(stats, [2], sampling=sampling, factor=3, hard_crop_share=0.0, temperature=0.1, seed=4, epoch=1)
    assert other.seeds.tolist() != plan.seeds.tolist(), "each epoch draws anew"
    assert plan.table(index).column_names == ["image_uri", "label_uri", "crop_class", "seed"]


def test_presence_sampling_that_selects_nothing_says_so_and_draws_by_pixel_mass() -> None:
    everywhere = class_stats(_index([[5, 1, 0], [5, 2, 0]]), 3)
    sampling, why = choose_sampling("presence", everywhere, [1])
    assert sampling == "pixel_mass" and "every training image holds a hard class" in why
    assert choose_sampling("presence", class_stats(_index(PIXELS), 3), [2]) == ("presence", "as asked")
    assert choose_sampling("pixel_mass", everywhere, [])[0] == "none"


def test_hard_crops_are_planned_on_images_that_hold_the_class() -> None:
    stats = class_stats(_index(PIXELS), 3)
    plan = epoch_plan(stats, [1, 2], sampling="none", factor=1, hard_crop_share=0.5, temperature=1.0, seed=0, epoch=0)
    placed = plan.crop_class != NO_HARD_CROP
    assert placed.sum() == 2
    for row, c in zip(plan.rows[placed], plan.crop_class[placed]):
        assert PIXELS[row][c] > 0, "a crop is only placed on a class its image holds"
    summary = plan_summary(stats, [1, 2], ("a", "b", "c"), sampling="none", factor=1, hard_crop_share=0.5,
                           temperature=1.0, seed=0, weights=None)
    assert summary["hard_crops_planned"] == 0.5 and summary["hard_share_before"] == 0.75


def test_a_crop_on_a_class_holds_that_class() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(100, 120, dtype=torch.long)
    mask[90:92, 5:7] = 3  # four pixels in a corner
    image = torch.rand(3, 100, 120)
    for _ in range(20):
        _, crop = random_scale_crop_flip(image, mask, 32, generator=generator, scale_range=(1.0, 1.0), focus_class=3)
        assert (crop == 3).any()
    _, crop = random_scale_crop_flip(image, mask, 32, generator=generator, scale_range=(1.0, 1.0), focus_class=7)
    assert crop.shape == (32, 32), "a class not in the mask: a uniform crop"


def _camvid_or_scenes(tmp_path: Path) -> tuple[pa.Table, tuple[str, ...], list[int]]:
    """Real CamVid labels (its rare thin classes as hard) where present, else generated scenes (pole and sign)."""
    if (CAMVID / "train" / "labels").is_dir():
        labels = sorted((CAMVID / "train" / "labels").glob("*.png"))[:40]
        pairs = [(str(CAMVID / "train" / "images" / (p.stem + ".jpg")), str(p)) for p in labels]
        names = load_class_file(str(CAMVID / "classes.yaml")).names
        hard = [names.index(c) for c in ("Pole", "SignSymbol", "Pedestrian", "Bicyclist")]
    else:
        images = write_scenes(str(tmp_path / "set"), 40, seed=2)
        pairs = [(uri, uri.replace("/images/", "/labels/")) for uri in images]
        names, hard = SCENE_CLASSES, [POLE, SIGN]
    index = class_presence_index(pairs, len(names), cache_uri=default_index_uri(str(tmp_path / "index")))
    return index, names, hard


def test_the_asked_share_of_crops_holds_a_hard_class(tmp_path: Path) -> None:
    index, names, hard = _camvid_or_scenes(tmp_path)
    stats = class_stats(index, len(names))
    share, crop = 0.5, 96
    plan = epoch_plan(stats, hard, sampling="none", factor=1, hard_crop_share=share, temperature=0.01, seed=3,
                      epoch=0).table(index)
    batch = {name: np.array(plan[name].to_pylist(), dtype=object if name.endswith("uri") else None)
             for name in plan.column_names}
    out = decode_and_augment(batch, num_classes=len(names), ignore_index=255, crop=crop, scale_range=(0.5, 1.0),
                             endpoint_url=None)
    assert out["valid"].all() and out["image"].shape == (len(plan), crop, crop, 3)
    placed = np.array(plan["crop_class"].to_pylist()) != NO_HARD_CROP
    holds = np.isin(out["mask"], hard).reshape(len(plan), -1).any(1)
    assert holds[placed].all(), "every crop placed on a hard class holds it"
    assert holds.mean() >= share
    again = decode_and_augment(batch, num_classes=len(names), ignore_index=255, crop=crop, scale_range=(0.5, 1.0),
                               endpoint_url=None)
    assert np.array_equal(again["mask"], out["mask"]) and np.array_equal(again["image"], out["image"]), \
        "each row's seed gives the same crop"
