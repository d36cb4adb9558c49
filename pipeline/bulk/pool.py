"""Model actors kept alive between the bulk jobs of one process ("warm actors").

Ray Data starts a new actor pool for every dataset: each job paid 4.7-6.3 s before its first batch (a worker
process, torch and torchvision imported, the model loaded; docs/throughput.md), which is most of a small job's
fixed cost, and the improve loop runs many small jobs. Here the model stage is a Ray Data task that hands each
batch to one of this process's `ModelHost` actors; a host imports torch once and loads a job's model on its first
batch, again only when the model or the inference settings change.

Used on a single-node cluster (no locality to keep, nothing to autoscale) when the hosts fit beside a decoding
task; elsewhere the job keeps Ray Data's own actor pool (dataset.py). The hosts hold their CPUs (or GPUs) between
jobs, so `release()` frees them: training does before it starts, and a user can at any time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segmill.models.allocator import ONE_ARENA_ENV

if TYPE_CHECKING:
    from segmill.pipeline.bulk.config import ResourceConfig

log = logging.getLogger(__name__)
MAX_HOST_RESTARTS = 2  # as dataset.MAX_ACTOR_RESTARTS: an image that kills its host must not loop
MAX_JOBS_REMEMBERED = 64  # jobs whose model activity a host keeps


class ModelHost:
    """A model actor that outlives jobs: `segment(key, load, batch)` runs the model `load` describes, loading it
    when `key` (the checkpoint's digest and the inference settings) differs from the one loaded. A restarted host
    starts empty and loads on its next call."""

    def __init__(self) -> None:
        # The imports (torch, torchvision, the models: 3-4 s) are what a warm host saves the next job; a new host
        # does them while its first job is still checked and listed, not after.
        import segmill.pipeline.bulk.segmenter  # noqa: F401
        from segmill.models.registry import list_models

        list_models()  # imports the built-in model families, torchvision with them

        self._lock = threading.Lock()
        self._key: str | None = None
        self._segmenter = None
        self._activity: dict[str, list] = {}

    def ready(self) -> bool:
        return True

    def loaded(self) -> str | None:
        return self._key

    def _ensure(self, key: str, load: dict[str, Any]):
        with self._lock:  # concurrent calls share one model; the first call of a new key loads it
            if self._key != key:
                from segmill.pipeline.bulk.segmenter import Segmenter
                from segmill.pipeline.common.decode import read_bytes

                self._segmenter, self._key = None, None  # the old model's memory goes before the new one loads
                checkpoint = read_bytes(load["checkpoint_uri"], load["endpoint_url"], what="Model checkpoint")
                self._segmenter = Segmenter(checkpoint, **load["segmenter"])
                self._key = key
            return self._segmenter

    def preload(self, key: str, load: dict[str, Any]) -> bool:
        """Load the job's model ahead of its first batch (while the first images decode); False if it failed, in
        which case the first batch loads it again and fails with the error as the job's."""
        try:
            self._ensure(key, load)
            return True
        except Exception:
            return False

    def segment(self, key: str, load: dict[str, Any], batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segmenter = self._ensure(key, load)
        began = time.time()
        out = segmenter(batch)
        with self._lock:  # per job: first start, last end, batches, busy seconds (bench/ reads them: `activity`)
            seen = self._activity.setdefault(load.get("job_id", ""), [began, 0.0, 0, 0.0])
            seen[1], seen[2], seen[3] = time.time(), seen[2] + 1, seen[3] + time.time() - began
            while len(self._activity) > MAX_JOBS_REMEMBERED:
                self._activity.pop(next(iter(self._activity)))
        return out

    def activity(self, job_id: str) -> list | None:
        return self._activity.get(job_id)


@dataclass
class WarmPool:
    """The hosts of one resource shape on one Ray session; `tokens` lends host indices when there are several,
    so that each host runs at most its number of concurrent batches (None with one host)."""

    session: tuple[str, str]
    shape: tuple
    hosts: list
    tokens: Any = None
    used: bool = False  # a job has run on them: before the next, they are asked whether they are alive

    def preload(self, key: str, load: dict[str, Any]) -> None:
        """Have every host load the model now; not waited for (a host's first batch waits on its lock)."""
        for host in self.hosts:
            host.preload.remote(key, load)


_pool: WarmPool | None = None
_pool_lock = threading.Lock()


def _session() -> tuple[str, str]:
    import ray

    context = ray.get_runtime_context()
    return context.get_node_id(), context.get_job_id()


def _shape(resources: "ResourceConfig") -> tuple:
    return (resources.actors_max, resources.cpus_per_actor, resources.gpus_per_actor,
            json.dumps(resources.actor_resources or {}, sort_keys=True), resources.concurrent_batches or 1,
            resources.keep_host_memory)


def fits(resources: "ResourceConfig", cluster: dict[str, float], nodes: int) -> bool:
    """Warm hosts are used on one node (or anywhere with `warm_actors=True`), when all of them and one decoding
    task fit in the cluster at once: a host that cannot be placed would leave its batches waiting, where Ray Data's
    pool would start fewer actors."""
    if resources.warm_actors is False or (nodes != 1 and resources.warm_actors is not True):
        return False
    actors = resources.actors_max
    cpus_left = cluster.get("CPU", 0) - actors * resources.cpus_per_actor
    gpus_left = cluster.get("GPU", 0) - actors * (resources.gpus_per_actor or 0)
    custom = all(cluster.get(name, 0) >= actors * amount for name, amount in (resources.actor_resources or {}).items())
    return cpus_left >= resources.decode_cpus and gpus_left >= 0 and custom


def acquire(resources: "ResourceConfig", *, use: bool = True) -> WarmPool:
    """This process's hosts for `resources`, started if there are none, none alive, or of another shape; `use`
    False starts them ahead of a job (dataset.start_model_hosts), and the job's own call does not wait for them."""
    import ray

    global _pool
    with _pool_lock:
        session, shape = _session(), _shape(resources)
        if _pool is not None and (_pool.session != session or _pool.shape != shape
                                  or (_pool.used and not _alive(_pool))):
            _shutdown(_pool)
            _pool = None
        if _pool is None:
            options = dict(num_cpus=resources.cpus_per_actor, num_gpus=resources.gpus_per_actor or None,
                           resources=resources.actor_resources, max_concurrency=resources.concurrent_batches or 1,
                           # A call in flight when its host dies is run again once the host has restarted.
                           max_restarts=MAX_HOST_RESTARTS, max_task_retries=MAX_HOST_RESTARTS)
            if resources.keep_host_memory:  # one malloc arena, as dataset._model_process_env says why
                options["runtime_env"] = {"env_vars": dict(ONE_ARENA_ENV)}
            remote = ray.remote(ModelHost).options(**{k: v for k, v in options.items() if v is not None})
            hosts = [remote.remote() for _ in range(resources.actors_max)]
            tokens = None
            if len(hosts) > 1:
                from ray.util.queue import Queue

                tokens = Queue()
                for _ in range(resources.concurrent_batches or 1):
                    for index in range(len(hosts)):
                        tokens.put(index)
            _pool = WarmPool(session, shape, hosts, tokens)
            log.debug("started %d warm model actors", len(hosts))
        _pool.used = _pool.used or use
        return _pool


def current() -> WarmPool | None:
    """This process's hosts, if it has any."""
    return _pool


def _alive(pool: WarmPool) -> bool:
    """Every host answers: one whose restarts ran out (an image kept killing it) is dead for good."""
    import ray

    try:
        ray.get([host.ready.remote() for host in pool.hosts], timeout=60)
        return True
    except Exception as error:  # a dead or unplaceable host: the pool is started again
        log.info("warm model actors are started again (%s)", type(error).__name__)
        return False


def _shutdown(pool: WarmPool) -> None:
    import ray

    for actor in [*pool.hosts, *([pool.tokens.actor] if pool.tokens is not None else [])]:
        try:
            ray.kill(actor)
        except Exception:  # already gone, or its Ray is: nothing left to free
            pass


def release() -> None:
    """Stop this process's warm model actors, freeing their CPUs or GPUs (the next bulk job starts new ones)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _shutdown(_pool)
            _pool = None


def activity(job_id: str) -> dict[str, float] | None:
    """The warm hosts' model work for a job: its first batch's start and last batch's end (epoch seconds), the
    batches and the busy seconds summed over hosts; None if no host of this process ran the job."""
    import ray

    if _pool is None:
        return None
    found = [a for a in ray.get([host.activity.remote(job_id) for host in _pool.hosts]) if a]
    if not found:
        return None
    return {"first": min(a[0] for a in found), "last": max(a[1] for a in found), "batches": sum(a[2] for a in found),
            "seconds": sum(a[3] for a in found)}


def model_key(checkpoint: bytes, segmenter: dict[str, Any]) -> str:
    """What a host's loaded model must match: the checkpoint's bytes and everything the Segmenter is built with."""
    digest = hashlib.sha256(checkpoint)
    digest.update(repr(sorted(segmenter.items())).encode())
    return digest.hexdigest()


def segment_on_hosts(batch: dict[str, np.ndarray], *, pool: WarmPool, key: str,
                     load: dict[str, Any]) -> dict[str, np.ndarray]:
    """The model stage as a Ray Data task: a host from the pool segments the batch."""
    import ray

    index = 0 if pool.tokens is None else pool.tokens.get()
    try:
        return ray.get(pool.hosts[index].segment.remote(key, load, batch))
    finally:
        if pool.tokens is not None:
            pool.tokens.put(index)
