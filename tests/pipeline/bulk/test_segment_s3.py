"""End to end against moto's S3 server on 127.0.0.1: S3 -> S3, S3 -> local, resume on S3, no credentials leak.

The job reaches S3 through `endpoint_url` (given to every stage) and the AWS environment the Ray workers
inherited (conftest sets it before Ray starts).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from segmill.pipeline import ResourceConfig, SegmentConfig, segment
from segmill.pipeline.bulk.record import JobRecord, read_job_record
from segmill.pipeline.common.images import decode_png

BUCKET = "segmill-e2e"


@dataclass(frozen=True)
class Run:
    config: SegmentConfig
    record: JobRecord
    table: pa.Table


@pytest.fixture(scope="module")
def s3_scenes(s3_server, scenes_dir: Path) -> list[str]:
    """The 12 scenes uploaded to s3://segmill-e2e/scenes/{images,labels}/ (+ classes.yaml); returns image URIs."""
    s3_server.create_bucket(BUCKET)
    fs = s3_server.filesystem()
    for path in sorted(scenes_dir.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{BUCKET}/scenes/{path.relative_to(scenes_dir).as_posix()}")
    return sorted(f"s3://{BUCKET}/scenes/images/{p.name}" for p in (scenes_dir / "images").glob("*.png"))


@pytest.fixture(scope="module")
def s3_to_s3(ray_session, s3_server, s3_scenes, tiny_checkpoint, results_reader) -> Run:
    config = SegmentConfig(input=f"s3://{BUCKET}/scenes/images/", labels=f"s3://{BUCKET}/scenes/labels/",
                           output=f"s3://{BUCKET}/out", model=tiny_checkpoint, endpoint_url=s3_server.endpoint_url,
                           resources=ResourceConfig(rows_per_file=4))
    record = segment(config)
    return Run(config, record, results_reader(config.output, s3_server.filesystem()))


@pytest.fixture(scope="module")
def s3_to_local(ray_session, s3_server, s3_scenes, tiny_checkpoint, tmp_path_factory, results_reader) -> Run:
    config = SegmentConfig(input=f"s3://{BUCKET}/scenes/images", output=str(tmp_path_factory.mktemp("s3") / "out"),
                           model=tiny_checkpoint, endpoint_url=s3_server.endpoint_url)
    record = segment(config)
    return Run(config, record, results_reader(config.output))


def _duckdb(s3_server) -> duckdb.DuckDBPyConnection:
    import s3fs

    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(endpoint_url=s3_server.endpoint_url, key=s3_server.key,
                                              secret=s3_server.secret, skip_instance_cache=True))
    return con


def test_s3_to_s3_every_input_once(s3_to_s3: Run, s3_scenes: list[str], s3_server) -> None:
    assert sorted(s3_to_s3.table["image_uri"].to_pylist()) == s3_scenes  # pyarrow over s3fs
    con = _duckdb(s3_server)
    rows = con.execute("SELECT image_uri, count(*), min(status), min(label_uri) "
                       f"FROM read_parquet('s3://{BUCKET}/out/*.parquet') GROUP BY 1 ORDER BY 1").fetchall()
    assert [(uri, n, status) for uri, n, status, _ in rows] == [(uri, 1, "ok") for uri in s3_scenes]
    assert all(label == uri.replace("/images/", "/labels/") for uri, _, _, label in rows)
    (road_iou,) = con.execute(f'SELECT sum(intersection_pixels.road) / sum(union_pixels.road) FROM read_parquet('
                              f"'s3://{BUCKET}/out/*.parquet')").fetchone()
    assert road_iou is None or 0 <= road_iou <= 1
    assert (s3_to_s3.record.rows, s3_to_s3.record.ok_rows, s3_to_s3.record.processed_this_run) == (12, 12, 12)


def test_s3_output_holds_committed_parts_and_the_record_only(s3_to_s3: Run, s3_server) -> None:
    names = sorted(p.rsplit("/", 1)[-1] for p in s3_server.filesystem().find(f"{BUCKET}/out"))
    parts = [n for n in names if n.startswith("part-")]
    assert names == sorted(parts + ["_job.json"]), "staging must be cleared once the job is done"
    assert len(parts) == 3  # rows_per_file=4
    record = read_job_record(s3_to_s3.config.output, s3_server.endpoint_url)
    assert record["rows"] == 12 and record["job_id"] == s3_to_s3.config.resolved_job_id()


def test_no_credentials_in_the_table_or_the_job_record(s3_to_s3: Run, s3_to_local: Run, s3_server) -> None:
    secrets = (s3_server.secret, s3_server.key)
    record_text = s3_server.filesystem().cat_file(f"{BUCKET}/out/_job.json").decode()
    local_record_text = (Path(s3_to_local.config.output) / "_job.json").read_text()
    for text in (record_text, local_record_text):
        assert json.loads(text)["spec"]["endpoint_url"] == s3_server.endpoint_url
        assert not any(secret in text for secret in secrets)
    for table in (s3_to_s3.table, s3_to_local.table):
        for name in table.column_names:
            if pa.types.is_string(table.schema.field(name).type):
                text = "\n".join(v for v in table[name].to_pylist() if v)
                assert not any(secret in text for secret in secrets), name


def test_s3_input_to_local_output(s3_to_local: Run, s3_to_s3: Run, s3_scenes: list[str]) -> None:
    table = s3_to_local.table
    assert sorted(table["image_uri"].to_pylist()) == s3_scenes
    assert pc.all(pc.equal(table["status"], "ok")).as_py()
    assert table["label_uri"].null_count == 12 and table["miou"].null_count == 12  # no labels given
    reference = {r["image_uri"]: r for r in s3_to_s3.table.select(["image_uri", "mask", "height", "width"]).to_pylist()}
    for row in table.select(["image_uri", "mask", "height", "width"]).to_pylist():
        same = reference[row["image_uri"]]
        assert (row["height"], row["width"]) == (same["height"], same["width"])
        np.testing.assert_array_equal(decode_png(row["mask"]), decode_png(same["mask"]))
    record = json.loads((Path(s3_to_local.config.output) / "_job.json").read_text())
    assert (record["rows"], record["ok_rows"], record["error_rows"]) == (12, 12, 0)


def test_resume_on_s3_fills_in_a_lost_part(s3_to_s3: Run, s3_server, s3_scenes: list[str], results_reader) -> None:
    """A part that never got committed (deleted here) is redone on the next run; the others are skipped.

    Runs after the S3 -> S3 checks above (pytest keeps file order), since it rewrites that output.
    """
    fs = s3_server.filesystem()
    parts = sorted(p for p in fs.ls(f"{BUCKET}/out", detail=False) if p.rsplit("/", 1)[-1].startswith("part-"))
    fs.rm(parts[0])
    record = segment(s3_to_s3.config)
    assert (record.processed_this_run, record.resumed_from, record.rows) == (4, 8, 12)
    assert sorted(results_reader(s3_to_s3.config.output, s3_server.filesystem())["image_uri"].to_pylist()) == s3_scenes
    again = segment(s3_to_s3.config)  # finished: nothing to add
    assert (again.processed_this_run, again.rows) == (0, 12)
