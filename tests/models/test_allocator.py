"""Freed tensor memory is kept for reuse (models/allocator.py): measured by the page faults of a real process."""
from __future__ import annotations

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
