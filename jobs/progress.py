"""Showing a job's progress: a live bar on a terminal, a plain line every `PLAIN_EVERY_S` seconds elsewhere (a log
file, a pipe, a CI job), nothing with `--quiet`."""
from __future__ import annotations

import time
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from segmill.pipeline.common.progress import Snapshot

PLAIN_EVERY_S = 10.0
Describe = Callable[[Snapshot], tuple[float, str]]  # snapshot -> (units done, one line saying what they are)


class ProgressView:
    """A progress callback for a job (`segment(config, progress=view)`); use it as a context manager."""

    def __init__(self, console: Console, describe: Describe, *, title: str, quiet: bool = False) -> None:
        self.console, self.describe, self.title, self.quiet = console, describe, title, quiet
        self._bar: Progress | None = None
        self._task = None
        self._last_line = 0.0

    def __enter__(self) -> "ProgressView":
        if not self.quiet and self.console.is_terminal:
            self._bar = Progress(TextColumn("[bold]{task.fields[title]}"), BarColumn(), TaskProgressColumn(),
                                 TextColumn("{task.description}"), console=self.console)
            self._bar.start()
            self._task = self._bar.add_task("", total=None, title=self.title)
        self._last_line = time.time()
        return self

    def __exit__(self, *_) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, snapshot: Snapshot) -> None:
        if self.quiet:
            return
        done, line = self.describe(snapshot)
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=snapshot.total, description=line)
        elif snapshot.finished or time.time() - self._last_line >= PLAIN_EVERY_S:
            self._last_line = time.time()
            self.console.print(f"{self.title}: {line}", highlight=False, markup=False)


def eta(done: float, total: float | None, elapsed: float) -> str:
    """Time left at the rate so far, as 1h02m, 3m05s or 12s; '?' before there is a rate."""
    if not total or not done or elapsed <= 0:
        return "?"
    left = max(0.0, (total - done) * elapsed / done)
    hours, rest = divmod(int(left), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def images(snapshot: Snapshot) -> tuple[float, str]:
    """The bulk job's line: images done of the total, ok and errors, rate, time left."""
    counts = snapshot.counts
    done = counts.get("ok", 0) + counts.get("errors", 0)
    rate = done / snapshot.elapsed if snapshot.elapsed > 0 else 0.0
    total = f"/{snapshot.total:.0f}" if snapshot.total else ""
    if not done and not snapshot.finished:  # Ray, the model check and the actors' start come first
        return done, f"0{total} images, starting the model actors"
    return done, (f"{done:.0f}{total} images ({counts.get('ok', 0):.0f} ok, {counts.get('errors', 0):.0f} errors), "
                  f"{rate:.1f} img/s, {eta(done, snapshot.total, snapshot.elapsed)} left")


def training(snapshot: Snapshot) -> tuple[float, str]:
    """The training job's line: epoch and step, loss, learning rate, samples/s, time left, last val mIoU."""
    values = snapshot.values
    if "epochs" not in values:  # Ray Train is still starting its workers
        return 0, "starting the workers"
    steps = values.get("step", 0)
    parts = [f"epoch {values.get('epoch', 0) + 1}/{values.get('epochs', '?')}",
             f"step {steps:.0f}/{snapshot.total:.0f}" if snapshot.total else f"step {steps:.0f}"]
    if "loss" in values:
        parts.append(f"loss {values['loss']:.3f}")
    if "lr" in values:
        parts.append(f"lr {values['lr']:.2g}")
    if "samples_per_second" in values:
        parts.append(f"{values['samples_per_second']:.1f} samples/s")
    # The rate since the workers' first step: neither Ray Train's start-up nor a resumed run's earlier steps count.
    first, since = values.get("first_step", 0), time.time() - values.get("first_step_at", snapshot.started)
    left = eta(steps - first, snapshot.total - first if snapshot.total else None, since)
    parts.append(f"{left} left")
    if "val_miou" in values:
        parts.append(f"val mIoU {values['val_miou']:.3f} (epoch {values.get('val_epoch', 0) + 1})")
    return steps, ", ".join(parts)
