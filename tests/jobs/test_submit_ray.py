"""Submission through the Ray Jobs API of a real local head (infra/local/start-ray-head.sh on 127.0.0.1).

The head runs in its own process group with its own ports and temp dir, and is stopped by signalling that group:
`ray stop` would stop every Ray on the machine, other test sessions' included.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml
from typer.testing import CliRunner

from segmill.jobs.cli import app
from segmill.jobs.history import read_jobs
from testkit import ROOT, free_port, stop_group

runner = CliRunner()



def _jobs_api_up(address: str) -> bool:
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(address).list_jobs()
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A Ray head with 2 CPUs on loopback; yields its Jobs API address."""
    temp_dir = tempfile.mkdtemp(prefix="smray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TEMP_DIR": temp_dir, "NUM_CPUS": "2",
           "RAY_PORT": str(free_port()), "RAY_CLIENT_PORT": str(free_port()), "RAY_AGENT_PORT": str(free_port())}
    log = open(Path(temp_dir) / "head.log", "wb")
    head = subprocess.Popen([str(ROOT / "infra" / "local" / "start-ray-head.sh"), str(dashboard)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 90
        while not _jobs_api_up(address):
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"the Ray head did not start: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
        yield address
    finally:
        stop_group(head, grace=3)  # its workers (own process groups) exit when their raylet is gone
        log.close()


def _wait_for(address: str, job_id: str, statuses: set[str], history: str, timeout: float = 150) -> str:
    deadline = time.time() + timeout
    while True:
        result = runner.invoke(app, ["jobs", "status", job_id, "--address", address, "--history", history])
        assert result.exit_code == 0, result.output
        status = result.output.split(":")[0].strip()
        if status in statuses or time.time() > deadline:
            return status
        time.sleep(1)


@pytest.fixture()
def segment_spec(tmp_path: Path, tiny_checkpoint: str) -> Path:
    from segmill.pipeline.common.scenes import write_scenes

    write_scenes(str(tmp_path / "scenes"), 3, seed=5)
    spec = tmp_path / "segment.yaml"
    spec.write_text(yaml.safe_dump({"kind": "segment", "input": str(tmp_path / "scenes" / "images"),
                                    "labels": str(tmp_path / "scenes" / "labels"), "output": str(tmp_path / "out"),
                                    "model": tiny_checkpoint, "resources": {"actors_max": 1, "batch_size": 3}}))
    return spec


def test_a_submitted_segment_job_runs_on_the_cluster_and_is_followed(ray_head: str, segment_spec: Path,
                                                                     tmp_path: Path, results_reader) -> None:
    history = str(tmp_path / "history")
    started = time.time()
    result = runner.invoke(app, ["submit", str(segment_spec), "--address", ray_head, "--history", history])
    assert result.exit_code == 0, result.output
    job_id = result.stdout.strip().splitlines()[-1]  # stdout: what a script reads; logs go to stderr
    assert job_id.startswith("seg-") and time.time() - started < 30, "submit returns the id at once"

    assert _wait_for(ray_head, job_id, {"SUCCEEDED", "FAILED", "STOPPED"}, history) == "SUCCEEDED"
    logs = runner.invoke(app, ["jobs", "logs", job_id, "--address", ray_head])
    assert logs.exit_code == 0 and '"status": "SUCCEEDED"' in logs.output, logs.output
    listed = runner.invoke(app, ["jobs", "list", "--address", ray_head, "--history", history])
    assert listed.exit_code == 0 and any(line.split()[:3] == [job_id, "segment", "SUCCEEDED"]
                                         for line in listed.output.splitlines()), listed.output
    assert results_reader(str(tmp_path / "out")).num_rows == 3

    (job,) = read_jobs(history)  # the job on the cluster wrote its own events into the same history
    assert (job["job_id"], job["kind"], job["status"]) == (job_id, "segment", "SUCCEEDED")
    assert job["output"] == str(tmp_path / "out") and job["model_version"].startswith("sha256:")
    assert job["submitted_at"] <= job["finished_at"] and job["address"] == ray_head
    shown = runner.invoke(app, ["jobs", "history", "--history", history, "--sql",
                                "SELECT string_agg(event, ',' ORDER BY recorded_at) AS events FROM history"])
    assert "submitted,started,finished" in shown.output


def test_a_stopped_job_is_stopped_and_recorded(ray_head: str, segment_spec: Path, tmp_path: Path) -> None:
    history = str(tmp_path / "history")
    result = runner.invoke(app, ["submit", str(segment_spec), "--address", ray_head, "--history", history])
    job_id = result.stdout.strip().splitlines()[-1]
    stopped = runner.invoke(app, ["jobs", "stop", job_id, "--address", ray_head])
    assert stopped.exit_code == 0, stopped.output
    assert _wait_for(ray_head, job_id, {"STOPPED", "SUCCEEDED", "FAILED"}, history, timeout=60) == "STOPPED"
    (job,) = read_jobs(history)
    assert job["status"] == "STOPPED" and job["finished_at"] is not None


def test_unknown_jobs_and_clusters_fail_with_one_sentence(ray_head: str) -> None:
    unknown = runner.invoke(app, ["jobs", "status", "segment-nope", "--address", ray_head])
    assert unknown.exit_code == 2 and "has no job 'segment-nope'" in unknown.output
    nowhere = runner.invoke(app, ["jobs", "list", "--address", f"http://127.0.0.1:{free_port()}"])
    assert nowhere.exit_code == 2 and "cannot be reached through its Jobs API" in nowhere.output
    assert len(nowhere.output.strip().splitlines()) == 1
