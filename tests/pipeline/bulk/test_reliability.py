"""Defects hostile input found, each reproduced here: files the listing dropped, 16-bit and signed labels, output
inside the input, names redaction rewrote, errors that must be retried, settings not checked up front, two runs
of one job at once, tracebacks where one sentence belongs."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from segmill.jobs.cli import app
from segmill.pipeline import SegmentConfig, segment
from segmill.pipeline.bulk.lease import JobLease
from segmill.pipeline.bulk.record import read_job_record
from segmill.pipeline.bulk.recovery import LOST_REASON
from segmill.pipeline.bulk.results import STAGING, build_table, commit_table
from segmill.pipeline.bulk.rows import error_rows
from segmill.pipeline.common.decode import DecodeError, decode_label
from segmill.pipeline.common.images import encode_png
from segmill.pipeline.common.model_source import resolve_model
from segmill.pipeline.common.scenes import SCENE_CLASSES

runner = CliRunner()


def _images(scenes_dir: Path, target: Path, count: int) -> list[Path]:
    target.mkdir(parents=True)
    copied = []
    for path in sorted((scenes_dir / "images").glob("*.png"))[:count]:
        copied.append(Path(shutil.copy(path, target / path.name)))
    return copied


def test_every_format_pillow_reads_is_listed_and_what_is_left_out_is_counted(ray_session, scenes_dir, tiny_checkpoint,
                                                                             tmp_path, results_reader) -> None:
    """A GIF got no row (53 files in, 52 rows out, and the job said nothing); now its first frame is segmented."""
    images = tmp_path / "images"
    _images(scenes_dir, images, 2)
    frames = [Image.fromarray(np.full((40, 50, 3), v, np.uint8)) for v in (20, 220)]
    frames[0].save(images / "animated.gif", save_all=True, append_images=frames[1:])
    (images / "notes.txt").write_text("not an image")
    (images / "meta.json").write_text("{}")
    config = SegmentConfig(input=str(images), output=str(tmp_path / "out"), model=tiny_checkpoint)
    record = segment(config)
    rows = {Path(r["image_uri"]).name: r for r in results_reader(config.output).to_pylist()}
    assert sorted(rows) == ["animated.gif", "scene_00000.png", "scene_00001.png"]
    assert rows["animated.gif"]["status"] == "ok" and (rows["animated.gif"]["height"], rows["animated.gif"]["width"]) == (40, 50)
    assert record.skipped_files == {".txt": 1, ".json": 1}
    assert read_job_record(config.output)["skipped_files"] == {".txt": 1, ".json": 1}


def test_sixteen_bit_labels_keep_their_values_and_negative_ones_are_errors(tmp_path) -> None:
    """Values wrapped at 256 (300 -> 44); a -1 pixel was silently ignored."""
    values = np.array([[0, 299], [280, 65535]], dtype=np.uint16)
    label = decode_label(encode_png(values), "l.png", (2, 2), 300, 65535)
    assert label.dtype == np.uint16 and label.tolist() == values.tolist()
    signed = Image.fromarray(np.array([[0, -1], [1, 2]], dtype=np.int32), mode="I")
    path = tmp_path / "signed.tif"  # a 32-bit signed label (PNG cannot hold one)
    signed.save(path)
    with pytest.raises(DecodeError, match=r"class values \[-1\] outside the 300 classes"):
        decode_label(path.read_bytes(), str(path), (2, 2), 300, 65535)
    assert decode_label(encode_png(np.array([[0, 6], [255, 3]], np.uint8)), "l.png", (2, 2), 7, 255).dtype == np.uint8


def test_the_output_inside_the_input_is_never_listed(ray_session, scenes_dir, tiny_checkpoint, tmp_path,
                                                    results_reader) -> None:
    """With --export-png a re-run segmented the tool's own PNGs: 3 rows became 9."""
    images = tmp_path / "images"
    _images(scenes_dir, images, 3)
    config = SegmentConfig(input=str(images), output=str(images / "results"), model=tiny_checkpoint, export_png=True)
    segment(config)
    assert len(list((images / "results" / "png").rglob("*.png"))) == 6, "the PNGs are there to be found"
    again = segment(config)
    assert (again.rows, again.processed_this_run) == (3, 0)
    assert results_reader(config.output).num_rows == 3


def test_names_that_look_like_query_strings_are_kept_whole(ray_session, scenes_dir, tiny_checkpoint, tmp_path,
                                                           results_reader) -> None:
    """Local files x?sig=1.png and x?sig=2.png were both stored as x?sig=***: one row could not be told from the
    other, and resume keys collided."""
    images = tmp_path / "images"
    images.mkdir()
    source = sorted((scenes_dir / "images").glob("*.png"))
    shutil.copy(source[0], images / "x?sig=1.png")
    shutil.copy(source[1], images / "x?sig=2.png")
    config = SegmentConfig(input=str(images), output=str(tmp_path / "out"), model=tiny_checkpoint)
    segment(config)
    assert sorted(Path(u).name for u in results_reader(config.output)["image_uri"].to_pylist()) == \
        ["x?sig=1.png", "x?sig=2.png"]
    assert segment(config).processed_this_run == 0, "both are known as committed"


def test_infrastructure_errors_are_retried_by_the_next_run_and_input_errors_only_when_asked(
        ray_session, scenes_dir, tiny_checkpoint, tmp_path, results_reader) -> None:
    images = tmp_path / "images"
    paths = _images(scenes_dir, images, 4)
    (images / "broken.png").write_bytes(b"not an image")
    config = SegmentConfig(input=str(images), output=str(tmp_path / "out"), model=tiny_checkpoint)
    first = segment(config)
    assert (first.rows, first.error_rows) == (5, 1)
    # Play a run whose model actor crashed on two images: their rows are lost-batch errors (infrastructure).
    table = results_reader(config.output)
    lost = [str(p) for p in paths[:2]]
    for part in (tmp_path / "out").glob("part-*.parquet"):
        part.unlink()
    kept = table.filter(pa.array([u not in lost for u in table["image_uri"].to_pylist()]))
    commit_table(kept, config.output, first.job_id, endpoint_url=None, row_group_rows=100)
    batch = error_rows(lost, [None] * 2, [LOST_REASON.format(uri=u) for u in lost], len(SCENE_CLASSES),
                       "infrastructure")
    commit_table(build_table(batch, SCENE_CLASSES, job_id=first.job_id, model_name=first.model_name,
                             model_version=first.model_version), config.output, first.job_id, endpoint_url=None,
                 row_group_rows=100)
    assert results_reader(config.output).num_rows == 5

    second = segment(config)
    assert second.processed_this_run == 2, "the two infrastructure errors, not the broken file"
    rows = {Path(r["image_uri"]).name: r for r in results_reader(config.output).to_pylist()}
    assert len(rows) == 5 and results_reader(config.output).num_rows == 5, "nothing lost, nothing doubled"
    assert all(rows[p.name]["status"] == "ok" for p in paths)
    assert rows["broken.png"]["status"] == "error" and rows["broken.png"]["error_kind"] == "input"
    assert segment(config).processed_this_run == 0
    third = segment(config.replace(retry_errors=True))
    assert third.processed_this_run == 1 and results_reader(config.output).num_rows == 5


@pytest.mark.parametrize("bad, key", [
    ({"resources": {"actors_max": 0}}, "actors_max"),
    ({"resources": {"actors_max": -2}}, "actors_max"),
    ({"tile_size": 0}, "tile_size"),
    ({"max_pixels": -1}, "max_pixels"),
    ({"resources": {"batch_size": 0}}, "batch_size"),
])
def test_settings_are_checked_before_any_work(bad: dict, key: str) -> None:
    with pytest.raises(ValueError) as info:
        SegmentConfig.from_dict({"input": "in", "output": "out", "model": "m.pt", **bad})
    assert f"'{key}'" in str(info.value) and "must be" in str(info.value) and "\n" not in str(info.value)


def test_a_second_run_of_the_same_job_is_told_who_holds_the_output(ray_session, scenes_dir, tiny_checkpoint,
                                                                  tmp_path) -> None:
    images = tmp_path / "images"
    _images(scenes_dir, images, 1)
    config = SegmentConfig(input=str(images), output=str(tmp_path / "out"), model=tiny_checkpoint, job_id="twice")
    holder = JobLease(config.output, "twice", STAGING)
    holder.acquire()  # a live run of this machine holds it
    try:
        with pytest.raises(ValueError, match=r"Another run of job twice is writing .*out \(host .*, pid "
                                             rf"{os.getpid()}, since .*\); wait for it to finish"):
            segment(config)
    finally:
        holder.release()
    assert segment(config).ok_rows == 1, "once the other run is done, the job runs"
    assert not (tmp_path / "out" / STAGING).exists()


def test_a_stale_lease_of_a_process_that_is_gone_is_taken_over(tmp_path) -> None:
    gone = JobLease(str(tmp_path / "out"), "j", STAGING)
    gone.owner["pid"] = 2**22 + 12345  # no such process
    gone.acquire()
    gone._stop.set()  # it stops renewing, as a killed run would
    taker = JobLease(str(tmp_path / "out"), "j", STAGING)
    taker.acquire()
    taker.release()


def test_mistakes_that_printed_tracebacks_are_one_sentence(tmp_path, scenes_dir, tiny_checkpoint) -> None:
    folder = tmp_path / "model-folder"
    folder.mkdir()
    result = runner.invoke(app, ["segment", str(scenes_dir / "images"), str(tmp_path / "out"), "--model", str(folder)])
    assert result.exit_code == 2 and "is a folder; name the checkpoint file in it" in result.output
    manifest = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"image_uri": [["a.png"], ["b.png"]]}), manifest)
    result = runner.invoke(app, ["segment", str(manifest), str(tmp_path / "out2"), "--model", tiny_checkpoint])
    assert result.exit_code == 2 and "column 'image_uri' must hold URIs as text" in result.output


def test_a_registry_uri_without_a_tracking_server_writes_nothing_here(tmp_path, monkeypatch) -> None:
    """A failed models:/ lookup left an mlflow.db in the working directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="no MLflow tracking server is given; pass --tracking-uri"):
        resolve_model("models:/roads@champion")
    assert list(tmp_path.iterdir()) == []
