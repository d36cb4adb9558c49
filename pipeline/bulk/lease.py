"""One run of a job at a time per OUTPUT: a lease file under OUTPUT/_staging/JOB, renewed while the run lives.

Two runs of the same job (same id, same output) would write the same staging folder and the same part files. The
second one to start finds a live lease and stops with one sentence saying who holds it; a lease whose holder
stopped renewing it (a killed run) expires after `TTL_S`, or at once when its process on this machine is gone, and
can be taken over. On a local disk the lease is
created exclusively (O_EXCL); on object storage, where a plain PUT cannot be conditional, it is written, then
read back after a pause, and the run that reads someone else's lease backs off.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from segmill.pipeline.common.storage import join_uri, open_fs, protocol_of, redact

LEASE_FILE = "lease.json"
TTL_S = 120.0  # a lease not renewed for this long belongs to a run that is gone
RENEW_S = 30.0
SETTLE_S = 1.0  # object storage: how long to wait before reading a written lease back


class JobLease:
    """`acquire()` takes the lease (or raises ValueError naming its holder); `release()` gives it back."""

    def __init__(self, output: str, job_id: str, staging: str, *, endpoint_url: str | None = None) -> None:
        self.output, self.job_id, self.staging = output, job_id, staging
        self.fs, root = open_fs(join_uri(output, staging, job_id), endpoint_url=endpoint_url)
        self.folder, self.path = root, join_uri(root, LEASE_FILE)
        self.local = protocol_of(output) == "file"
        self.owner = {"run": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                      "started": time.time()}
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> None:
        held = self._read()
        if held is not None and held.get("run") != self.owner["run"] and not self._expired(held):
            raise ValueError(self._held_by(held))
        self.fs.makedirs(self.folder, exist_ok=True)
        if held is not None:
            self.fs.rm(self.path)  # an expired lease of a run that is gone
        self._write(exclusive=self.local)
        if not self.local:
            time.sleep(SETTLE_S)
            mine = self._read()
            if mine is None or mine.get("run") != self.owner["run"]:
                raise ValueError(self._held_by(mine or {}))
        self._renewer = threading.Thread(target=self._renew, daemon=True, name=f"lease-{self.job_id}")
        self._renewer.start()

    def release(self) -> None:
        self._stop.set()
        if self._renewer is None:
            return
        self._renewer.join()
        self._renewer = None
        held = self._read()
        if held is not None and held.get("run") == self.owner["run"]:
            self.fs.rm(self.path)

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                self._write(exclusive=False)
            except OSError:  # storage blips: the next renewal tries again, well within the TTL
                pass

    def _write(self, *, exclusive: bool) -> None:
        record = json.dumps({**self.owner, "renewed": time.time()}).encode()
        if exclusive:
            try:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                raise ValueError(self._held_by(self._read() or {})) from None
            with os.fdopen(descriptor, "wb") as f:
                f.write(record)
            return
        with self.fs.open(self.path, "wb") as f:
            f.write(record)

    def _read(self) -> dict[str, Any] | None:
        try:
            self.fs.invalidate_cache(self.folder)
            with self.fs.open(self.path, "rb") as f:
                return json.loads(f.read())
        except (FileNotFoundError, ValueError):
            return None

    @staticmethod
    def _expired(held: dict[str, Any]) -> bool:
        """Not renewed within the TTL, or held by a process of this machine that no longer exists."""
        if time.time() - float(held.get("renewed", 0)) > TTL_S:
            return True
        if held.get("host") == socket.gethostname():
            try:
                os.kill(int(held.get("pid", 0)), 0)
            except ProcessLookupError:
                return True
            except (PermissionError, ValueError):  # alive under another user, or no pid recorded
                return False
        return False

    def _held_by(self, held: dict[str, Any]) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(held.get("started", 0)))
        return (f"Another run of job {self.job_id} is writing {redact(self.output)} (host {held.get('host', '?')}, "
                f"pid {held.get('pid', '?')}, since {since} UTC); wait for it to finish, or delete "
                f"{redact(join_uri(self.output, self.staging, self.job_id, LEASE_FILE))} if that run is gone.")
