"""The object store of the local cluster a bulk job starts: sized from the job's queue, not Ray's 30% of memory
(pipeline/ray_runtime.py says why)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from segmill.pipeline import ResourceConfig
from segmill.pipeline.common.runtime import local_object_store_bytes

MB = 2**20
GB64 = 64 * 2**30


def test_store_is_twice_the_job_queue_and_at_least_512_mb() -> None:
    store = lambda resources, cpus, gpus: local_object_store_bytes(resources, cpus, gpus, memory_bytes=GB64)
    assert store(ResourceConfig(), 2, 0) == 512 * MB  # one CPU actor, a 256 MB queue
    assert store(ResourceConfig(), 16, 0) == 2 * 4 * 256 * MB  # four 4-thread actors
    assert store(ResourceConfig(), 16, 1) == 2 * 2048 * MB  # a GPU actor's deeper queue
    assert store(ResourceConfig(queue_memory_mb=1000), 2, 0) == 2000 * MB
    assert store(ResourceConfig(queue_memory_mb=10), 2, 0) == 512 * MB


def test_ray_default_store_where_the_job_would_want_more() -> None:
    assert local_object_store_bytes(ResourceConfig(), 64, 8, memory_bytes=GB64) is None  # 32 GB > 30% of 64 GB


def test_ray_default_store_where_gpus_cannot_be_counted(monkeypatch) -> None:
    import ray._private.accelerators as accelerators

    def broken(resource_name):
        raise RuntimeError("NVML not found")

    monkeypatch.setattr(accelerators, "get_accelerator_manager_for_resource", broken)
    assert local_object_store_bytes(ResourceConfig(), 2, memory_bytes=GB64) is None


def test_an_explicit_store_size_wins() -> None:
    assert local_object_store_bytes(ResourceConfig(object_store_mb=300), 64, 8, memory_bytes=GB64) == 300 * MB


CHILD = """
import json, ray
from segmill.pipeline import ResourceConfig
from segmill.pipeline.common.runtime import ensure_ray
ensure_ray(None, ResourceConfig())
print(json.dumps(ray.cluster_resources()))
"""


def test_a_local_cluster_started_for_a_job_has_that_store() -> None:
    # A child process: this one's Ray (tests/conftest.py) is already started with its own store.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    resources = json.loads(done.stdout.strip().splitlines()[-1])
    assert resources["object_store_memory"] == local_object_store_bytes(ResourceConfig())
