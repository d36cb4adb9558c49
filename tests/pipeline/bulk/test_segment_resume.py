"""Kill a job part-way (SIGKILL to the driver and its own Ray), run it again: each input exactly once.

The killed job runs in a subprocess with its own local Ray, in its own process group, so one killpg takes
down the driver, the raylet, the GCS and every worker at once, as a lost machine would.

Ray Data passes rows between stages in blocks of up to 128 MB, so on a few small images everything would reach
the commit stage at once and there would be no "part-way" to kill at. The killed run makes blocks small (a
few images each) so that parts are committed one after another, as they are on a large job.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from segmill.pipeline import ResourceConfig, SegmentConfig, segment
from segmill.pipeline.bulk.record import read_job_record
from segmill.pipeline.common.scenes import write_scenes

IMAGES = 24
ROWS_PER_FILE = 4
DEADLINE_S = 180

DRIVER = """
import json, sys
import ray
from segmill.pipeline import SegmentConfig, segment
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().target_max_block_size = 256 * 1024
segment(SegmentConfig.from_dict(json.loads(sys.argv[1])))
print("FINISHED", flush=True)
"""


def _parts(output: Path) -> list[Path]:
    return sorted(output.glob("part-*.parquet"))


def _processes_in_session(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _kill_after_first_part(config: SegmentConfig, log: Path) -> int:
    """Start the job in a subprocess; SIGKILL its process group once a part is committed. Returns rows committed."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(config.to_dict())], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    output = Path(config.output)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not _parts(output):
            if proc.poll() is not None:
                pytest.fail(f"the job ended (code {proc.returncode}) before any part was committed:\n"
                            + log.read_text()[-3000:])
            if time.monotonic() > deadline:
                pytest.fail(f"no part committed within {DEADLINE_S} s:\n" + log.read_text()[-3000:])
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for _ in range(100):  # the group dies together; wait until the last of its processes is gone
        if not _processes_in_session(proc.pid):
            break
        time.sleep(0.1)
    assert not _processes_in_session(proc.pid), "processes of the killed job survived"
    assert b"FINISHED" not in log.read_bytes(), "the job finished before it was killed: make it slower or bigger"
    return sum(pq.ParquetFile(p).metadata.num_rows for p in _parts(output))


@pytest.fixture(scope="module")
def many_scenes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume-scenes")
    write_scenes(str(root), IMAGES, seed=3)
    return root


def test_a_killed_job_resumes_to_exactly_once(ray_session, many_scenes: Path, tiny_checkpoint: str,
                                               tmp_path: Path) -> None:
    # Multi-scale + flip makes each image 4 forward passes, so the job is still running after its first part.
    config = SegmentConfig(input=str(many_scenes / "images"), labels=str(many_scenes / "labels"),
                           output=str(tmp_path / "out"), model=tiny_checkpoint, scales=(1.0, 1.5), flip=True,
                           resources=ResourceConfig(rows_per_file=ROWS_PER_FILE))
    committed = _kill_after_first_part(config, tmp_path / "killed-job.log")
    assert 0 < committed < IMAGES

    # What readers see meanwhile: whole parts only (staged files are under _staging, which readers skip).
    (seen,) = duckdb.sql(f"SELECT count(*) FROM read_parquet('{config.output}/*.parquet')").fetchall()[0]
    assert seen == committed

    record = segment(config)
    assert record.resumed_from == committed > 0
    assert record.processed_this_run == IMAGES - committed
    assert (record.rows, record.ok_rows) == (IMAGES, IMAGES)
    images = sorted(str(p) for p in (many_scenes / "images").glob("*.png"))
    counts = duckdb.sql(f"SELECT image_uri, count(*) FROM read_parquet('{config.output}/*.parquet') "
                        "GROUP BY 1 ORDER BY 1").fetchall()
    assert counts == [(uri, 1) for uri in images]  # none missing, none twice
    assert read_job_record(config.output)["resumed_from"] == committed
    assert not (Path(config.output) / "_staging").exists() or not any((Path(config.output) / "_staging").rglob("*"))

    # Running the finished job again adds nothing.
    parts = {p.name for p in _parts(Path(config.output))}
    again = segment(config)
    assert (again.processed_this_run, again.resumed_from, again.rows) == (0, IMAGES, IMAGES)
    assert {p.name for p in _parts(Path(config.output))} == parts
