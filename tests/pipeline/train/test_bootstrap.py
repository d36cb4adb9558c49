"""Hard-class bootstrapping: the cached class-presence index, choosing hard classes, and the epoch stream."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import segmill.pipeline.train.bootstrap as bootstrap
from segmill.pipeline.bulk.results import dataset_iou
from segmill.pipeline.common.images import encode_png
from segmill.pipeline.common.scenes import SCENE_CLASSES, write_scenes
from segmill.pipeline.train.bootstrap import (
    class_presence_index,
    default_index_uri,
    hard_classes_from_iou,
    hard_classes_from_results,
)
from segmill.pipeline.train.sampling import class_stats

NUM_CLASSES = len(SCENE_CLASSES)
POLE, SIGN = SCENE_CLASSES.index("pole"), SCENE_CLASSES.index("sign")
NUM_SCENES = 24


@pytest.fixture()
def scenes(tmp_path: Path) -> list[tuple[str, str]]:
    images = write_scenes(str(tmp_path / "set"), NUM_SCENES, seed=0)
    return [(uri, uri.replace("/images/", "/labels/")) for uri in images]


@pytest.fixture()
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every label URI the index reads, in order."""
    seen: list[str] = []
    original = bootstrap.read_bytes

    def counting(uri: str, endpoint_url: str | None = None) -> bytes:
        seen.append(uri)
        return original(uri, endpoint_url)

    monkeypatch.setattr(bootstrap, "read_bytes", counting)
    return seen


def _index(pairs: list[tuple[str, str]], tmp_path: Path) -> pa.Table:
    return class_presence_index(pairs, NUM_CLASSES, cache_uri=default_index_uri(str(tmp_path / "set" / "labels")))


def test_index_matches_masks(scenes: list[tuple[str, str]], tmp_path: Path) -> None:
    index = _index(scenes, tmp_path)
    assert index.column_names == ["image_uri", "label_uri", "label_fingerprint", "status", "error", "present", "pixels"]
    assert index["image_uri"].to_pylist() == [image for image, _ in scenes]
    for row in index.to_pylist():
        mask = np.asarray(Image.open(row["label_uri"]))
        assert row["status"] == "ok" and row["error"] is None
        assert row["present"] == np.unique(mask).tolist()
        assert row["pixels"] == np.bincount(mask.ravel(), minlength=NUM_CLASSES).tolist()
    rare = sum(POLE in p for p in index["present"].to_pylist())
    assert 0 < rare < NUM_SCENES, "the set must mix images with and without the rare classes"


def test_cache_is_reused_and_invalidated_per_label(scenes: list[tuple[str, str]], tmp_path: Path,
                                                    reads: list[str]) -> None:
    cache = tmp_path / "set" / "labels" / bootstrap.PRESENCE_INDEX_NAME
    first = _index(scenes, tmp_path)
    assert len(reads) == NUM_SCENES and cache.exists()
    reads.clear()
    again = _index(scenes, tmp_path)
    assert reads == [] and again.equals(first)

    changed = scenes[3][1]
    relabelled = np.full_like(np.asarray(Image.open(changed)), SIGN)
    relabelled[:2] = 255  # the ignore index counts for no class
    Path(changed).write_bytes(encode_png(relabelled))
    third = _index(scenes, tmp_path)
    assert reads == [changed]
    assert third["present"][3].as_py() == [SIGN]
    assert third["pixels"][3].as_py()[SIGN] == relabelled.size - 2 * relabelled.shape[1]
    assert third.slice(4).equals(first.slice(4))

    reads.clear()
    fewer = _index(scenes[:-2], tmp_path)
    assert reads == [] and fewer.num_rows == NUM_SCENES - 2
    assert pq.read_table(cache).num_rows == NUM_SCENES - 2, "removed labels are dropped from the cache"


def test_cache_voided_when_classes_change(scenes: list[tuple[str, str]], tmp_path: Path, reads: list[str]) -> None:
    cache_uri = str(tmp_path / "index.parquet")
    class_presence_index(scenes[:3], NUM_CLASSES, cache_uri=cache_uri)
    reads.clear()
    class_presence_index(scenes[:3], NUM_CLASSES + 1, cache_uri=cache_uri)
    assert len(reads) == 3


def test_bad_labels_are_reported_not_raised(scenes: list[tuple[str, str]], tmp_path: Path,
                                            reads: list[str]) -> None:
    pairs = scenes[:3]
    outside, colour, missing = (str(tmp_path / name) for name in ("outside.png", "colour.png", "missing.png"))
    Image.fromarray(np.full((8, 8), 9, dtype=np.uint8)).save(outside)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(colour)
    Path(tmp_path / "garbage.png").write_bytes(b"not a png")
    bad = [outside, colour, str(tmp_path / "garbage.png"), missing]
    index = class_presence_index(pairs + [(f"img{i}.png", uri) for i, uri in enumerate(bad)], NUM_CLASSES,
                                 cache_uri=str(tmp_path / "index.parquet"))
    assert index["status"].to_pylist() == ["ok"] * 3 + ["error"] * 4
    errors = index["error"].to_pylist()[3:]
    assert "[9]" in errors[0] and "mode RGB" in errors[1] and "not a readable image" in errors[2]
    assert "not found" in errors[3]
    assert all(p == [] for p in index["present"].to_pylist()[3:])
    reads.clear()
    class_presence_index(pairs + [(f"img{i}.png", uri) for i, uri in enumerate(bad)], NUM_CLASSES,
                         cache_uri=str(tmp_path / "index.parquet"))
    assert reads == [], "bad labels are cached too, and a missing one is never read"
    assert class_stats(index, NUM_CLASSES).rows.tolist() == [0, 1, 2], "training plans leave bad labels out"


def test_hard_classes_from_iou() -> None:
    iou = {"sky": 0.95, "road": 0.9, "pole": 0.2, "sign": float("nan"), "vehicle": 0.5, "tree": None}
    assert hard_classes_from_iou(iou) == ["pole", "vehicle"]
    assert hard_classes_from_iou(iou, 1) == ["pole"]
    assert hard_classes_from_iou(iou, None, threshold=0.92) == ["pole", "vehicle", "road"]
    assert hard_classes_from_iou(iou, 2, threshold=0.3) == ["pole"]
    assert hard_classes_from_iou({"a": 0.5, "b": 0.5, "c": 0.5}, 2) == ["a", "b"], "ties keep class order"
    with pytest.raises(ValueError):
        hard_classes_from_iou(iou, None)


def _struct(rows: list[list[int] | None], classes: tuple[str, ...]) -> pa.StructArray:
    """Per-class counts as a struct column; a None row is a null struct over junk child values (must be skipped)."""
    values = np.array([r or [10_000] * len(classes) for r in rows], dtype=np.int64)
    valid = np.array([r is not None for r in rows])
    fields = [pa.array(values[:, c], pa.int64()) for c in range(len(classes))]
    return pa.StructArray.from_arrays(fields, names=list(classes), mask=pa.array(~valid))


def test_hard_classes_from_results(tmp_path: Path) -> None:
    classes = ("sky", "road", "pole", "sign")
    # Per-image IoU of pole averages to (0.9 + 0.1) / 2 = 0.5, but summed counts give 91/190 = 0.479;
    # sign is absent everywhere (undefined) and skipped; the third row is an unlabelled image (null structs).
    parts = [
        {"image_uri": ["a", "b"], "intersection": _struct([[90, 50, 90, 0], [80, 40, 1, 0]], classes),
         "union": _struct([[100, 60, 100, 0], [100, 50, 90, 0]], classes)},
        {"image_uri": ["c"], "intersection": _struct([None], classes), "union": _struct([None], classes)},
    ]
    results = tmp_path / "results"
    results.mkdir()
    for i, part in enumerate(parts):
        pq.write_table(pa.table(part), results / f"part-{i}.parquet")
    pq.write_table(pa.table({"x": [1]}), results / "_job.parquet")  # not a part: never read
    iou = dataset_iou(str(results), classes)
    assert iou["sky"] == pytest.approx(170 / 200) and iou["road"] == pytest.approx(90 / 110)
    assert iou["pole"] == pytest.approx(91 / 190) and math.isnan(iou["sign"])
    assert hard_classes_from_results(str(results), classes, 2) == ["pole", "road"]
    with pytest.raises(ValueError, match="no counts for classes"):
        dataset_iou(str(results), classes + ("vehicle",))
    with pytest.raises(ValueError, match="no results rows"):
        dataset_iou(str(tmp_path / "empty"), classes)
