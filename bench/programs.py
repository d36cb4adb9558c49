"""The programs `bench.throughput` compares, each as a user would write it, on the same images and weights.

Every program reads the PNG/JPEG files of one folder, runs the same checkpoint, and writes one Parquet file (or
part files) of `image_uri` + a uint8 mask encoded as PNG. Each returns {images, seconds, stages}: `seconds` is
the processing time (after imports; Ray's start and the model's load included), `stages` seconds per stage (for Ray
programs, task wall time summed over tasks, from Ray Data's stats).
"""
from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from segmill.pipeline.common.images import FAST_PNG
from segmill.pipeline.common.images import encode_png as _encode_png

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def encode_png(mask: np.ndarray) -> bytes:
    return _encode_png(mask, compress_level=FAST_PNG)  # the level segmill uses


def _load(checkpoint: str):
    import torch

    from segmill.models.checkpoint import load_checkpoint

    model, spec = load_checkpoint(checkpoint, map_location="cpu")
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return model.eval(), mean, std


def _write(uris: list[str], masks: list[bytes], output: str) -> None:
    Path(output).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image_uri": uris, "mask": pa.array(masks, pa.binary())}),
                   str(Path(output) / "part-0.parquet"), compression="zstd")


class _Clock:
    """Adds the seconds since the last tick to a named stage."""

    def __init__(self) -> None:
        self.stages: dict[str, float] = defaultdict(float)
        self.last = time.perf_counter()

    def tick(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] += now - self.last
        self.last = now


def _finish(files: list[str], masks: list[bytes], output: str, clock: _Clock, *, started: float,
            loop_started: float, settings: dict[str, Any]) -> dict[str, Any]:
    """A plain program's end: write its Parquet, and its result (steady: the processing loop alone)."""
    steady = clock.last - loop_started
    _write(files, masks, output)
    clock.tick("write")
    return {"images": len(files), "seconds": time.perf_counter() - started, "steady_seconds": steady,
            "stages": dict(clock.stages), "settings": settings}


def bare_loop(images: str, checkpoint: str, output: str, *, threads: int = 0, **_: Any) -> dict[str, Any]:
    """One process, batch 1: decode, forward, argmax, encode, in a plain loop."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    model, mean, std = _load(checkpoint)
    files, masks = list_images(images), []
    clock = _Clock()
    loop_started = clock.last
    with torch.inference_mode():
        for uri in files:
            pixels = np.asarray(Image.open(uri).convert("RGB"))
            clock.tick("decode")
            x = (torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255 - mean) / std
            logits = model(x)["out"]
            clock.tick("forward")
            mask = logits.argmax(1)[0].to(torch.uint8).numpy()
            clock.tick("argmax")
            masks.append(encode_png(mask))
            clock.tick("encode")
    return _finish(files, masks, output, clock, started=started, loop_started=loop_started,
                   settings={"threads": torch.get_num_threads(), "batch_size": 1})


class _Files:
    """A map-style dataset whose items are decoded in the DataLoader's worker processes."""

    def __init__(self, files: list[str]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray]:
        return i, np.asarray(Image.open(self.files[i]).convert("RGB"))


def _collate(items: list) -> list:
    return items


def dataloader(images: str, checkpoint: str, output: str, *, threads: int = 2, workers: int = 1,
               batch_size: int = 1, fast_path: bool = False, **_: Any) -> dict[str, Any]:
    """The best plain PyTorch program for one machine: worker processes decode, the main process runs the model.

    Images of one size are stacked into a batch; different sizes are run apart (no padding, so no mask changes).
    `fast_path` gives it segmill's CPU model optimisations too (BatchNorm folded, channels-last, freed memory kept
    for reuse), so that a comparison can tell the pipeline's cost from the model's.
    """
    import torch
    from torch.utils.data import DataLoader

    from segmill.models.allocator import keep_freed_memory
    from segmill.models.fold import fold_batchnorm

    torch.set_num_threads(threads)
    started = time.perf_counter()
    model, mean, std = _load(checkpoint)
    if fast_path:
        keep_freed_memory()
        fold_batchnorm(model)
        model = model.to(memory_format=torch.channels_last)
    files = list_images(images)
    masks: list[bytes] = [b""] * len(files)
    loader = DataLoader(_Files(files), batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        prefetch_factor=4 if workers else None)
    clock = _Clock()
    loop_started = clock.last
    with torch.inference_mode():
        for batch in loader:
            clock.tick("wait_for_decode")
            groups: dict[tuple, list] = defaultdict(list)
            for i, pixels in batch:
                groups[pixels.shape].append((i, pixels))
            for group in groups.values():
                x = torch.from_numpy(np.stack([p for _, p in group])).permute(0, 3, 1, 2).float()
                logits = model((x / 255 - mean) / std)["out"]
                clock.tick("forward")
                found = logits.argmax(1).to(torch.uint8).numpy()
                clock.tick("argmax")
                for (i, _), mask in zip(group, found):
                    masks[i] = encode_png(mask)
                clock.tick("encode")
    return _finish(files, masks, output, clock, started=started, loop_started=loop_started,
                   settings={"threads": threads, "workers": workers, "batch_size": batch_size, "fast_path": fast_path})


class DocsPredictor:
    """The callable class of Ray's batch-inference documentation: model loaded once per actor."""

    def __init__(self, checkpoint: str):
        self.model, self.mean, self.std = _load(checkpoint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).float()
            found = self.model((x / 255 - self.mean) / self.std)["out"].argmax(1).to(torch.uint8).numpy()
        return {"image_uri": batch["path"], "mask": np.array([encode_png(m) for m in found], dtype=object)}


def ray_docs(images: str, checkpoint: str, output: str, *, size: int = 512, actors: int = 2,
             cpus_per_actor: float = 0.5, batch_size: int = 4, **_: Any) -> dict[str, Any]:
    """read_images -> map_batches(callable class, actor pool) -> write_parquet, as Ray's docs write it.

    read_images needs one size for a batch, so it resizes (`size`); on images of several sizes it cannot run
    without that.
    """
    import ray

    started = time.perf_counter()  # Ray's start counts, as it does for segmill's job
    ray.init(include_dashboard=False, log_to_driver=False)
    ds = (ray.data.read_images(images, size=(size, size), mode="RGB", include_paths=True)
          .map_batches(DocsPredictor, fn_constructor_args=(checkpoint,), batch_size=batch_size,
                       compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor))
    ds.write_parquet(output)
    seconds = time.perf_counter() - started
    stages, steady = ray_stage_seconds(ds), model_window(ds, "DocsPredictor")
    ray.shutdown()
    return {"images": len(list_images(images)), "seconds": seconds, "steady_seconds": steady, "stages": stages,
            "settings": {"actors": actors, "cpus_per_actor": cpus_per_actor, "batch_size": batch_size, "size": size}}


def segmill_job(images: str, checkpoint: str, output: str, *, resources: dict | None = None, jobs: int = 1,
                **_: Any) -> dict[str, Any]:
    """segmill's bulk job with the given ResourceConfig fields (defaults if none), step by step through its public
    seams, so that Ray Data's per-stage stats can be read from the very dataset the job ran. Its time counts
    Ray's start (beside the model's check, as the job does). With `jobs` > 1 the same job runs again in
    the same process, into other outputs: `warm_seconds` are those later jobs' times, Ray already up and the model
    already checked, as a process running many small jobs (the improve loop) sees them."""
    import ray

    from segmill.pipeline.bulk import job
    from segmill.pipeline.bulk import pool as warm_pool
    from segmill.pipeline.bulk.config import ResourceConfig, SegmentConfig

    config = SegmentConfig(input=images, output=output, model=checkpoint, resources=ResourceConfig(**(resources or {})))
    started = time.perf_counter()
    begun = job.start(config)  # the checks while Ray and the model hosts start, as `segment` does
    plan, dataset = begun.plan, begun.dataset
    record = job.run(config, plan, dataset)
    seconds = time.perf_counter() - started
    resolved = config.resources.resolve(ray.cluster_resources())
    stages, steady = ray_stage_seconds(dataset), model_window(dataset, "Segmenter")
    seen = warm_pool.activity(plan.job_id)
    if seen:  # warm hosts (pool.py): the model stage's tasks only wait on them; the hosts' own window and work
        steady, stages["ModelHost.segment"] = seen["last"] - seen["first"], seen["seconds"]
    warm = []
    for again in range(1, jobs):
        warm_config = config.replace(output=f"{output}-warm-{again}")
        shutil.rmtree(warm_config.output, ignore_errors=True)  # a left-over output would resume: nothing to do
        began = time.perf_counter()
        warm_begun = job.start(warm_config)
        warm_record = job.run(warm_config, warm_begun.plan, warm_begun.dataset)
        warm.append(time.perf_counter() - began)
        if (warm_record.ok_rows, warm_record.processed_this_run) != (record.ok_rows, record.processed_this_run):
            raise RuntimeError(f"a warm job segmented {warm_record.processed_this_run} images, the first job "
                               f"{record.processed_this_run}: not the same work")
    ray.shutdown()
    result = {"images": record.ok_rows, "errors": record.error_rows, "seconds": seconds, "steady_seconds": steady,
              "stages": stages,
              "settings": {k: getattr(resolved, k) for k in ("batch_size", "actors_max", "cpus_per_actor",
                                                             "torch_threads", "concurrent_batches", "decode_cpus",
                                                             "precision", "channels_last", "fold_batchnorm",
                                                             "keep_host_memory", "compile")}}
    if warm:
        result["warm_seconds"] = warm
    return result


def model_window(ds, model_stage: str) -> float | None:
    """Seconds from the model stage's first task start to its last task end (steady state: no Ray start, no
    listing, no actor construction before the first batch)."""
    try:
        summary = ds.get_stats_summary()
    except Exception:
        return None
    found = []

    def walk(node) -> None:
        for parent in getattr(node, "parents", []) or []:
            walk(parent)
        found.extend(op for op in node.operators_stats if model_stage in op.operator_name)

    walk(summary)
    starts = [op.earliest_start_time for op in found if op.earliest_start_time]
    ends = [op.latest_end_time for op in found if op.latest_end_time]
    return max(ends) - min(starts) if starts and ends else None


def ray_stage_seconds(ds) -> dict[str, float]:
    """Task wall time summed per Ray Data operator (seconds of work, not elapsed time: stages overlap)."""
    try:
        summary = ds.get_stats_summary()
    except Exception:
        return {}
    stages: dict[str, float] = {}

    def walk(node) -> None:
        for parent in getattr(node, "parents", []) or []:
            walk(parent)
        for op in node.operators_stats:
            if op.wall_time is not None:
                stages[op.operator_name] = stages.get(op.operator_name, 0.0) + float(op.wall_time.sum)

    walk(summary)
    return stages


PROGRAMS = {"bare_loop": bare_loop, "dataloader": dataloader, "ray_docs": ray_docs, "segmill": segmill_job}
