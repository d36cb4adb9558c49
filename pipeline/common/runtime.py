"""Connecting to Ray: an in-process local cluster by default, an existing one with an address."""
from __future__ import annotations

import logging
import os
import queue
import signal
import sys
import threading
from concurrent.futures import Future
from typing import Any, Callable

from segmill.pipeline.common import settings
from segmill.pipeline.common.storage import first_line, protocol_of, redact

log = logging.getLogger(__name__)
# Loggers of the libraries a job drives; the CLI keeps them to errors unless -v (`set_library_log_level`).
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow", "alembic", "botocore", "s3fs", "fsspec",
                   "urllib3", "filelock")
_library_level: int | None = None  # None: each library's own


def set_library_log_level(level: int | None) -> None:
    """The level of Ray's (and the other libraries') loggers, e.g. logging.ERROR to keep their INFO and WARNING
    lines out of a person's log; applied again once Ray is imported, since Ray Data configures its logger then."""
    global _library_level
    _library_level = level
    _apply_library_level()


def _apply_library_level() -> None:
    if _library_level is not None:
        for name in LIBRARY_LOGGERS:
            logging.getLogger(name).setLevel(_library_level)
# Ray's default object store is 30% of memory; Plasma spreads its allocations over the store and every page it
# ever wrote stays resident, so a long job's store pages grow toward that size. A store sized to the job caps
# them (docs/throughput.md, "Scaling").
STORE_PER_QUEUE = 2  # Ray Data keeps its queues within half the store: twice the queue makes its limit the queue
MIN_LOCAL_STORE_MB = 512
RAY_DEFAULT_STORE_SHARE = 0.3


_dashboard: Callable[[str], None] | None = None  # set by `show_dashboard`: called with the dashboard's URL


def show_dashboard(callback: Callable[[str], None]) -> None:
    """Have the next local Ray this process starts run its dashboard on 127.0.0.1, and call `callback` with its
    URL (the CLI's `--dashboard`). A joined cluster has its own dashboard; nothing is started for it."""
    global _dashboard
    _dashboard = callback


def ensure_ray(address: str | None = None, job_resources=None) -> None:
    """Start or join Ray once per process; `address` (or $RAY_ADDRESS other than `local`) joins an existing cluster.

    Without one, the job starts a Ray of its own (`address="local"`), even when another Ray runs on the machine (a
    `ray start` head, or another user's job): two jobs never share one by accident. A local cluster started for a
    bulk job (`job_resources`, its ResourceConfig) gets an object store sized for that job
    (`local_object_store_bytes`); otherwise Ray's default. A Ray that cannot start or be reached is one sentence.
    """
    import ray
    import ray.data  # noqa: F401  (configures its logger on import: quieted after it)

    _apply_library_level()
    if ray.is_initialized():
        return
    address = settings.ray_address(address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = settings.progress_bars()
    try:
        if address:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        else:
            store = local_object_store_bytes(job_resources) if job_resources is not None else None
            context = ray.init(address="local", include_dashboard=_dashboard is not None, dashboard_host="127.0.0.1",
                               log_to_driver=False, configure_logging=False, object_store_memory=store)
            if _dashboard is not None and context.dashboard_url:
                _dashboard(f"http://{context.dashboard_url}")
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        where = f"The Ray cluster at {redact(address)} cannot be reached" if address else "Ray cannot start here"
        raise ValueError(f"{where} ({type(exc).__name__}: {first_line(exc)}).") from None
    log.info("Ray resources: %s", ray.cluster_resources())


def local_object_store_bytes(resources, cpus: float | None = None, gpus: int | None = None,
                             memory_bytes: int | None = None) -> int | None:
    """Object store for a local cluster that runs one bulk job: `resources.object_store_mb` if set, else twice the
    job's queue on this machine (at least MIN_LOCAL_STORE_MB); None (Ray's default) where that would be larger
    than Ray's default. The machine's CPUs, GPUs and memory are counted unless given."""
    if resources.object_store_mb:
        return resources.object_store_mb * 2**20
    cpus = _local_cpus() if cpus is None else cpus
    gpus = _local_gpus() if gpus is None else gpus
    if gpus is None:  # unknown: a GPU actor's deeper queue may not fit a store sized for CPU actors
        return None
    queue_mb = resources.resolve({"CPU": cpus, "GPU": gpus}).queue_memory_mb
    wanted = max(MIN_LOCAL_STORE_MB, STORE_PER_QUEUE * queue_mb) * 2**20
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return wanted if wanted < RAY_DEFAULT_STORE_SHARE * memory_bytes else None


def _local_cpus() -> float:
    from ray._private.utils import (
        get_num_cpus,  # what a local ray.init will count (cgroup limits included)
    )

    return get_num_cpus()


def _local_gpus() -> int | None:
    """GPUs a local ray.init will count, found the way Ray finds them (no torch import in the driver)."""
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        return int(get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators())
    except Exception as error:  # a private API of the pinned Ray; if it moves, keep Ray's default store
        log.warning("could not count this machine's GPUs (%s); the local object store keeps Ray's default size",
                    error)
        return None


def refuse_local_paths(paths: dict[str, str | None]) -> None:
    """On a cluster of more than one node, a local path is on one machine only: the tasks and workers on the
    others cannot read or write it. Say so in one sentence, naming the first such input or output."""
    import ray

    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    for what, uri in paths.items():
        if nodes > 1 and uri and protocol_of(uri) == "file":
            raise ValueError(f"The Ray cluster has {nodes} nodes, so {what} {redact(uri)} (a path on this machine) "
                             "cannot be reached from all of them; put it on shared storage (s3://... or another "
                             "fsspec URI).")


_starter: queue.SimpleQueue | None = None
_starter_lock = threading.Lock()


def _on_starter_thread(start: Callable[[], Any]) -> Future:
    """Run `start` on this process's one starter thread, which never ends: Ray's fate sharing (PR_SET_PDEATHSIG)
    kills the processes a local ray.init starts when the *thread* that started them ends, not the process."""
    global _starter
    with _starter_lock:
        if _starter is None:
            _starter = queue.SimpleQueue()
            threading.Thread(target=_serve_starts, args=(_starter,), name="segmill-ray-start", daemon=True).start()
    future: Future = Future()
    _starter.put((start, future))
    return future


def _serve_starts(starts: queue.SimpleQueue) -> None:
    while True:
        start, future = starts.get()
        try:
            future.set_result(start())
        except BaseException as error:  # handed to the caller's thread by BackgroundStart.wait
            future.set_exception(error)


class BackgroundStart:
    """Ray started on another thread while a job's checks run on the caller's (the model's load in its child
    process, the listing: together as long as Ray's start, docs/throughput.md), and stopped again if they fail.

        start = BackgroundStart(lambda: ensure_ray(address))
        try:
            ...checks...
            start.wait()     # raises what the start raised (a Ray that cannot start is one sentence)
        except BaseException:
            start.abandon()  # a rejected job leaves no Ray of its own behind (the user's ray.init would fail)
            raise

    `start` returns what `wait` returns; `abandon(undo)` calls `undo` with it before Ray is stopped.
    """

    def __init__(self, start: Callable[[], Any]):
        # Not imported here just to ask (the starter thread imports it); one being imported by another thread
        # has no is_initialized yet, and no Ray either.
        initialized = getattr(sys.modules.get("ray"), "is_initialized", None)
        self._ours = not (initialized is not None and initialized())
        if self._ours and threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            # What ray.init does on the main thread, and cannot from another: SIGTERM exits through atexit,
            # which stops the Ray processes this one started.
            signal.signal(signal.SIGTERM, lambda signum, _: sys.exit(signum))
        self._future = _on_starter_thread(start)

    def wait(self) -> Any:
        return self._future.result()

    def abandon(self, undo: Callable[[Any], None] | None = None) -> None:
        """Wait for the start to end, undo it (`undo(result)`), and stop the Ray it started, if it started one."""
        try:
            result = self._future.result()
        except BaseException:  # the job's own error is the one to report
            result, undo = None, None
        try:
            if undo is not None:
                undo(result)
            import ray

            if self._ours and ray.is_initialized():
                ray.shutdown()
        except Exception as error:  # as above
            log.debug("stopping the Ray this job started failed: %s", error)
