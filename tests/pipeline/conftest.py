"""Fixtures of the retraining tests: a real `mlflow server` on 127.0.0.1 with artifacts on the local S3 server,
and a small labelled scene set."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from segmill.pipeline.common.scenes import write_scenes
from testkit import free_port, stop_group


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` (SQLite backend) proxying artifacts to s3://mlflow-artifacts on moto; yields its URL."""
    bucket = s3_server.create_bucket("mlflow-artifacts")
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url}
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", f"s3://{bucket}/"]
    log = open(folder / "server.log", "wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise RuntimeError(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield url
    stop_group(server)  # the server's uvicorn workers are in its own session
    log.close()


@pytest.fixture(scope="session")
def train_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 labelled scenes (7 classes, pole and sign rare) with their class file."""
    root = tmp_path_factory.mktemp("train-scenes")
    write_scenes(str(root), 48, seed=7)
    return root
