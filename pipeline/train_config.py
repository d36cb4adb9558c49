"""Typed configuration of a retraining job (Ray Train + MLflow), from Python, YAML or the CLI."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from segmill.pipeline.config import read_spec_file, typed_from_dict

AUTO = "auto"


@dataclass(frozen=True)
class TrainConfig:
    """What to learn from, which model, the recipe, bootstrapping, where it runs, and where results go."""

    images: str
    classes: str
    labels: str | None = None  # None: `images` is a manifest with label_uri
    model: str = "unet"
    arch_kwargs: dict = field(default_factory=dict)
    init_from: str | None = None  # start from these weights: a checkpoint or models:/NAME@champion
    backbone_weights: str | None = None  # torchvision tag (IMAGENET1K_V1) or a local state-dict file
    freeze_backbone: bool = False
    backbone_lr_mult: float = 0.1  # pretrained layers learn at lr * this
    # recipe
    epochs: int = 10
    batch_size: int = 8  # per worker
    crop_size: int = 512
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    scale_min: float = 0.5
    scale_max: float = 2.0
    ohem_fraction: float | None = None  # keep only the hardest share of labelled pixels in the loss
    seed: int = 0
    # validation
    val_images: str | None = None
    val_labels: str | None = None
    val_fraction: float = 0.1  # held out from `images` when no val set is given
    # hard-class bootstrapping
    hard_classes: str | None = None  # "auto", or class names separated by commas; None: no bootstrapping
    hard_class_count: int = 2  # how many classes "auto" picks
    hard_classes_from: str | None = None  # results table made with labels; default: the champion's evaluation
    bootstrap_factor: int = 2  # images with a hard class appear this many times per epoch
    # compute
    workers: int = 1
    use_gpu: bool | None = None  # None: GPUs if the cluster has them
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker crashes tolerated; training resumes from the last checkpoint
    ray_address: str | None = None
    endpoint_url: str | None = None
    # tracking and results
    storage_path: str = field(default_factory=lambda: os.path.abspath(".segmill/train"))
    run_name: str | None = None
    resume: bool = False
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else SQLite beside storage_path
    experiment: str = "segmill-train"
    register: str | None = None
    champion_margin: float = 0.0  # a challenger becomes champion only when its mIoU beats by more than this
    overlays: int = 4

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"Train job {message}.")

        need(bool(self.images) and bool(self.classes), "needs non-empty 'images' and 'classes'")
        for name in ("epochs", "batch_size", "crop_size", "workers", "bootstrap_factor", "overlays"):
            need(getattr(self, name) >= (0 if name == "overlays" else 1), f"{name} must be 1 or more, not {getattr(self, name)}")
        need(self.hard_class_count >= 1, f"hard_class_count must be 1 or more, not {self.hard_class_count}")
        need(self.lr > 0 and self.cpus_per_worker > 0, "lr and cpus_per_worker must be positive")
        need(0 < self.scale_min <= self.scale_max, f"scale range {self.scale_min}-{self.scale_max} must be positive and ordered")
        need(self.ohem_fraction is None or 0 < self.ohem_fraction <= 1, f"ohem_fraction {self.ohem_fraction} must lie in (0, 1]")
        need(0 < self.val_fraction < 1, f"val_fraction {self.val_fraction} must lie between 0 and 1")
        need(self.val_labels is None or self.val_images is not None, "has val_labels but no val_images")
        need(self.max_failures >= 0 and self.champion_margin >= 0, "max_failures and champion_margin must not be negative")
        need(self.hard_classes is None or self.hard_classes.strip() != "", "hard_classes must be 'auto' or class names")

    def named_hard_classes(self) -> list[str] | None:
        """The hard classes given by name, or None for 'auto' or no bootstrapping."""
        if self.hard_classes is None or self.hard_classes.strip() == AUTO:
            return None
        return [name.strip() for name in self.hard_classes.split(",") if name.strip()]

    def resolved_tracking_uri(self) -> str:
        if self.tracking_uri:
            return self.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        if "://" in self.storage_path and not self.storage_path.startswith("file://"):
            raise ValueError("Train job needs tracking_uri (or $MLFLOW_TRACKING_URI) when storage_path is remote.")
        root = os.path.dirname(os.path.abspath(self.storage_path.removeprefix("file://")))
        return f"sqlite:///{os.path.join(root, 'mlflow.db')}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "train job spec") -> "TrainConfig":
        data = dict(data)
        if isinstance(data.get("hard_classes"), list):  # YAML lists of names read naturally
            data["hard_classes"] = ",".join(str(name) for name in data["hard_classes"])
        return typed_from_dict(cls, data, source)

    @classmethod
    def from_yaml(cls, path: str, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        data = read_spec_file(path)
        data.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(data, source=f"train job spec {path}")
