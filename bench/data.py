"""Inputs of the throughput benchmark: image folders (resized, native, synthetic), seeded checkpoints, and
peak memory summed over a process tree."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from bench.programs import list_images

CLASSES = ("background", "nucleus")


def select(files: list[str], limit: int) -> list[str]:
    """An even spread over the sorted names (hashes, so any spread is a random sample of sizes)."""
    if not limit or limit >= len(files):
        return files
    return [files[int(i * len(files) / limit)] for i in range(limit)]


def prepare_folder(source: str, target: Path, *, limit: int, size: int | None) -> str:
    """`limit` images of `source` in `target`, resized to size x size (bilinear) or copied as they are."""
    files = select(list_images(source), limit)
    marker = target / f".ready-{len(files)}-{size}"
    if marker.exists():
        return str(target)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for path in files:
        if size:
            image = Image.open(path).convert("RGB").resize((size, size), Image.BILINEAR)
            image.save(target / (Path(path).stem + ".png"), compress_level=1)
        else:
            shutil.copyfile(path, target / Path(path).name)
    marker.touch()
    return str(target)


def synthetic_folder(source: str, target: Path, *, count: int, side: int) -> str:
    """`count` distinct side x side PNGs made from the real images (resized, then shifted by the image's index)."""
    marker = target / f".ready-{count}-{side}"
    if marker.exists():
        return str(target)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    bases = [np.asarray(Image.open(p).convert("RGB").resize((side, side), Image.BILINEAR))
             for p in select(list_images(source), 64)]
    for i in range(count):
        image = np.roll(bases[i % len(bases)], shift=(i // len(bases)) % side, axis=1)
        Image.fromarray(image).save(target / f"synthetic-{i:06d}.png", compress_level=1)
    marker.touch()
    return str(target)


def make_checkpoint(arch: str, path: Path, seed: int = 0) -> str:
    """Random weights (seeded) as a segmill checkpoint whose masks hold both classes (save_random_checkpoint)."""
    from segmill.models.checkpoint import ModelSpec, save_random_checkpoint

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_random_checkpoint(path, ModelSpec(arch=arch, classes=CLASSES), seed=seed)
    return str(path)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _pss_bytes(process: psutil.Process) -> tuple[int, int]:
    """Proportional set size (shared pages split among their users, so a sum counts each page once), else RSS;
    and the part of it in shared memory (tmpfs: Ray's object store). psutil reports Pss but not Pss_Shmem, and
    one read of smaps_rollup gives both."""
    try:
        with open(f"/proc/{process.pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith("Pss"))
        return int(fields["Pss"].split()[0]) * 1024, int(fields.get("Pss_Shmem", "0 kB").split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return _rss_bytes(process), 0


def _rss_bytes(process: psutil.Process) -> int:
    """Resident set size, cheap to read (shared pages count in every process that maps them)."""
    try:
        return process.memory_info().rss
    except psutil.Error:
        return 0


def _process_kind(process: psutil.Process) -> str:
    """What a process is, from its title: Ray retitles workers (`ray::Segmenter.__call__`, `ray::IDLE`)."""
    try:
        argv = process.cmdline()
    except psutil.Error:
        return "?"
    title = argv[0].split()[0] if argv and argv[0] else "?"
    if title.startswith("ray::"):
        return title.split(".")[0]
    if os.path.basename(title).startswith("python") and len(argv) > 2:  # `python -m module` or `python script`
        return "python " + os.path.basename(argv[2] if argv[1] == "-m" else argv[1])
    return os.path.basename(title)


def _cpu_seconds(process: psutil.Process) -> float | None:
    try:
        times = process.cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def _sum_by_kind(pairs) -> dict:
    """(kind, amount) pairs summed per kind, largest first."""
    kinds: dict = {}
    for kind, amount in pairs:
        kinds[kind] = kinds.get(kind, 0) + amount
    return dict(sorted(kinds.items(), key=lambda item: -item[1]))


class TreeMemory:
    """Samples the summed PSS of a process and all its descendants (Ray's raylet, GCS, workers) until stopped;
    where nvidia-smi exists, GPU utilisation too."""

    def __init__(self, pid: int, interval: float = 0.25, pss_interval: float = 2.0):
        self.pid, self.interval, self.pss_interval = pid, interval, pss_interval
        self.peak, self.peak_processes, self.gpu_util = 0, 0, []
        self.peak_by_process: dict[str, int] = {}  # at the peak: PSS per process kind, e.g. raylet, ray::Segmenter
        self.peak_shared = 0  # at the peak: the part in shared memory (Ray's object store)
        self.timeline: list[tuple[float, int]] = []  # (seconds since start, summed PSS) at every PSS sample
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds so far)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._smi = shutil.which("nvidia-smi")

    def __enter__(self) -> "TreeMemory":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        ticks, rss_high, pss_at = 0, 0, 0.0
        while not self._stop.is_set():
            seen = _tree(self.pid)
            kinds = {p.pid: _process_kind(p) for p in seen}
            for process in seen:
                pid = process.pid
                if kinds[pid] == "?" and pid in self._cpu:  # an exiting process loses its title: keep the one seen
                    kinds[pid] = self._cpu[pid][0]
                seconds = _cpu_seconds(process)
                if seconds is not None:
                    self._cpu[pid] = (kinds[pid], seconds)
            # PSS walks every page table: at every tick it took a quarter of a core from the programs measured. It
            # is taken when the cheap RSS sum passes its high by 1%, and every 2 s besides.
            rss = sum(_rss_bytes(p) for p in seen)
            if rss > rss_high * 1.01 or time.monotonic() - pss_at >= self.pss_interval:
                rss_high, pss_at = max(rss, rss_high), time.monotonic()
                self._sample_pss(seen, kinds)
            self.peak_processes = max(self.peak_processes, len(seen))
            if self._smi and ticks % 4 == 0:
                self._sample_gpu()
            ticks += 1
            time.sleep(self.interval)

    def _sample_pss(self, processes: list[psutil.Process], kinds: dict[int, str]) -> None:
        measured = {p.pid: _pss_bytes(p) for p in processes}
        total = sum(pss for pss, _ in measured.values())
        self.timeline.append((time.monotonic() - self._started, total))
        if total > self.peak:
            self.peak = total
            self.peak_by_process = _sum_by_kind((kinds[pid], pss) for pid, (pss, _) in measured.items())
            self.peak_shared = sum(shared for _, shared in measured.values())

    def peaks_by_part(self, parts: int = 4) -> list[int]:
        """The peak within each of `parts` equal spans of the run: flat when a longer job holds no more memory
        late than early, where the overall peak alone also counts one-off spikes (a worker starting)."""
        if not self.timeline:
            return []
        end = self.timeline[-1][0] or 1.0
        peaks = [0] * parts
        for seconds, total in self.timeline:
            part = min(parts - 1, int(parts * seconds / end))
            peaks[part] = max(peaks[part], total)
        return peaks

    @property
    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds (user + system) per process kind, as last sampled: where the machine's cores went."""
        return _sum_by_kind(self._cpu.values())

    def _sample_gpu(self) -> None:
        try:
            out = subprocess.run([self._smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            self.gpu_util.append(float(out.split()[0]))
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            pass
