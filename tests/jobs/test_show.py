"""`segmill show`: the stored mask over the image (ground truth beside it with labels), checked by size and colour."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from segmill.jobs.cli import app
from segmill.jobs.show import render
from segmill.pipeline.common.images import OVERLAY_ALPHA, decode_png
from segmill.pipeline.common.scenes import SCENE_PALETTE

runner = CliRunner()


def _row(scene_results, image_uri: str) -> dict:
    return next(r for r in scene_results.table.to_pylist() if r["image_uri"] == image_uri)


def _blend(image: np.ndarray, classes: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return ((1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * palette[classes]).round().astype(np.uint8)


def test_png_with_labels_is_twice_as_wide_and_carries_the_class_colours(scene_results, tmp_path: Path) -> None:
    image_uri = str(sorted(scene_results.images.glob("scene_*.png"))[0])
    out = tmp_path / "overlay.png"
    result = runner.invoke(app, ["show", scene_results.output, image_uri, "--output", str(out)])
    assert result.exit_code == 0, result.output
    picture = np.asarray(Image.open(out))
    image = np.asarray(Image.open(image_uri).convert("RGB")).astype(np.float32)
    height, width = image.shape[:2]
    assert picture.shape == (height, 2 * width, 3)
    palette = np.array(SCENE_PALETTE, dtype=np.float32)  # the model's palette, found through _job.json
    mask = decode_png(_row(scene_results, image_uri)["mask"])
    label = np.asarray(Image.open(scene_results.labels / Path(image_uri).name))
    assert len(np.unique(mask)) > 1, "a one-class mask would prove little about colours"
    np.testing.assert_array_equal(picture[:, :width], _blend(image, mask, palette))
    np.testing.assert_array_equal(picture[:, width:], _blend(image, label, palette))


def test_png_without_labels_is_the_image_size(scene_results, tmp_path: Path) -> None:
    picture = render(scene_results.output, scene_results.unlabelled)
    width, height = Image.open(scene_results.unlabelled).size
    assert picture.shape == (height, width, 3)


def test_show_names_a_missing_image_or_an_error_row(scene_results, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["show", scene_results.output, "/nowhere/x.png", "--output", str(tmp_path / "a.png")])
    assert missing.exit_code == 2 and "/nowhere/x.png has no row in results" in missing.output
    broken = runner.invoke(app, ["show", scene_results.output, scene_results.broken, "--output", str(tmp_path / "b.png")])
    assert broken.exit_code == 2 and "its row is an error" in broken.output
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
