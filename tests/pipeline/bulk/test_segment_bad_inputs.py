"""Bad inputs: every file becomes one row (ok, or error with a one-sentence reason); jobs that cannot succeed
fail before any compute with a ValueError."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from segmill.pipeline import SegmentConfig, segment
from segmill.pipeline.bulk.record import JobRecord, read_job_record
from segmill.pipeline.common.images import decode_png, encode_png
from segmill.pipeline.common.listing import IMAGE_EXTENSIONS

MAX_PIXELS = 300 * 300
GOOD, WRONG_SIZE_LABEL, BAD_CLASS_LABEL, NO_LABEL = range(4), 4, 5, 6
CONVERTIBLE = ["grey16", "rgba", "palette", "cmyk", "rotated"]


@dataclass(frozen=True)
class BadRun:
    root: Path
    config: SegmentConfig
    record: JobRecord
    rows: dict[str, dict]  # by file name


def _scene(i: int) -> str:
    return f"scene_{i:05d}.png"


@pytest.fixture(scope="module")
def bad_run(ray_session, scenes_dir: Path, sample_files, tiny_checkpoint: str, tmp_path_factory,
            results_reader) -> BadRun:
    root = tmp_path_factory.mktemp("bad")
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    shutil.copy(scenes_dir / "classes.yaml", root / "classes.yaml")
    for i in [*GOOD, WRONG_SIZE_LABEL, BAD_CLASS_LABEL, NO_LABEL]:
        shutil.copy(scenes_dir / "images" / _scene(i), images / _scene(i))
    for i in GOOD:
        shutil.copy(scenes_dir / "labels" / _scene(i), labels / _scene(i))
    label = np.asarray(Image.open(scenes_dir / "labels" / _scene(WRONG_SIZE_LABEL)))
    (labels / _scene(WRONG_SIZE_LABEL)).write_bytes(encode_png(label[:-3]))  # three rows short
    label = np.asarray(Image.open(scenes_dir / "labels" / _scene(BAD_CLASS_LABEL))).copy()
    label[:5, :5] = 9  # a class the 7-class model does not have
    (labels / _scene(BAD_CLASS_LABEL)).write_bytes(encode_png(label))
    for sample in sample_files.values():
        (images / sample.name).write_bytes(sample.data)
    # Convertible images get labels of their displayed size (the EXIF-rotated one too: labels follow what a
    # person sees), so that their rows are ok; only the unreadable samples and the label cases are errors.
    for kind in CONVERTIBLE:
        stem = Path(sample_files[kind].name).stem
        (labels / f"{stem}.png").write_bytes(encode_png(np.ones(sample_files[kind].shape, np.uint8)))
    (images / "README.txt").write_text("not an image extension: never listed\n")

    config = SegmentConfig(input=str(images), labels=str(labels), output=str(root / "out"), model=tiny_checkpoint,
                           max_pixels=MAX_PIXELS)
    record = segment(config)
    table: pa.Table = results_reader(config.output)
    rows = {Path(row["image_uri"]).name: row for row in table.to_pylist()}
    assert len(rows) == table.num_rows, "an image appears twice"
    return BadRun(root, config, record, rows)


def test_rows_out_equal_files_in(bad_run: BadRun) -> None:
    files = sorted(p.name for p in (bad_run.root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    assert len(files) == 16
    assert sorted(bad_run.rows) == files
    record = read_job_record(bad_run.config.output)
    assert (record["rows"], record["ok_rows"], record["error_rows"]) == (16, 9, 7)
    assert (bad_run.record.rows, bad_run.record.error_rows) == (16, 7)


@pytest.mark.parametrize("kind", ["empty", "notes", "truncated", "huge"])
def test_unreadable_images_are_error_rows(bad_run: BadRun, sample_files, kind: str) -> None:
    sample = sample_files[kind]
    row = bad_run.rows[sample.name]
    assert row["status"] == "error" and row["mask"] is None and row["class_fraction"] is None
    assert sample.reason in row["error"]
    _one_sentence_naming(row["error"], sample.name)


def test_huge_image_error_says_how_to_allow_it(bad_run: BadRun) -> None:
    assert f"over the limit of {MAX_PIXELS:,}" in bad_run.rows["huge.png"]["error"]
    assert "max_pixels" in bad_run.rows["huge.png"]["error"]


@pytest.mark.parametrize("kind", CONVERTIBLE)
def test_convertible_images_are_ok_rows(bad_run: BadRun, sample_files, kind: str) -> None:
    sample = sample_files[kind]
    row = bad_run.rows[sample.name]
    assert row["status"] == "ok" and row["error"] is None
    assert (row["height"], row["width"]) == sample.shape
    assert decode_png(row["mask"]).shape == sample.shape  # the mask follows the decoded (rotated) image
    assert sum(row["class_fraction"].values()) == pytest.approx(1.0, abs=1e-5)


def test_exif_rotated_image_is_paired_with_a_label_of_its_displayed_size(bad_run: BadRun) -> None:
    row = bad_run.rows["rotated.jpg"]
    assert row["label_uri"].endswith("labels/rotated.png")
    assert row["labelled_pixels"] == 60 * 40 and row["miou"] is not None


def test_label_of_the_wrong_size_is_an_error_row(bad_run: BadRun) -> None:
    row = bad_run.rows[_scene(WRONG_SIZE_LABEL)]
    assert row["status"] == "error" and "but its image is" in row["error"]
    _one_sentence_naming(row["error"], _scene(WRONG_SIZE_LABEL))


def test_label_with_a_class_the_model_lacks_is_an_error_row(bad_run: BadRun) -> None:
    row = bad_run.rows[_scene(BAD_CLASS_LABEL)]
    assert row["status"] == "error" and "[9]" in row["error"] and "7 classes" in row["error"]
    _one_sentence_naming(row["error"], _scene(BAD_CLASS_LABEL))


def test_image_without_a_label_is_an_error_row_when_labels_were_asked_for(bad_run: BadRun) -> None:
    row = bad_run.rows[_scene(NO_LABEL)]
    assert row["status"] == "error" and row["label_uri"] is None and row["mask"] is None
    assert "No label was found" in row["error"]
    _one_sentence_naming(row["error"], _scene(NO_LABEL))


def test_good_images_are_unaffected_by_their_bad_neighbours(bad_run: BadRun) -> None:
    for i in GOOD:
        row = bad_run.rows[_scene(i)]
        assert row["status"] == "ok" and row["miou"] is not None
        assert row["labelled_pixels"] == row["height"] * row["width"]


def _one_sentence_naming(message: str, name: str) -> None:
    assert name in message, f"the message must name the file: {message!r}"
    assert "\n" not in message and message.endswith("."), f"not one sentence: {message!r}"


# Jobs that cannot succeed: a ValueError before any compute


@pytest.fixture
def no_compute(monkeypatch):
    """Make building the job's dataset (the first work on Ray) fail the test. Ray's start beside the checks is
    left out here (this process's Ray is the suite's); `test_a_rejected_job_stops_the_ray_it_started` runs it."""
    import segmill.pipeline.bulk.job as job

    def refuse(*args, **kwargs):
        raise AssertionError("compute started for a job that should have failed before it")

    monkeypatch.setattr(job, "_start_runtime", lambda config: False)
    monkeypatch.setattr(job, "build_dataset", refuse)


REJECTED_CHILD = """
import json, logging, sys
import psutil, ray
from segmill.pipeline import SegmentConfig, segment
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
try:
    segment(SegmentConfig(input=sys.argv[1], output=sys.argv[2], model=sys.argv[3]))
except ValueError as error:
    def ray_process(process):
        try:
            return "ray" in " ".join(process.cmdline())
        except psutil.Error:  # gone (or a zombie) already
            return False
    ours = [p for p in psutil.Process().children(recursive=True) if ray_process(p)]
    left = psutil.wait_procs(ours, timeout=30)[1]  # Ray's processes (the raylet, GCS, its Python helpers)
    ray.init(num_cpus=1, include_dashboard=False)  # what the user's own ray.init would meet
    print(json.dumps({"error": str(error), "left": [p.name() for p in left]}))
    ray.shutdown()
"""


def test_a_rejected_job_stops_the_ray_it_started(scenes_dir: Path, tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    # A process of its own, without the suite's Ray: the job starts Ray while its model is checked, then stops it.
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", REJECTED_CHILD, str(scenes_dir / "images"), str(tmp_path / "out"),
                           str(tmp_path / "model.pt")], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ray resources" in done.stderr  # Ray did start beside the check (else this test shows nothing)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert "model.pt" in answer["error"] and "checkpoint" in answer["error"]
    assert not answer["left"], answer["left"]
    assert not (tmp_path / "out").exists()


def _fails(config: SegmentConfig, *phrases: str) -> str:
    with pytest.raises(ValueError) as info:
        segment(config)
    message = str(info.value)
    assert all(p in message for p in phrases), message
    assert "\n" not in message
    return message


def test_no_images_found(no_compute, tiny_checkpoint: str, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    _fails(SegmentConfig(input=str(tmp_path / "empty"), output=str(tmp_path / "out"), model=tiny_checkpoint),
           "No images found", str(tmp_path / "empty"))


def test_input_that_does_not_exist(no_compute, tiny_checkpoint: str, tmp_path: Path) -> None:
    _fails(SegmentConfig(input=str(tmp_path / "nowhere"), output=str(tmp_path / "out"), model=tiny_checkpoint),
           "does not exist", "nowhere")


def test_model_that_does_not_exist(no_compute, scenes_dir: Path, tmp_path: Path) -> None:
    _fails(SegmentConfig(input=str(scenes_dir / "images"), output=str(tmp_path / "out"),
                         model=str(tmp_path / "gone.pt")), "gone.pt")
    assert not (tmp_path / "out").exists()


def test_model_that_is_not_a_checkpoint(no_compute, scenes_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_text("not a checkpoint")
    _fails(SegmentConfig(input=str(scenes_dir / "images"), output=str(tmp_path / "out"),
                         model=str(tmp_path / "model.pt")), "model.pt", "checkpoint")


def test_output_that_cannot_be_written(no_compute, scenes_dir: Path, tiny_checkpoint: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("a regular file, not a folder")
    _fails(SegmentConfig(input=str(scenes_dir / "images"), output=str(tmp_path / "a-file" / "out"),
                         model=tiny_checkpoint), "cannot be written", "a-file")


def test_output_holding_another_jobs_results(no_compute, bad_run: BadRun, scenes_dir: Path,
                                             tiny_checkpoint: str) -> None:
    other = SegmentConfig(input=str(scenes_dir / "images"), output=bad_run.config.output, model=tiny_checkpoint)
    _fails(other, "already holds results of job", bad_run.config.resolved_job_id())


def test_output_of_the_same_job_made_by_another_model(no_compute, bad_run: BadRun, nuclei_checkpoint: str) -> None:
    changed = SegmentConfig(input=bad_run.config.input, output=bad_run.config.output, model=nuclei_checkpoint,
                            job_id=bad_run.config.resolved_job_id())
    _fails(changed, "model version", bad_run.record.model_version)


def test_labels_whose_classes_do_not_fit_the_model(no_compute, scenes_dir: Path, nuclei_checkpoint: str,
                                                   tmp_path: Path) -> None:
    _fails(SegmentConfig(input=str(scenes_dir / "images"), labels=str(scenes_dir / "labels"),
                         output=str(tmp_path / "out"), model=nuclei_checkpoint), "classes", "nucleus")
