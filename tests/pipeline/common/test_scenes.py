"""The synthetic street scenes: deterministic, within their size range, rare small classes, written as PNGs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from segmill.pipeline.common.scenes import (
    SCENE_CLASSES,
    SCENE_PALETTE,
    SceneSpec,
    render_scene,
    write_scenes,
)

POLE, SIGN = SCENE_CLASSES.index("pole"), SCENE_CLASSES.index("sign")
NUM_SCENES = 200


def test_render_scene_is_deterministic() -> None:
    image, mask = render_scene(3, 11)
    again_image, again_mask = render_scene(3, 11)
    assert np.array_equal(image, again_image) and np.array_equal(mask, again_mask)
    other_image, other_mask = render_scene(3, 12)  # np.array_equal is False for different shapes too
    assert not np.array_equal(image, other_image) and not np.array_equal(mask, other_mask)
    assert not np.array_equal(render_scene(4, 11)[0], image)


@pytest.mark.parametrize("spec", [SceneSpec(), SceneSpec(min_side=40, max_side=60)])
def test_render_scene_sizes_and_values(spec: SceneSpec) -> None:
    for index in range(20):
        image, mask = render_scene(0, index, spec)
        height, width = mask.shape
        assert spec.min_side <= height <= spec.max_side and spec.min_side <= width <= spec.max_side
        assert image.shape == (height, width, 3) and image.dtype == np.uint8 and mask.dtype == np.uint8
        assert mask.max() < len(SCENE_CLASSES)


@pytest.fixture(scope="module")
def class_counts() -> np.ndarray:
    """Pixel count of each class in each of NUM_SCENES scenes, shape [scenes, classes]."""
    return np.stack(
        [np.bincount(render_scene(0, i)[1].ravel(), minlength=len(SCENE_CLASSES)) for i in range(NUM_SCENES)]
    )


def test_pole_and_sign_are_rare(class_counts: np.ndarray) -> None:
    present = class_counts > 0
    for cls in (POLE, SIGN):
        assert 0 < present[:, cls].sum() <= 0.4 * NUM_SCENES, SCENE_CLASSES[cls]
    assert not (present[:, SIGN] & ~present[:, POLE]).any(), "a sign always hangs on a pole"
    assert present[:, [0, 1, 2, 3]].all(), "sky, road, building and vegetation are in every scene"


def test_pole_and_sign_are_small(class_counts: np.ndarray) -> None:
    fractions = class_counts / class_counts.sum(axis=1, keepdims=True)
    overall = class_counts.sum(axis=0) / class_counts.sum()
    for cls in (POLE, SIGN):
        assert 0 < overall[cls] < 0.01, SCENE_CLASSES[cls]
        assert fractions[fractions[:, cls] > 0, cls].mean() < 0.01, "small even in the scenes that have them"


def test_write_scenes_writes_pngs_and_classes(tmp_path: Path) -> None:
    root = tmp_path / "scenes"
    written = write_scenes(str(root), 3, seed=5, start=10)
    names = [f"scene_{i:05d}.png" for i in (10, 11, 12)]
    assert written == [f"{root}/images/{name}" for name in names]
    assert sorted(p.name for p in (root / "images").iterdir()) == names
    assert sorted(p.name for p in (root / "labels").iterdir()) == names
    for index, name in zip((10, 11, 12), names):
        image, mask = render_scene(5, index)
        assert np.array_equal(np.asarray(Image.open(root / "images" / name)), image)
        assert np.array_equal(np.asarray(Image.open(root / "labels" / name)), mask)

    classes = yaml.safe_load((root / "classes.yaml").read_text())["classes"]
    assert len(classes) == 7
    assert [c["name"] for c in classes] == list(SCENE_CLASSES)
    assert [tuple(c["colour"]) for c in classes] == list(SCENE_PALETTE)
    assert all(len(c["colour"]) == 3 and all(0 <= v <= 255 for v in c["colour"]) for c in classes)
