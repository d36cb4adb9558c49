"""Progress of long work, reported from wherever it happens (Ray tasks, training workers) to the driver.

A job given a `progress` callback starts a `Counter`: a tiny Ray actor (no CPU reserved) that the stages add their
counts to without waiting; a thread of the driver reads it twice a second and calls the callback with a
snapshot. Without a callback nothing is started, and the job runs as before.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

POLL_S = 0.5


@dataclass(frozen=True)
class Snapshot:
    """What a job has done so far: counts by name (images, ok, errors, or step, epoch, ...), latest values (loss,
    lr, val_miou, ...), its planned total and when it started."""

    counts: dict[str, float]
    values: dict[str, Any]
    total: float | None
    started: float
    finished: bool = False

    @property
    def elapsed(self) -> float:
        return time.time() - self.started


ProgressCallback = Callable[[Snapshot], None]


class _CounterActor:
    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self.values: dict[str, Any] = {}

    def add(self, counts: dict[str, float], values: dict[str, Any] | None = None) -> None:
        for key, amount in counts.items():
            self.counts[key] = self.counts.get(key, 0) + amount
        self.values.update(values or {})

    def read(self) -> tuple[dict[str, float], dict[str, Any]]:
        return dict(self.counts), dict(self.values)


@dataclass
class Counter:
    """Start with `Counter.start(callback, total)`; pass `.handle` to the stages (`add(handle, ...)`); `stop()`."""

    callback: ProgressCallback
    total: float | None
    handle: Any = None
    started: float = field(default_factory=time.time)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @classmethod
    def start(cls, callback: ProgressCallback | None, total: float | None = None) -> "Counter | None":
        if callback is None:
            return None
        import ray

        counter = cls(callback, total)
        counter.handle = ray.remote(num_cpus=0, max_restarts=0)(_CounterActor).remote()
        counter._thread = threading.Thread(target=counter._poll, daemon=True, name="segmill-progress")
        counter._thread.start()
        return counter

    def _read(self, finished: bool = False) -> Snapshot:
        import ray

        counts, values = ray.get(self.handle.read.remote())
        return Snapshot(counts, values, self.total, self.started, finished)

    def _poll(self) -> None:
        while not self._stop.wait(POLL_S):
            try:
                self.callback(self._read())
            except Exception:  # progress is a convenience: a lost counter must not fail the job
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.callback(self._read(finished=True))
        except Exception:
            pass
        import ray

        ray.kill(self.handle)


def add(handle: Any, counts: dict[str, float], values: dict[str, Any] | None = None) -> None:
    """Add to a counter from anywhere in the cluster without waiting (a no-op without a counter)."""
    if handle is not None:
        handle.add.remote(counts, values)
