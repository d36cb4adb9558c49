"""`segmill show`: the image, the stored mask over it, with labels the ground truth and where they differ (panels
checked pixel by pixel), drawn with titles, a legend and a caption."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from segmill.jobs.cli import app
from segmill.jobs.query import connect
from segmill.jobs.show import render, shown
from segmill.pipeline.common.images import OVERLAY_ALPHA, decode_png
from segmill.pipeline.common.pictures import DIFFER
from segmill.pipeline.common.scenes import SCENE_CLASSES, SCENE_PALETTE

runner = CliRunner()


def _row(scene_results, image_uri: str) -> dict:
    return next(r for r in scene_results.table.to_pylist() if r["image_uri"] == image_uri)


def _blend(image: np.ndarray, classes: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return ((1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * palette[classes]).round().astype(np.uint8)


def test_panels_with_labels_carry_the_class_colours(scene_results) -> None:
    image_uri = str(sorted(scene_results.images.glob("scene_*.png"))[0])
    found = shown(connect(scene_results.output), image_uri, SCENE_CLASSES, SCENE_PALETTE)
    assert [title for title, _ in found.panels] == ["image", "prediction", "ground truth", "where they differ"]
    image = np.asarray(Image.open(image_uri).convert("RGB")).astype(np.float32)
    palette = np.array(SCENE_PALETTE, dtype=np.float32)
    mask = decode_png(_row(scene_results, image_uri)["mask"])
    label = np.asarray(Image.open(scene_results.labels / Path(image_uri).name))
    assert len(np.unique(mask)) > 1, "a one-class mask would prove little about colours"
    pictures = dict(found.panels)
    np.testing.assert_array_equal(pictures["image"], image.astype(np.uint8))
    np.testing.assert_array_equal(pictures["prediction"], _blend(image, mask, palette))
    np.testing.assert_array_equal(pictures["ground truth"], _blend(image, label, palette))
    wrong = (pictures["where they differ"] == DIFFER).all(axis=2)
    np.testing.assert_array_equal(wrong, mask != label)
    assert found.present == sorted(set(np.unique(mask)) | set(np.unique(label)))
    miou = _row(scene_results, image_uri)["miou"]
    assert f"image mIoU {miou:.3f}" in found.caption


def test_show_draws_a_png_with_legend_from_a_relative_path(scene_results, tmp_path: Path, monkeypatch) -> None:
    image_uri = sorted(scene_results.images.glob("scene_*.png"))[0]
    monkeypatch.chdir(image_uri.parent)
    out = tmp_path / "overlay.png"
    result = runner.invoke(app, ["show", scene_results.output, image_uri.name, "--output", str(out)])
    assert result.exit_code == 0, result.output
    picture = np.asarray(Image.open(out).convert("RGB"))
    width = Image.open(image_uri).width
    assert picture.shape[1] > 3 * width  # four panels side by side, at least three of them full
    colours = {tuple(c) for c in picture.reshape(-1, 3)[::7]}
    assert {tuple(c) for c in SCENE_PALETTE} & colours, "the legend's colour patches are drawn unblended"


def test_png_without_labels_has_two_panels(scene_results) -> None:
    found = shown(connect(scene_results.output), scene_results.unlabelled, SCENE_CLASSES, SCENE_PALETTE)
    assert [title for title, _ in found.panels] == ["image", "prediction"]
    width, height = Image.open(scene_results.unlabelled).size
    assert found.panels[1][1].shape == (height, width, 3)
    assert Image.open(io.BytesIO(render(scene_results.output, scene_results.unlabelled))).format == "PNG"


def test_show_names_a_missing_image_or_an_error_row(scene_results, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["show", scene_results.output, "/nowhere/x.png", "--output", str(tmp_path / "a.png")])
    assert missing.exit_code == 2 and "/nowhere/x.png has no row in the results" in missing.output
    broken = runner.invoke(app, ["show", scene_results.output, scene_results.broken, "--output", str(tmp_path / "b.png")])
    assert broken.exit_code == 2 and "its row is an error" in broken.output
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
