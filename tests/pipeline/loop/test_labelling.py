"""Labelling packages out (CVAT, Label Studio) and CVAT labels back in."""
from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from segmill.pipeline.common.classes import ClassFile
from segmill.pipeline.common.images import colourise, decode_png, encode_png
from segmill.pipeline.loop.labelling import brush_rle, decode_brush_rle, import_cvat, write_package
from segmill.pipeline.loop.select import select

CLASSES = ClassFile(("road", "car", "pole"), ((128, 64, 128), (64, 0, 128), (192, 192, 128)), 255)


def test_brush_rle_matches_label_studio():
    mask = np.array([[0, 1, 1], [0, 0, 1]], dtype=bool)
    # label-studio-converter 0.0.59's brush.encode_rle of the same RGBA bytes (its decode_rle reads ours back too;
    # it is not a dependency because its brush module pulls in OpenCV).
    assert brush_rle(mask) == [0, 0, 0, 24, 57, 27, 252, 96, 19, 255, 206, 1, 31, 248]
    rng = np.random.default_rng(0)
    for shape, share in (((64, 80), 0.02), ((300, 1), 0.5), ((40, 40), 1.0), ((17, 300), 0.0)):
        mask = rng.random(shape) < share
        mask[: shape[0] // 3] |= share > 0.3  # long runs, longer than the largest run class
        assert (decode_brush_rle(brush_rle(mask)) == np.repeat(np.where(mask.ravel(), 255, 0), 4)).all()


def _results_with_masks(tmp_path: Path) -> tuple[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    images, masks = tmp_path / "images", {}
    images.mkdir()
    for k, name in enumerate(("a/0001.png", "b/0001.png", "street.jpg")):
        path = images / name
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
        mask = np.zeros((24, 32), np.uint8)
        mask[:, 10:] = 1
        mask[5:9, 20 + k] = 2
        masks[str(path)] = mask
    uris = list(masks)
    struct = pa.struct([(c, pa.float32()) for c in CLASSES.names])
    table = pa.table({
        "image_uri": uris, "label_uri": pa.nulls(3, pa.string()), "status": ["ok"] * 3,
        "confidence_mean": pa.array([0.5, 0.6, 0.7], pa.float32()),
        "entropy_mean": pa.array([0.5, 0.4, 0.3], pa.float32()),
        "class_fraction": pa.array([{c: float((m == i).mean()) for i, c in enumerate(CLASSES.names)}
                                    for m in masks.values()], struct),
        "mask": [encode_png(m) for m in masks.values()],
    })
    (tmp_path / "results").mkdir()
    pq.write_table(table, tmp_path / "results" / "part-00000-test.parquet")
    return str(tmp_path / "results"), masks


def test_package_for_both_tools_and_cvat_labels_come_back_as_the_masks(tmp_path: Path):
    results, masks = _results_with_masks(tmp_path)
    selection = select(results, 3, hard_classes=["pole"])
    written = write_package(selection, results, str(tmp_path / "batch"), CLASSES, model_version="7")
    batch = tmp_path / "batch"

    manifest = duckdb.sql(f"SELECT image_uri, rank FROM '{written['manifest']}' ORDER BY rank").fetchall()
    assert [uri for uri, _ in manifest] == selection.table["image_uri"].to_pylist()
    assert (batch / "manifest.csv").read_text().startswith('"image_uri","rank"')
    # Two images share the name 0001.png: the package names them by their folder too.
    assert sorted(p.name for p in (batch / "cvat" / "images").iterdir()) == ["a_0001.png", "b_0001.png", "street.jpg"]

    tasks = json.loads((batch / "label-studio" / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == selection.table["image_uri"].to_pylist()
    for task in tasks:
        prediction = task["predictions"][0]
        assert prediction["model_version"] == "7"
        mask = masks[task["data"]["image"]]
        for result in prediction["result"]:
            assert (result["original_height"], result["original_width"]) == mask.shape
            cls = CLASSES.names.index(result["value"]["brushlabels"][0])
            rgba = decode_brush_rle(result["value"]["rle"]).reshape(*mask.shape, 4)
            assert ((rgba[..., 3] == 255) == (mask == cls)).all()
    config = ElementTree.fromstring((batch / "label-studio" / "label_config.xml").read_text())
    assert [(e.get("value"), e.get("background")) for e in config.iter("Label")] == [
        ("road", "#804080"), ("car", "#400080"), ("pole", "#c0c080")]

    with zipfile.ZipFile(batch / "cvat" / "prelabels.zip") as archive:
        assert "labelmap.txt" in archive.namelist()
        stems = archive.read("ImageSets/Segmentation/default.txt").decode().split()
    assert sorted(stems) == ["a_0001", "b_0001", "street"]

    # A labeller who accepts every pre-label exports the same colours: the import gives the model's masks back.
    done = import_cvat(str(batch / "cvat" / "prelabels.zip"), CLASSES, str(tmp_path / "labels"))
    assert done.labels == 3
    names = {"a_0001.png": "a/0001.png", "b_0001.png": "b/0001.png", "street.png": "street.jpg"}
    for written_name, source in names.items():
        label = decode_png((tmp_path / "labels" / written_name).read_bytes())
        assert (label == masks[str(tmp_path / "images" / source)]).all()
    assert done.classes_seen["pole"] == 12


def _export(folder: Path, labelmap: str, mask_rgb: np.ndarray) -> Path:
    archive = folder / "export.zip"
    folder.mkdir(exist_ok=True)
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("labelmap.txt", labelmap)
        buffer = io.BytesIO()
        Image.fromarray(mask_rgb).save(buffer, format="PNG")
        z.writestr("SegmentationClass/frame.png", buffer.getvalue())
    return archive


LABELMAP = ("# label:color_rgb:parts:actions\nbackground:0,0,0::\nroad:128,64,128::\ncar:64,0,128::\n"
            "pole:192,192,128::\n")


def test_cvat_background_is_ignored_and_bad_exports_write_nothing(tmp_path: Path):
    index = np.array([[0, 1, 2], [1, 1, 0]], np.uint8)
    rgb = colourise(index, CLASSES.palette)
    rgb[0, 0] = (0, 0, 0)  # not labelled in CVAT
    done = import_cvat(str(_export(tmp_path / "good", LABELMAP, rgb)), CLASSES, str(tmp_path / "labels"))
    label = decode_png((tmp_path / "labels" / "frame.png").read_bytes())
    assert label.tolist() == [[255, 1, 2], [1, 1, 0]]
    assert done.classes_seen == {"road": 1, "car": 3, "pole": 1}

    stray = rgb.copy()
    stray[1, 2] = (1, 2, 3)
    with pytest.raises(ValueError, match=r"CVAT mask SegmentationClass/frame.png of .* has colour \(1, 2, 3\), which "
                                         "labelmap.txt does not name; nothing was imported"):
        import_cvat(str(_export(tmp_path / "stray", LABELMAP, stray)), CLASSES, str(tmp_path / "out1"))
    assert not (tmp_path / "out1").exists()
    with pytest.raises(ValueError, match="CVAT label 'tree' of .* is not a class of the class file"):
        import_cvat(str(_export(tmp_path / "tree", LABELMAP + "tree:0,128,0::\n", rgb)), CLASSES, str(tmp_path / "o2"))
    assert not (tmp_path / "o2").exists()
    (tmp_path / "notzip.zip").write_text("hello")
    with pytest.raises(ValueError, match="is neither a zip file nor a folder"):
        import_cvat(str(tmp_path / "notzip.zip"), CLASSES, str(tmp_path / "o3"))
    with pytest.raises(ValueError, match="does not exist"):
        import_cvat(str(tmp_path / "missing.zip"), CLASSES, str(tmp_path / "o4"))


def test_names_for_the_tools_are_unique_and_colours_never_shared():
    from segmill.pipeline.loop.labelling import _labelmap, unique_names

    uris = ["s3://b/day1/cam/0001.png", "s3://b/day2/cam/0001.png", "s3://b/x/a.png", "s3://b/x/a.jpg"]
    names = unique_names(uris)
    stems = [n.rsplit(".", 1)[0] for n in names.values()]
    assert len(set(stems)) == 4, names  # one mask per image, none overwritten
    black = ClassFile(("Sky", "Road"), ((0, 0, 0), (128, 64, 128)))
    with pytest.raises(ValueError, match=r"gives colour \(0, 0, 0\) to two labels"):
        _labelmap(b"background:0,0,0::\nSky:0,0,0::\n", "export.zip", black)
    with pytest.raises(ValueError, match="names no label"):
        _labelmap(b"# label:color_rgb:parts:actions\n", "export.zip", black)


def test_a_black_class_leaves_background_another_colour(tmp_path: Path):
    results, masks = _results_with_masks(tmp_path)
    black = ClassFile(("road", "car", "pole"), ((0, 0, 0), (64, 0, 128), (192, 192, 128)), 255)
    write_package(select(results, 3), results, str(tmp_path / "batch"), black)
    with zipfile.ZipFile(tmp_path / "batch" / "cvat" / "prelabels.zip") as archive:
        lines = archive.read("labelmap.txt").decode().splitlines()
    assert "background:1,1,1::" in lines and "road:0,0,0::" in lines
    done = import_cvat(str(tmp_path / "batch" / "cvat" / "prelabels.zip"), black, str(tmp_path / "labels"))
    assert done.labels == 3 and done.classes_seen["road"] > 0


def test_a_label_map_without_background_leaves_black_pixels_unlabelled(tmp_path: Path):
    """CVAT paints pixels no label covers black; a label map without a `background` line (hand-edited, or a task
    made without one) must still import them as unlabelled, not stop at an 'unknown colour'. A black class keeps
    black for itself."""
    from segmill.pipeline.loop.labelling import _labelmap

    index = np.array([[0, 1, 2], [1, 1, 0]], np.uint8)
    rgb = colourise(index, CLASSES.palette)
    rgb[0, 0] = rgb[1, 2] = (0, 0, 0)
    without = "\n".join(line for line in LABELMAP.splitlines() if not line.startswith("background")) + "\n"
    assert "background" not in without
    done = import_cvat(str(_export(tmp_path / "export", without, rgb)), CLASSES, str(tmp_path / "labels"))
    assert decode_png((tmp_path / "labels" / "frame.png").read_bytes()).tolist() == [[255, 1, 2], [1, 1, 255]]
    assert done.classes_seen == {"road": 0, "car": 3, "pole": 1}
    black = ClassFile(("Sky", "Road"), ((0, 0, 0), (128, 64, 128)))
    assert _labelmap(b"Sky:0,0,0::\nRoad:128,64,128::\n", "export.zip", black)[0] == 0  # Sky, not ignored
