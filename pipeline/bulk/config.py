"""Typed configuration of a bulk segmentation job, from Python, YAML or the CLI (pydantic: see common/config.py)."""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator

from segmill.models.options import PRECISIONS, FastPath, InferenceOptions
from segmill.pipeline.common.config import Config
from segmill.pipeline.common.decode import DEFAULT_MAX_PIXELS

CPU_THREADS_PER_ACTOR = 4  # CPUs one model actor uses; more actors beyond that (a torch import each)
# Object-store memory the job's queued blocks may fill, per model actor: decoding outruns the model many times
# over, and under Ray Data's own limit (half the store) it ran ever further ahead as a job went on.
QUEUE_MB_PER_CPU_ACTOR = 256
QUEUE_MB_PER_GPU_ACTOR = 2048  # a faster consumer needs a deeper queue; not yet measured on a GPU
_INFERENCE = InferenceOptions()
Positive = Annotated[int, Field(gt=0)]


class ResourceConfig(Config):
    """How the job uses the cluster; None means 'derive from the cluster's resources' (see `resolve`)."""

    what: ClassVar[str] = "resources"

    batch_size: Positive | None = Field(None, description="Images per model call (default from the cluster).")
    actors_min: Positive | None = None
    actors_max: Positive | None = Field(None, description="Most model actors (default from the cluster).")
    gpus_per_actor: Annotated[float, Field(ge=0)] | None = Field(
        None, description="GPUs per model actor (default 1 where the cluster has GPUs).")
    cpus_per_actor: Annotated[float, Field(gt=0)] | None = None
    actor_resources: dict[str, float] | None = Field(
        None, description="Custom Ray resources each model actor needs, e.g. {\"gpu_node\": 1}, to place the actors "
                          "on the nodes that have them.")
    torch_threads: Positive | None = Field(None, description="Torch threads of each batch a model actor runs "
                                                             "(default 1 on CPU).")
    concurrent_batches: Positive | None = Field(
        None, description="Batches one model actor runs at once, in threads sharing its model (default on CPU: one "
                          "per CPU thread of the actor; 1 with a GPU).")
    decode_cpus: Annotated[float, Field(gt=0)] = 0.5
    decode_batch_size: Positive = 16
    rows_per_file: Positive = 1000
    row_group_rows: Positive = 100
    # The model's fast path (models/predict.py); channels-last and folded BatchNorm change only the order of fp32
    # sums, so they are on by default; docs/throughput.md has what each is worth and how masks agree.
    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False
    fold_batchnorm: bool = True
    keep_host_memory: bool = True  # freed tensor memory stays in the actor for the next batch (models/allocator.py)
    pin_memory: bool | None = None
    gpu_jpeg_decode: bool = False
    queue_memory_mb: Positive | None = None  # object-store cap for queued blocks; None: per model actor, as above
    # Object store of the local cluster the job starts (ignored when joining one); None: sized from the queue
    # (common/runtime.py).
    object_store_mb: Annotated[int, Field(ge=100)] | None = None
    warm_actors: bool | None = Field(
        None, description="Keep the model actors alive for the next job of this process (default: on a single-node "
                          "cluster where they fit; pipeline/bulk/pool.py). False: Ray Data's own actors, per job.")

    @field_validator("precision")
    @classmethod
    def _known_precision(cls, value: str) -> str:
        if value not in PRECISIONS:
            raise ValueError(f"Resource precision {value!r} must be one of {list(PRECISIONS)}.")
        return value

    def resolve(self, cluster: dict[str, float]) -> "ResourceConfig":
        """Fill the unset numbers from the cluster: one actor per GPU; on CPU, actors of up to 4 CPUs that run as
        many batches at once, each on one torch thread, and reserve half as many CPUs, leaving the rest to read,
        decode and encode. Single-thread batches never wait for each other, so a core taken by another process
        slows one batch instead of stalling every thread at each operator's barrier, and the threads share one
        copy of the model (docs/throughput.md has the measurements). Host memory is pinned (for asynchronous
        copies) only where there is a GPU."""
        gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
        if self.gpus_per_actor or (self.gpus_per_actor is None and gpus):
            per_actor = self.gpus_per_actor or 1.0
            defaults = dict(batch_size=16, actors_max=max(1, int(gpus / per_actor)), gpus_per_actor=per_actor,
                            cpus_per_actor=1.0, torch_threads=1, concurrent_batches=1)
        else:
            threads = min(CPU_THREADS_PER_ACTOR, cpus)
            torch_threads = min(self.torch_threads or 1, threads)
            defaults = dict(batch_size=4, actors_max=max(1, cpus // threads), gpus_per_actor=0.0,
                            cpus_per_actor=threads / 2, torch_threads=torch_threads,
                            concurrent_batches=max(1, threads // torch_threads))
        values = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in defaults.items()}
        values["pin_memory"] = bool(gpus) if self.pin_memory is None else self.pin_memory
        values["actors_min"] = self.actors_min or 1
        values["actors_max"] = max(values["actors_max"], values["actors_min"])
        per_actor = QUEUE_MB_PER_GPU_ACTOR if values["gpus_per_actor"] else QUEUE_MB_PER_CPU_ACTOR
        values["queue_memory_mb"] = self.queue_memory_mb or per_actor * values["actors_max"]
        return self.model_copy(update=values)

    def fast_path(self) -> FastPath:
        return FastPath(precision=self.precision, channels_last=self.channels_last, compile=self.compile,
                        fold_batchnorm=self.fold_batchnorm, pin_memory=bool(self.pin_memory))


class SegmentConfig(Config):
    """A bulk segmentation job: where images are, which model, where results go, and how to run it."""

    what: ClassVar[str] = "segment job"
    kind: ClassVar[str | None] = "segment"

    input: Annotated[str, Field(min_length=1)] = Field(
        description="Image prefix (local, file://, s3://...) or a manifest (.parquet/.csv with image_uri[,label_uri]).")
    output: Annotated[str, Field(min_length=1)] = Field(
        description="Results folder (local or object storage) for Parquet parts and _job.json.")
    model: Annotated[str, Field(min_length=1)] = Field(
        description="Checkpoint path/URI, models:/NAME@ALIAS (registry at $MLFLOW_TRACKING_URI), or ARCH:TORCHVISION_TAG.")
    labels: str | None = Field(None, description="Label prefix, paired with images by relative path and stem: "
                                                  "adds IoU columns.")
    job_id: str | None = Field(None, description="Job id (default: derived from the spec, so re-running resumes).")
    scales: Annotated[tuple[Annotated[float, Field(gt=0)], ...], Field(strict=False, min_length=1)] = Field(
        _INFERENCE.scales, description="Multi-scale inference, e.g. '0.75,1,1.25' (softmax averaged).")
    flip: bool = Field(_INFERENCE.flip, description="Average with the horizontally flipped image.")
    tile_size: Positive = _INFERENCE.tile_size
    tile_threshold: Positive = _INFERENCE.tile_threshold
    max_side: Positive | None = _INFERENCE.max_side
    max_pixels: Positive = Field(DEFAULT_MAX_PIXELS, description="Images with more pixels become error rows "
                                                                 "(decompression bombs).")
    low_confidence: Annotated[float, Field(gt=0, lt=1)] = 0.5
    export_png: bool = Field(False, description="Also write colour masks and overlays as PNG.")
    retry_errors: bool = Field(False, description="Resuming: segment again every image whose row is an error (by "
                                                  "default only those whose error was the infrastructure's).")
    ray_address: str | None = Field(None, description="Ray cluster address (default: $RAY_ADDRESS or an "
                                                       "in-process Ray).")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (default: $AWS_ENDPOINT_URL).")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI that models:/ URIs resolve against "
                                                       "(default: $MLFLOW_TRACKING_URI).")
    resources: ResourceConfig = Field(default_factory=ResourceConfig)

    def resolved_job_id(self) -> str:
        """The given job id, or one derived from what defines the results, so re-running the same job resumes it."""
        if self.job_id:
            return self.job_id
        key = {k: getattr(self, k) for k in ("input", "labels", "model", "scales", "flip", "tile_size", "tile_threshold",
                                                "max_side", "max_pixels", "low_confidence")}
        return "seg-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def inference(self, batch_size: int) -> InferenceOptions:
        """What the model actors compute, with the resolved batch size."""
        return InferenceOptions(scales=self.scales, flip=self.flip, tile_size=self.tile_size,
                                tile_threshold=self.tile_threshold, max_side=self.max_side, batch_size=batch_size)

    def with_resources(self, **fields: Any) -> "SegmentConfig":
        """A copy with these resource fields set (checked like any spec)."""
        return self.replace(resources={**self.resources.to_dict(), **fields})
