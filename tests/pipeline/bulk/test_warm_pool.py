"""Warm model actors (pipeline/bulk/pool.py): kept between the bulk jobs of one process, on the session's local Ray.

What must hold: a later job reuses the same actor process and still runs its own model (never the previous
job's), several hosts share the work, a dead host is replaced, and `release()` frees the actors' CPUs.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import ray

from segmill.pipeline import SegmentConfig, segment
from segmill.pipeline.bulk import pool
from segmill.pipeline.bulk.config import ResourceConfig

COMPARED = ("status", "mask", "class_pixels", "confidence_mean", "entropy_mean", "iou")


def _rows(config: SegmentConfig, results_reader) -> dict[str, dict]:
    segment(config)
    return {row["image_uri"]: {c: row[c] for c in COMPARED} for row in results_reader(config.output).to_pylist()}


def _pids(hosts) -> list[int]:
    import os

    return ray.get([host.__ray_call__.remote(lambda self: os.getpid()) for host in hosts])


@pytest.fixture
def other_checkpoint(tmp_path: Path) -> str:
    """The scene classes with other random weights: its masks differ from tiny_checkpoint's."""
    from segmill.models.checkpoint import ModelSpec, save_random_checkpoint
    from segmill.pipeline.common.scenes import SCENE_CLASSES, SCENE_PALETTE

    spec = ModelSpec(arch="unet", classes=SCENE_CLASSES, arch_kwargs={"base_channels": 8, "depth": 2},
                     palette=SCENE_PALETTE)
    path = tmp_path / "other.pt"
    save_random_checkpoint(path, spec, seed=11)
    return str(path)


def test_a_later_job_reuses_the_actor_and_runs_its_own_model(ray_session, scenes_dir: Path, tiny_checkpoint: str,
                                                             other_checkpoint: str, tmp_path: Path,
                                                             results_reader) -> None:
    def config(model: str, name: str, **resources) -> SegmentConfig:
        return SegmentConfig(input=str(scenes_dir / "images"), labels=str(scenes_dir / "labels"),
                             output=str(tmp_path / name), model=model, resources=ResourceConfig(**resources))

    pool.release()
    first = _rows(config(tiny_checkpoint, "first"), results_reader)
    hosts = pool.acquire(ResourceConfig().resolve(ray.cluster_resources())).hosts
    pids = _pids(hosts)
    second = _rows(config(other_checkpoint, "second"), results_reader)
    assert _pids(pool.acquire(ResourceConfig().resolve(ray.cluster_resources())).hosts) == pids, \
        "the second job started a new model actor"
    # Each job's rows are what its own model gives in Ray Data's per-job actors.
    assert first == _rows(config(tiny_checkpoint, "first-cold", warm_actors=False), results_reader)
    assert second == _rows(config(other_checkpoint, "second-cold", warm_actors=False), results_reader)
    assert first != second, "the two test models should predict differently"


def test_several_hosts_share_a_job(ray_session, scenes_dir: Path, tiny_checkpoint: str, tmp_path: Path,
                                   results_reader) -> None:
    """Two hosts of one CPU on the session's 4 CPUs: both load the job's model, and every image gets its row."""
    resources = ResourceConfig(actors_max=2, cpus_per_actor=1, batch_size=1, decode_batch_size=2)
    config = SegmentConfig(input=str(scenes_dir / "images"), output=str(tmp_path / "out"), model=tiny_checkpoint,
                           resources=resources)
    rows = _rows(config, results_reader)
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows.values())
    warm = pool.acquire(resources.resolve(ray.cluster_resources()))
    assert len(warm.hosts) == 2 and warm.tokens is not None
    loaded = ray.get([host.loaded.remote() for host in warm.hosts])
    assert loaded[0] is not None and loaded[0] == loaded[1], "a host was left idle"
    assert warm.tokens.qsize() == 2 * (resources.resolve(ray.cluster_resources()).concurrent_batches or 1), \
        "a host's token was not given back"
    pool.release()


def test_a_dead_host_is_replaced_by_the_next_job(ray_session, scenes_dir: Path, tiny_checkpoint: str, tmp_path: Path,
                                                 results_reader) -> None:
    resources = ResourceConfig().resolve(ray.cluster_resources())
    dead = pool.acquire(resources).hosts[0]
    ray.kill(dead, no_restart=True)  # as a host whose restarts an image used up
    config = SegmentConfig(input=str(scenes_dir / "images"), output=str(tmp_path / "out"), model=tiny_checkpoint)
    rows = _rows(config, results_reader)
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows.values())
    assert pool.acquire(resources).hosts[0] != dead


def test_a_host_killed_mid_job_is_restarted_and_its_batch_done_again(ray_session, tmp_path: Path,
                                                                      tiny_checkpoint: str, results_reader) -> None:
    """A host process that dies with batches in flight (an OOM kill, a crash in native code): Ray restarts it,
    the task that waited on it is retried, the restarted host loads the model again, and every image gets one row."""
    import threading
    import time

    from segmill.pipeline.common.scenes import write_scenes

    write_scenes(str(tmp_path / "scenes"), 40, seed=5)
    # Multi-scale + flip and one image per batch: the job is still running when the host is killed.
    config = SegmentConfig(input=str(tmp_path / "scenes" / "images"), output=str(tmp_path / "out"),
                           model=tiny_checkpoint, scales=(1.0, 1.5), flip=True,
                           resources=ResourceConfig(batch_size=1, decode_batch_size=4))
    host = pool.acquire(config.resources.resolve(ray.cluster_resources())).hosts[0]
    killed = threading.Event()

    def kill_once_busy() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            seen = pool.activity(config.resolved_job_id())
            if seen and seen["batches"] >= 3:
                ray.kill(host, no_restart=False)
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_once_busy, daemon=True)
    killer.start()
    rows = _rows(config, results_reader)
    killer.join(timeout=5)
    assert killed.is_set(), "the job ended before its host could be killed: make it longer"
    assert len(rows) == 40 and all(r["status"] == "ok" for r in rows.values()), \
        sorted({r["status"] for r in rows.values()})
    assert ray.get(host.loaded.remote()) is not None, "the restarted host did not load the model again"


def test_release_frees_the_hosts_cpus(ray_session) -> None:
    import time

    resources = ResourceConfig().resolve(ray.cluster_resources())
    hosts = pool.acquire(resources).hosts
    ray.get([host.ready.remote() for host in hosts])
    assert ray.available_resources().get("CPU", 0) <= ray.cluster_resources()["CPU"] - resources.cpus_per_actor
    pool.release()  # ray.kill is asynchronous: the freed CPUs are what is waited for
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_warm_hosts_are_used_only_where_they_fit() -> None:
    """Planned only: one node, every host and one decode task placeable; `warm_actors` forces either way."""
    cpu = ResourceConfig().resolve({"CPU": 2.0})
    assert pool.fits(cpu, {"CPU": 2.0}, nodes=1)
    assert not pool.fits(cpu, {"CPU": 2.0}, nodes=2), "more than one node keeps Ray Data's actors (locality)"
    assert pool.fits(cpu.replace(warm_actors=True), {"CPU": 2.0}, nodes=2)
    assert not pool.fits(cpu.replace(warm_actors=False), {"CPU": 2.0}, nodes=1)
    too_many = ResourceConfig(actors_max=3, cpus_per_actor=1).resolve({"CPU": 3.0})
    assert not pool.fits(too_many, {"CPU": 3.0}, nodes=1), "no CPU left to decode"
    gpu = ResourceConfig().resolve({"CPU": 8.0, "GPU": 2.0})
    assert pool.fits(gpu, {"CPU": 8.0, "GPU": 2.0}, nodes=1) and gpu.actors_max == 2
    assert not pool.fits(gpu.replace(actors_max=3), {"CPU": 8.0, "GPU": 2.0}, nodes=1)
    custom = ResourceConfig(actor_resources={"big": 1.0}).resolve({"CPU": 8.0})
    assert not pool.fits(custom, {"CPU": 8.0}, nodes=1) and pool.fits(custom, {"CPU": 8.0, "big": 2.0}, nodes=1)
