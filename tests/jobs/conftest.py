"""A results table made by the bulk job, shared by the query, answer and show tests of tests/jobs."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest


@dataclass(frozen=True)
class SceneResults:
    output: str  # the results folder
    images: Path
    labels: Path
    table: pa.Table  # read back with pyarrow (the reference the SQL answers are checked against)
    broken: str  # image_uri of the one unreadable file (an error row)
    unlabelled: str  # image_uri of an image without a label (ok row, no IoU)


@pytest.fixture(scope="session")
def scene_results(ray_session, scenes_dir: Path, tiny_checkpoint: str, tmp_path_factory, results_reader) -> SceneResults:
    """Six of the generated scenes with labels, one without (blank in the manifest), and one broken file, listed
    by a CSV manifest and segmented by `segment` once."""
    import csv

    from segmill.pipeline import SegmentConfig, segment

    root = tmp_path_factory.mktemp("scene-results")
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    for path in sorted((scenes_dir / "images").glob("*.png"))[:6]:
        shutil.copy(path, images / path.name)
        shutil.copy(scenes_dir / "labels" / path.name, labels / path.name)
    shutil.copy(sorted((scenes_dir / "images").glob("*.png"))[6], images / "unlabelled.png")
    (images / "broken.png").write_bytes(b"not a png at all")
    (labels / "broken.png").write_bytes(b"no label either")
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image_uri", "label_uri"])
        for path in sorted(images.glob("*.png")):
            writer.writerow([str(path), "" if path.name == "unlabelled.png" else str(labels / path.name)])
    output = str(root / "results")
    segment(SegmentConfig(input=str(root / "manifest.csv"), output=output, model=tiny_checkpoint))
    return SceneResults(output, images, labels, results_reader(output), str(images / "broken.png"),
                        str(images / "unlabelled.png"))
