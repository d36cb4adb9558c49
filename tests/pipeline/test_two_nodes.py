"""Beyond one machine: a Ray head and a second node started with `ray start --address` on this machine, every input
and output through the S3 test server. A bulk job whose model actors run on the second node survives that node's
raylet being killed mid-job and started again, with every image exactly once; a training job runs DDP workers on
both nodes; a job refuses a local path that only one node could reach."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from segmill.pipeline.common.scenes import write_scenes
from testkit import free_port, stop_group

BIN = Path(sys.executable).parent
RAY, SEGMILL = str(BIN / "ray"), str(BIN / "segmill")
STORE_BYTES = 300 * 2**20  # small object stores: two nodes share this machine's memory
IMAGES = 60


@dataclass
class Cluster:
    address: str
    temp: Path
    env: dict[str, str]
    head: subprocess.Popen
    node: subprocess.Popen | None = None

    def start_node(self) -> None:
        """The second node: 2 CPUs and the custom resource `node2` that the model actors ask for."""
        log = open(self.temp / f"node2-{time.time():.0f}.log", "wb")
        self.node = subprocess.Popen([RAY, "start", "--block", f"--address={self.address}", "--disable-usage-stats",
                                      "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--object-store-memory={STORE_BYTES}",
                                      "--resources", json.dumps({"node2": 4})], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_for_nodes(2)

    def kill_node(self) -> None:
        """SIGKILL to the second node's raylet and everything it started, as a lost machine would go."""
        stop_group(self.node, grace=0)

    def wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        probe = ("import ray; ray.init(address=%r, log_to_driver=False); "
                 "print(sum(1 for n in ray.nodes() if n['Alive']))" % self.address)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run([sys.executable, "-c", probe], env=self.env, capture_output=True, text=True)
            if out.stdout.strip() == str(count):
                return
            time.sleep(2)
        raise TimeoutError(f"the cluster did not reach {count} live nodes")


@pytest.fixture(scope="module")
def cluster(aws_env, s3_server) -> Iterator[Cluster]:
    temp = Path(tempfile.mkdtemp(prefix="sm2n-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    log = open(temp / "head.log", "wb")
    head = subprocess.Popen([RAY, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
                             f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}", "--num-cpus=2",
                             f"--object-store-memory={STORE_BYTES}", "--resources", json.dumps({"head_node": 1})],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    cluster = Cluster(f"127.0.0.1:{port}", temp, env, head)
    try:
        cluster.wait_for_nodes(1)
        cluster.start_node()
        yield cluster
    finally:
        if cluster.node is not None:
            stop_group(cluster.node, grace=3)
        stop_group(head, grace=3)


@pytest.fixture(scope="module")
def scenes_on_s3(s3_server, tmp_path_factory) -> str:
    bucket = s3_server.create_bucket("two-nodes")
    local = tmp_path_factory.mktemp("two-nodes-scenes")
    write_scenes(str(local), IMAGES, seed=12)
    fs = s3_server.filesystem()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{bucket}/scenes/{path.relative_to(local)}")
    return bucket


def _segmill(cluster: Cluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([SEGMILL, *args, "--address", cluster.address], env=cluster.env, capture_output=True,
                          text=True, timeout=timeout)


# A node started and killed mid-job, then the job resumed (about 120 s on 2 cores): `make test-slow`.
@pytest.mark.slow
def test_a_bulk_job_survives_losing_the_node_of_its_model_actors(cluster, scenes_on_s3, s3_server, tiny_checkpoint,
                                                                 tmp_path, results_reader) -> None:
    spec = tmp_path / "job.yaml"
    output = f"s3://{scenes_on_s3}/results"
    spec.write_text(yaml.safe_dump({
        "input": f"s3://{scenes_on_s3}/scenes/images", "output": output, "model": tiny_checkpoint,
        "resources": {"actor_resources": {"node2": 1}, "actors_max": 1, "cpus_per_actor": 1.0, "batch_size": 2,
                      "rows_per_file": 4, "decode_batch_size": 2}}))
    fs = s3_server.filesystem()
    job = subprocess.Popen([SEGMILL, "segment", "--config", str(spec), "--address", cluster.address],
                           env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while not [p for p in fs.ls(scenes_on_s3, refresh=True) if "results" in p] or \
                not [p for p in fs.ls(output, refresh=True) if "part-" in p]:
            assert job.poll() is None, job.stdout.read()[-3000:]
            assert time.time() < deadline, "no part was committed"
            time.sleep(0.5)
        assert job.poll() is None, "the job ended before its node could be lost"
        cluster.kill_node()  # the model actors' node, mid-job
        time.sleep(3)
        cluster.start_node()
        out, _ = job.communicate(timeout=480)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out[-3000:]
    table = results_reader(output, s3_server.filesystem())
    uris = table["image_uri"].to_pylist()
    assert len(uris) == len(set(uris)) == IMAGES, "every image exactly once"
    errors = [r for r in table.to_pylist() if r["status"] == "error"]
    assert all(r["error_kind"] == "infrastructure" for r in errors), errors[:2]
    print(f"\nlost the actors' node mid-job: {IMAGES} rows, {len(errors)} error rows of the lost node")
    again = _segmill(cluster, "segment", "--config", str(spec))  # the same job: its infrastructure errors again
    assert again.returncode == 0, again.stderr[-3000:]
    table = results_reader(output, s3_server.filesystem())
    assert table.num_rows == IMAGES and set(table["status"].to_pylist()) == {"ok"}


def test_training_runs_ddp_workers_on_both_nodes(cluster, scenes_on_s3, tmp_path) -> None:
    """STRICT_SPREAD places the two workers on two nodes, or training would not start."""
    result = _segmill(cluster, "train", "--images", f"s3://{scenes_on_s3}/scenes/images",
                      "--labels", f"s3://{scenes_on_s3}/scenes/labels", "--classes", f"s3://{scenes_on_s3}/scenes/classes.yaml",
                      "--arch-kwargs", '{"base_channels": 8, "depth": 2}', "--epochs", "1", "--batch-size", "4",
                      "--crop-size", "64", "--workers", "2", "--placement-strategy", "STRICT_SPREAD",
                      "--storage", f"s3://{scenes_on_s3}/train", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val mIoU" in result.stdout


def test_a_local_path_is_refused_on_a_cluster_of_two_nodes(cluster, scenes_dir, tiny_checkpoint, tmp_path) -> None:
    result = _segmill(cluster, "segment", str(scenes_dir / "images"), str(tmp_path / "out"), "--model", tiny_checkpoint)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "The Ray cluster has 2 nodes, so input" in result.stderr and "put it on shared storage" in result.stderr
