"""Images whose batches Ray gave up on (a crashing actor) still get exactly one row: an error row; and the
plan's choices that keep the model actor's memory flat and reused.

A real actor crash cannot be produced on demand here, so the test plays the end of such a run: the listing
exists, some rows were committed, the rest were lost; recovery must fill in exactly the lost ones.
"""
from __future__ import annotations

import os
from pathlib import Path

import ray

from segmill.pipeline.bulk.config import (
    QUEUE_MB_PER_CPU_ACTOR,
    ResourceConfig,
    SegmentConfig,
)
from segmill.pipeline.bulk.dataset import FINISHING_TASKS_PER_GPU_ACTOR, build_dataset
from segmill.pipeline.bulk.job import prepare
from segmill.pipeline.bulk.recovery import commit_lost_rows
from segmill.pipeline.bulk.results import build_table, commit_table, committed_rows
from segmill.pipeline.bulk.rows import error_rows
from segmill.pipeline.common.scenes import SCENE_CLASSES


def test_lost_images_become_error_rows_exactly_once(scenes_dir: Path, tiny_checkpoint: str, tmp_path: Path) -> None:
    config = SegmentConfig(input=str(scenes_dir / "images"), labels=str(scenes_dir / "labels"),
                           output=str(tmp_path / "out"), model=tiny_checkpoint)
    plan = prepare(config)
    images = sorted(str(p) for p in (scenes_dir / "images").glob("*.png"))
    survivors = error_rows(images[:3], [None] * 3, ["x"] * 3, len(SCENE_CLASSES), "input")  # stands for committed rows
    table = build_table(survivors, SCENE_CLASSES, job_id=plan.job_id, model_name="m", model_version="1")
    commit_table(table, config.output, plan.job_id, endpoint_url=None, row_group_rows=100)

    def recover() -> int:
        return commit_lost_rows(plan.listing_dir, config.output, job_id=plan.job_id, classes=SCENE_CLASSES,
                                model_name="m", model_version="1", endpoint_url=None, rows_per_file=4,
                                row_group_rows=100)

    assert recover() == len(images) - 3
    assert recover() == 0, "a second pass finds nothing lost"
    rows = committed_rows(config.output, None, ["image_uri", "status", "error", "label_uri"]).to_pylist()
    assert sorted(r["image_uri"] for r in rows) == images
    lost = [r for r in rows if r["image_uri"] not in images[:3]]
    assert all(r["status"] == "error" and r["error"].startswith(r["image_uri"]) for r in lost)
    assert all(r["label_uri"] and r["label_uri"].endswith(Path(r["image_uri"]).name) for r in lost)


def _job_dataset(scenes_dir: Path, tiny_checkpoint: str, tmp_path: Path, **resources):
    """The bulk job's dataset, built but not run."""
    config = SegmentConfig(input=str(scenes_dir / "images"), output=str(tmp_path / "out"), model=tiny_checkpoint,
                           resources=ResourceConfig(**resources))
    return build_dataset(config, prepare(config))


def _plan(scenes_dir: Path, tiny_checkpoint: str, tmp_path: Path, **resources) -> list:
    """The bulk job's logical operators, from the read to the commit."""
    node, nodes = _job_dataset(scenes_dir, tiny_checkpoint, tmp_path, **resources)._logical_plan.dag, []
    while node is not None:
        nodes.append(node)
        node = node.input_dependencies[0] if node.input_dependencies else None
    return nodes[::-1]


def test_the_listing_is_read_with_the_reader_that_keeps_actor_memory_flat(ray_session, scenes_dir: Path,
                                                                           tiny_checkpoint: str, tmp_path: Path) -> None:
    """Ray 2.60's V2 Parquet reader (ListFiles -> ReadFiles) grew the model actor's memory with every batch
    (docs/throughput.md); the job reads its listing with the V1 reader. A slow memory test would be noisy here,
    so the plan is checked: this fails if the flag is dropped or Ray stops honouring it."""
    names = [node.name for node in _plan(scenes_dir, tiny_checkpoint, tmp_path)]
    assert names[0] == "ReadParquet" and not any("ReadFiles" in n or "ListFiles" in n for n in names), names


def test_the_model_actor_starts_with_one_malloc_arena(ray_session, scenes_dir: Path, tiny_checkpoint: str,
                                                      tmp_path: Path) -> None:
    """The env var that lets Ray Data's calling thread reuse kept memory (tests/models/test_allocator.py shows
    the effect) is asked for the model stage's actors only, and only while host memory is kept."""
    from segmill.models.allocator import ONE_ARENA_ENV

    def env_vars(**resources) -> dict[str, dict]:
        return {node.name: node.ray_remote_args.get("runtime_env", {}).get("env_vars", {})
                for node in _plan(scenes_dir, tiny_checkpoint, tmp_path, **resources)[1:]}

    kept = env_vars(warm_actors=False)
    assert kept.pop("MapBatches(SegmenterStage)") == ONE_ARENA_ENV
    assert not any(kept.values()), kept
    assert not any(env_vars(keep_host_memory=False, warm_actors=False).values())
    # Warm model actors (pool.py) get it in their own process; the stage that hands them batches does not.
    assert not any(env_vars().values())
    from segmill.pipeline.bulk import pool

    hosts = pool.acquire(ResourceConfig().resolve(ray.cluster_resources())).hosts
    assert ray.get(hosts[0].__ray_call__.remote(lambda self: os.environ.get("MALLOC_ARENA_MAX"))) == \
        ONE_ARENA_ENV["MALLOC_ARENA_MAX"]


def test_encode_and_commit_run_as_many_tasks_at_once_as_there_are_model_actors(ray_session, scenes_dir: Path,
                                                                                tiny_checkpoint: str,
                                                                                tmp_path: Path) -> None:
    """Uncapped, backlogs of mask encoding and commits started extra worker processes (docs/throughput.md);
    decoding stays uncapped, as it must feed the actors, and is bounded by the queue cap instead."""
    def most_at_once(**resources) -> dict[str, int | None]:
        return {node.name: getattr(node.compute, "size", getattr(node.compute, "max_size", None))
                for node in _plan(scenes_dir, tiny_checkpoint, tmp_path, **resources)[1:]}

    assert most_at_once(actors_min=1, actors_max=3, warm_actors=False) == {
        "MapBatches(decode_batch)": None, "MapBatches(SegmenterStage)": 3, "MapBatches(encode_masks)": 3,
        "MapBatches(commit_batch)": 3}
    # Warm model actors (pool.py): one model task per batch the hosts run at once.
    assert most_at_once(actors_max=1, cpus_per_actor=1, concurrent_batches=2) == {
        "MapBatches(decode_batch)": None, "MapBatches(segment_on_hosts)": 2, "MapBatches(encode_masks)": 1,
        "MapBatches(commit_batch)": 1}
    # Planned only (nothing runs), so a GPU actor's share can be checked on this CPU machine.
    gpu = most_at_once(actors_max=2, gpus_per_actor=1.0)
    assert gpu["MapBatches(encode_masks)"] == gpu["MapBatches(commit_batch)"] == 2 * FINISHING_TASKS_PER_GPU_ACTOR


def test_queued_blocks_are_capped_in_the_jobs_own_context(ray_session, scenes_dir: Path, tiny_checkpoint: str,
                                                          tmp_path: Path) -> None:
    """Ray Data's own limit let decoded images pile up in the object store as a job went on (docs/throughput.md); the job's dataset carries a cap per model actor, and the process's context, which other jobs
    in the same driver share, is left as it was."""
    import ray

    shared = ray.data.DataContext.get_current()
    before = (shared.execution_options.resource_limits.object_store_memory, shared.max_errored_blocks)

    def cap(**resources) -> float:
        dataset = _job_dataset(scenes_dir, tiny_checkpoint, tmp_path, **resources)
        assert dataset.context.max_errored_blocks == -1 and dataset.context.use_datasource_v2 is False
        return dataset.context.execution_options.resource_limits.object_store_memory

    assert cap() == QUEUE_MB_PER_CPU_ACTOR * 2**20 * ResourceConfig().resolve(ray.cluster_resources()).actors_max
    assert cap(queue_memory_mb=64, actors_max=3) == 64 * 2**20
    assert (shared.execution_options.resource_limits.object_store_memory, shared.max_errored_blocks) == before
