"""Typed configuration of a bulk segmentation job, from Python, YAML or the CLI."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from segmill.models.options import PRECISIONS

CPU_THREADS_PER_ACTOR = 4  # intra-op threads scale well up to about 4 on conv nets; more actors beyond that
DEFAULT_MAX_PIXELS = 100_000_000  # ~10k x 10k; larger images are usually decompression bombs or need tiling offline
# Object-store memory the job's queued blocks may fill, per model actor. Ray Data's own limit (half the store)
# let decoding (2,700 img/s) run ever further ahead of the model (160 img/s), so the peak grew with job length.
QUEUE_MB_PER_CPU_ACTOR = 256
QUEUE_MB_PER_GPU_ACTOR = 2048  # a faster consumer needs a deeper queue; not yet measured on a GPU


@dataclass(frozen=True)
class ResourceConfig:
    """How the job uses the cluster; None means 'derive from the cluster's resources' (see `resolve`)."""

    batch_size: int | None = None
    actors_min: int | None = None
    actors_max: int | None = None
    gpus_per_actor: float | None = None
    cpus_per_actor: float | None = None
    torch_threads: int | None = None
    decode_cpus: float = 0.5
    decode_batch_size: int = 16
    rows_per_file: int = 1000
    row_group_rows: int = 100
    # The model's fast path (see models/predict.py). Channels-last and folded BatchNorm change only the order of
    # fp32 sums: masks were identical on the test images and 99.998% of pixels on the benchmark's; bf16/fp16
    # autocast agrees with fp32 on a measured share of pixels (README "Throughput", tests/pipeline/test_fastpath.py).
    precision: str = "fp32"
    channels_last: bool = True
    compile: bool = False
    fold_batchnorm: bool = True  # BatchNorm folded into the conv before it (models/fold.py): 1.14-1.25x on CPU
    keep_host_memory: bool = True  # freed tensor memory stays in the actor for the next batch (models/allocator.py)
    pin_memory: bool | None = None
    gpu_jpeg_decode: bool = False
    queue_memory_mb: int | None = None  # object-store cap for queued blocks; None: per model actor, as above
    # Object store of the local cluster the job starts (ignored when joining one); None: twice the queue, at least
    # 512 MB (pipeline/ray_runtime.py says why).
    object_store_mb: int | None = None

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"Resource precision {self.precision!r} must be one of {list(PRECISIONS)}.")
        if self.queue_memory_mb is not None and self.queue_memory_mb <= 0:
            raise ValueError(f"Resource queue_memory_mb {self.queue_memory_mb} must be a positive number of MB.")
        if self.object_store_mb is not None and self.object_store_mb < 100:
            raise ValueError(f"Resource object_store_mb {self.object_store_mb} must be at least 100 MB.")

    def resolve(self, cluster: dict[str, float]) -> "ResourceConfig":
        """Fill the unset numbers from the cluster: one actor per GPU; on CPU, actors of up to 4 torch threads
        that reserve half as many CPUs, leaving the rest to read, decode and encode.

        On 2 cores, one 2-thread actor ran DeepLabv3-MobileNetV3 1.5x faster than two half-CPU single-thread actors
        (README "Throughput"). Host memory is pinned (for asynchronous copies) only where there is a GPU.
        """
        gpus, cpus = int(cluster.get("GPU", 0)), max(1, int(cluster.get("CPU", 1)))
        if self.gpus_per_actor or (self.gpus_per_actor is None and gpus):
            per_actor = self.gpus_per_actor or 1.0
            defaults = dict(batch_size=16, actors_max=max(1, int(gpus / per_actor)), gpus_per_actor=per_actor,
                            cpus_per_actor=1.0, torch_threads=1)
        else:
            threads = min(CPU_THREADS_PER_ACTOR, cpus)
            defaults = dict(batch_size=4, actors_max=max(1, cpus // threads), gpus_per_actor=0.0,
                            cpus_per_actor=threads / 2, torch_threads=threads)
        values = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in defaults.items()}
        values["pin_memory"] = bool(gpus) if self.pin_memory is None else self.pin_memory
        values["actors_min"] = self.actors_min or 1
        values["actors_max"] = max(values["actors_max"], values["actors_min"])
        per_actor = QUEUE_MB_PER_GPU_ACTOR if values["gpus_per_actor"] else QUEUE_MB_PER_CPU_ACTOR
        values["queue_memory_mb"] = self.queue_memory_mb or per_actor * values["actors_max"]
        return dataclasses.replace(self, **values)


@dataclass(frozen=True)
class SegmentConfig:
    """A bulk segmentation job: where images are, which model, where results go, and how to run it."""

    input: str
    output: str
    model: str
    labels: str | None = None
    job_id: str | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    tile_size: int = 512
    tile_threshold: int = 2048 * 2048
    max_side: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    low_confidence: float = 0.5
    export_png: bool = False
    ray_address: str | None = None
    endpoint_url: str | None = None
    resources: ResourceConfig = field(default_factory=ResourceConfig)

    def __post_init__(self) -> None:
        for name in ("input", "output", "model"):
            if not getattr(self, name):
                raise ValueError(f"Segment job needs a non-empty {name!r}.")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"Segment job scales {self.scales} must be positive numbers.")
        if not 0 < self.low_confidence < 1:
            raise ValueError(f"Segment job low_confidence {self.low_confidence} must lie between 0 and 1.")

    def resolved_job_id(self) -> str:
        """The given job id, or one derived from what defines the results, so re-running the same job resumes it."""
        if self.job_id:
            return self.job_id
        key = {k: getattr(self, k) for k in ("input", "labels", "model", "scales", "flip", "tile_size", "tile_threshold",
                                                "max_side", "max_pixels", "low_confidence")}
        return "seg-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "job spec") -> "SegmentConfig":
        data = dict(data)
        resources = data.pop("resources", None)
        resources = typed_from_dict(ResourceConfig, {} if resources is None else resources, f"{source} resources")
        return typed_from_dict(cls, {**data, "resources": resources}, source)

    @classmethod
    def from_yaml(cls, path: str, overrides: dict[str, Any] | None = None) -> "SegmentConfig":
        data = read_spec_file(path)
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(data, source=f"job spec {path}")


def read_spec_file(path: str) -> dict[str, Any]:
    """A YAML job spec as a dict, with a one-sentence error for a missing file, bad YAML or a non-mapping."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ValueError(f"Job spec {path} cannot be read ({exc.strerror or exc}).") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"Job spec {path} is not valid YAML ({exc.__class__.__name__}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"Job spec {path} must be a mapping of keys to values.")
    return data


def typed_from_dict(cls: type, data: dict[str, Any], source: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and values of the wrong type, one sentence each."""
    if not isinstance(data, dict):
        raise ValueError(f"The {source} must be a mapping of keys to values, not {data!r}.")
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(f"The {source} has unknown key(s) {unknown}; known keys are {sorted(hints)}.")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"The {source} lacks the required key(s) {missing}.")
    values = {}
    for name, value in data.items():
        values[name] = _coerce(value, hints[name], f"{source} key {name!r}")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a simple type hint (scalars, optional scalars, tuple of floats, dict)."""
    if value is None or isinstance(value, ResourceConfig):
        return value
    options = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) in (Union, UnionType) else [hint]
    kind = options[0]
    if kind is dict or get_origin(kind) is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"The {where} must be a mapping of names to values, not {value!r}.")
        return dict(value)
    if get_origin(kind) is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            raise ValueError(f"The {where} must be a list of numbers, not {value!r}.")
        return tuple(float(v) for v in items)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ValueError(f"The {where} must be of type {kind.__name__}, not {value!r}.")
    return value
