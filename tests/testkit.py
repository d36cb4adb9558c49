"""Helpers shared by the tests (importable as `testkit`: pyproject's pytest `pythonpath` has tests/)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
DSB2018 = DATASETS / "dsb2018"
CAMVID = DATASETS / "camvid"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    """Stop a service started with `start_new_session=True`: SIGTERM to its process group, then SIGKILL to what is
    left after `grace` seconds. Never raises: a fixture must not fail a test at teardown."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
