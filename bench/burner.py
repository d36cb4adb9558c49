"""Busy cores beside a benchmarked program: contention measured on purpose, not met by chance.

    with BusyCores(1):
        ...  # the program runs while one core's worth of pure-Python spinning competes for the CPU

Each burner is its own process spinning in a loop. It stops when told, when the benchmark that started it dies
(its parent changes) or after `max_seconds`, so a killed benchmark never leaves a core busy behind it.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

_SPIN = """
import os, sys, time
parent, deadline = int(sys.argv[2]), time.monotonic() + float(sys.argv[1])  # the parent may be gone already
while os.getppid() == parent and time.monotonic() < deadline:
    for _ in range(200_000):
        pass
"""
STOP_GRACE_S = 2.0


class BusyCores:
    """`cores` spinning processes from `__enter__` to `__exit__` (none for 0)."""

    def __init__(self, cores: int, *, max_seconds: float = 4 * 3600):
        self.cores, self.max_seconds = cores, max_seconds
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> "BusyCores":
        self.processes = [subprocess.Popen([sys.executable, "-c", _SPIN, str(self.max_seconds), str(os.getpid())])
                          for _ in range(self.cores)]
        return self

    def __exit__(self, *_) -> None:
        for process in self.processes:
            process.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for process in self.processes:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []

    def cpu_seconds(self) -> float:
        """CPU seconds the burners have used so far (to check they really took their cores)."""
        import psutil

        total = 0.0
        for process in self.processes:
            try:
                times = psutil.Process(process.pid).cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total
