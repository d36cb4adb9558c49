"""Freed tensor memory is kept for reuse (models/allocator.py): measured by the page faults of a real process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

FAULTS_OF_REPEATED_FORWARDS = """
import resource, sys, torch
from segmill.models.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 21, 3, padding=1))
x = torch.randn(4, 3, 256, 256)  # activations of 32 MB and more: above glibc's largest dynamic mmap threshold
with torch.inference_mode():
    net(x).softmax(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        net(x).softmax(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_FORWARDS, mode], capture_output=True, text=True,
                         check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_kept_memory_is_reused_instead_of_faulted_in_again() -> None:
    default, kept = _page_faults("default"), _page_faults("keep")
    assert default > 5 * (32 << 20) // 4096  # each forward maps and zeroes its activations anew
    assert kept < default / 10


FAULTS_IN_A_THREAD_WITH_ITS_OWN_ARENA = """
import resource, threading, torch
from segmill.models.allocator import keep_freed_memory
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 21, 3, padding=1))
x = torch.randn(4, 3, 512, 512)  # 88 MB of logits: larger than a thread arena's 64 MB heaps
arena_taken, kept, faults = threading.Event(), threading.Event(), []

def forwards():  # like Ray Data's calling thread: it allocated before the model loaded
    torch.zeros(1000)
    arena_taken.set()
    kept.wait()
    with torch.inference_mode():
        net(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            net(x)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

thread = threading.Thread(target=forwards)
thread.start()
arena_taken.wait()
assert keep_freed_memory()
kept.set()
thread.join()
print(faults[0])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc arenas are glibc's")
def test_one_arena_from_process_start_keeps_memory_for_a_thread_that_allocated_first() -> None:
    from segmill.models.allocator import ONE_ARENA_ENV

    def faults(env: dict[str, str]) -> int:
        inherited = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
        out = subprocess.run([sys.executable, "-c", FAULTS_IN_A_THREAD_WITH_ITS_OWN_ARENA], capture_output=True,
                             text=True, check=True, env={**inherited, **env})
        return int(out.stdout.split()[-1])

    own_arena, one_arena = faults({}), faults(ONE_ARENA_ENV)
    assert own_arena > 5 * (88 << 20) // 4096  # mallopt came too late for this thread: logits faulted in every time
    assert one_arena < own_arena / 10


FREED_HOLES_TRIMMED = """
import os, torch
from segmill.models.allocator import FreedMemoryTrimmer, keep_freed_memory
assert keep_freed_memory()
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
now = [0.0]
trim = FreedMemoryTrimmer(interval=30.0, clock=lambda: now[0])
blocks = [torch.ones(1 << 18) for _ in range(200)]  # 200 MB in 1 MB blocks, all touched
kept = blocks[1::2]
del blocks  # every other block freed: 100 MB of holes below live blocks, which no top-of-heap trim reaches
before = resident()
now[0] = 29.0
early = trim()
after_early = resident()
now[0] = 31.0
print(early, trim(), before - after_early, after_early - resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_kept_free_memory_goes_back_to_the_kernel_once_per_interval() -> None:
    out = subprocess.run([sys.executable, "-c", FREED_HOLES_TRIMMED], capture_output=True, text=True, check=True)
    early, trimmed, freed_early, freed_on_time = out.stdout.split()
    assert (early, trimmed) == ("False", "True")
    assert int(freed_early) < 10 << 20  # kept: nothing given back before the interval
    assert int(freed_on_time) > 80 << 20  # the holes' pages given back
