"""Images whose batches Ray gave up on (a crashing actor) still get exactly one row: an error row; and the
listing is read so that a long job does not grow the model actor's memory.

A real actor crash cannot be produced on demand here, so the test plays the end of such a run: the listing
exists, some rows were committed, the rest were lost; recovery must fill in exactly the lost ones.
"""
from __future__ import annotations

from pathlib import Path

from segmill.pipeline.config import SegmentConfig
from segmill.pipeline.recovery import commit_lost_rows, error_batch
from segmill.pipeline.results import build_table, commit_table, committed_rows
from segmill.pipeline.scenes import SCENE_CLASSES
from segmill.pipeline.segment import prepare


def test_lost_images_become_error_rows_exactly_once(scenes_dir: Path, tiny_checkpoint: str, tmp_path: Path) -> None:
    config = SegmentConfig(input=str(scenes_dir / "images"), labels=str(scenes_dir / "labels"),
                           output=str(tmp_path / "out"), model=tiny_checkpoint)
    plan = prepare(config)
    images = sorted(str(p) for p in (scenes_dir / "images").glob("*.png"))
    survivors = error_batch(images[:3], [None] * 3, len(SCENE_CLASSES))  # stands for rows that did get committed
    table = build_table(survivors, SCENE_CLASSES, job_id=plan.job_id, model_name="m", model_version="1")
    commit_table(table, config.output, plan.job_id, endpoint_url=None, row_group_rows=100)

    def recover() -> int:
        return commit_lost_rows(plan.listing_dir, config.output, job_id=plan.job_id, classes=SCENE_CLASSES,
                                model_name="m", model_version="1", endpoint_url=None, rows_per_file=4,
                                row_group_rows=100)

    assert recover() == len(images) - 3
    assert recover() == 0, "a second pass finds nothing lost"
    rows = committed_rows(config.output, None, ["image_uri", "status", "error", "label_uri"]).to_pylist()
    assert sorted(r["image_uri"] for r in rows) == images
    lost = [r for r in rows if r["image_uri"] not in images[:3]]
    assert all(r["status"] == "error" and r["error"].startswith(r["image_uri"]) for r in lost)
    assert all(r["label_uri"] and r["label_uri"].endswith(Path(r["image_uri"]).name) for r in lost)


def test_the_listing_is_read_with_the_reader_that_keeps_actor_memory_flat(ray_session, scenes_dir: Path,
                                                                           tiny_checkpoint: str, tmp_path: Path) -> None:
    """Ray 2.60's V2 Parquet reader (ListFiles -> ReadFiles) grew the model actor's memory with every batch
    (README "Throughput"); the job reads its listing with the V1 reader. A slow memory test would be noisy here,
    so the plan is checked: this fails if the flag is dropped or Ray stops honouring it."""
    import importlib

    job = importlib.import_module("segmill.pipeline.segment")  # the module; the package's `segment` is the function
    config = SegmentConfig(input=str(scenes_dir / "images"), output=str(tmp_path / "out"), model=tiny_checkpoint)
    node, names = job._dataset(config, prepare(config))._logical_plan.dag, []
    while node is not None:
        names.append(node.name)
        node = node.input_dependencies[0] if node.input_dependencies else None
    assert names[-1] == "ReadParquet" and not any("ReadFiles" in n or "ListFiles" in n for n in names), names
