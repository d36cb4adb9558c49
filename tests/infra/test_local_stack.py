"""infra/local/start-mlflow.sh starts a real MLflow server on loopback that segmill's tracking code can use."""
from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

from testkit import ROOT, free_port, stop_group


def test_start_mlflow_serves_tracking_and_registry_on_loopback(tmp_path: Path) -> None:
    from segmill.pipeline.tracking import check_reachable, client, log_evaluation

    port = free_port()
    server = subprocess.Popen([str(ROOT / "infra" / "local" / "start-mlflow.sh"), str(port), str(tmp_path / "state")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, server.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        check_reachable(uri)
        client(uri).create_registered_model("roads")
        run_id = log_evaluation(uri, "roads", "1", {"road": 0.5, "pole": 0.25}, miou=0.375, dataset="val")
        assert client(uri).get_run(run_id).data.metrics["iou.pole"] == 0.25
        assert (tmp_path / "state" / "mlflow.db").is_file()
    finally:
        stop_group(server)
