"""Typed configuration of a retraining job (Ray Train + MLflow), from Python, YAML or the CLI."""
from __future__ import annotations

import os
import warnings
from typing import Annotated, Any, ClassVar

from pydantic import Field, field_validator, model_validator

from segmill.models.options import OPTIMIZERS
from segmill.pipeline.common import settings
from segmill.pipeline.common.config import Config
from segmill.pipeline.train.sampling import CLASS_WEIGHTINGS, SAMPLINGS

AUTO = "auto"
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
# Architecture arguments the default recipe uses when none are given: sizes that train well from scratch on a CPU
# within the default epochs (docs/retraining.md has the measurements).
RECIPE_ARCH_KWARGS: dict[str, dict[str, Any]] = {"unet": {"base_channels": 16, "depth": 4}}
Positive = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]
Share = Annotated[float, Field(gt=0, lt=1)]


# `register` is the spec's key for the model name; pydantic warns that it shadows ABCMeta.register, which no
# config uses.
warnings.filterwarnings("ignore", message='Field name "register" in "TrainConfig" shadows')


class TrainConfig(Config):
    """What to learn from, which model, the recipe, hard classes, where it runs, and where results go."""

    what: ClassVar[str] = "train job"
    kind: ClassVar[str | None] = "train"

    images: Annotated[str, Field(min_length=1)] = Field(
        description="Training image prefix (local, s3://...) or a manifest with label_uri.")
    classes: Annotated[str, Field(min_length=1)] = Field(
        description="Class file (YAML: names, colours, optional ignore_index).")
    labels: str | None = Field(None, description="Label prefix, paired with images by relative path and stem "
                                                  "(none: images is a manifest with label_uri).")
    model: str = Field("unet", description="Architecture (see `segmill models`).")
    arch_kwargs: dict[str, Any] | None = Field(
        None, description="Architecture arguments as JSON, e.g. '{\"output_stride\": 16}' (default: the recipe's "
                          "for the model, e.g. a U-Net of base 16 and depth 4).")
    init_from: str | None = Field(None, description="Start from these weights: a checkpoint or models:/NAME@champion.")
    backbone_weights: str | None = Field(None, description="Pretrained backbone: torchvision tag or a state-dict "
                                                           "file.")
    freeze_backbone: bool = Field(False, description="Freeze the backbone.")
    backbone_lr_mult: Annotated[float, Field(ge=0)] = 0.1  # pretrained layers learn at lr * this
    # recipe
    epochs: Positive = Field(10, description="Epochs.")
    batch_size: Positive = Field(8, description="Crops per worker per step.")
    crop_size: Positive = Field(256, description="Training crop side in pixels.")
    optimizer: str = Field("adamw", description=f"Optimiser: one of {', '.join(OPTIMIZERS)} (poly decay either way).")
    lr: PositiveFloat = Field(0.002, description="Learning rate of new layers (poly decay).")
    momentum: Annotated[float, Field(ge=0, lt=1)] = Field(0.9, description="SGD momentum (AdamW: beta1).")
    # The recipe's defaults (AdamW at 2e-3, 256-pixel crops at scales 0.75-1.5, bf16 where native, a U-Net of base
    # 16) were chosen by runs on CamVid: docs/retraining.md has them.
    weight_decay: Annotated[float, Field(ge=0)] = Field(1e-4, description="Weight decay.")
    scale_min: PositiveFloat = Field(0.75, description="Smallest random scale of a training image.")
    scale_max: PositiveFloat = Field(1.5, description="Largest random scale of a training image.")
    precision: str = Field("auto", description="Autocast precision of the forward pass: auto (bf16 where the "
                                               "hardware computes it natively), fp32 or bf16.")
    channels_last: bool = Field(True, description="Train in the channels-last memory format.")
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.0, description="Validate, keep and register an exponential moving average of the weights and batch-norm "
                         "statistics with this decay (warmed up over the first steps); 0: the trained weights.")
    ohem_fraction: Annotated[float, Field(gt=0, le=1)] | None = Field(
        None, description="Only this share of the hardest labelled pixels counts in the loss.")
    # Inverse-sqrt weights by default: on CamVid they took the recipe from 0.382 to 0.417 mIoU over two seeds and
    # taught three of the four thin classes (docs/retraining.md); "none" is the plain cross-entropy.
    class_weighting: str = Field("inverse_sqrt_frequency",
                                 description=f"Loss weight per class: one of {', '.join(CLASS_WEIGHTINGS)}, from the "
                                             "class index's pixel counts.")
    seed: int = Field(0, description="Seed of the model's initial weights (the data order and augmentation are "
                                     "not seeded).")
    # validation
    val_images: str | None = Field(None, description="Validation images (default: a stable share of --images).")
    val_labels: str | None = Field(None, description="Validation labels.")
    val_fraction: Share = 0.1  # held out from `images` when no val set is given
    val_every: Positive = Field(1, description="Validate every this many epochs (and always after the last).")
    # hard classes
    hard_classes: Annotated[str, Field(min_length=1)] | None = Field(
        None, description="'auto' (the champion's lowest-IoU classes) or NAME,NAME.")
    hard_class_count: Positive = Field(2, description="How many classes 'auto' picks.")
    hard_classes_from: str | None = Field(None, description="With auto: a results table made with labels to rank "
                                                            "classes by.")
    sampling: str = Field("presence", description="How hard classes choose an epoch's images: presence (each image "
                                                  "with one bootstrap_factor times), pixel_mass (extra images drawn "
                                                  "by their hard-class pixels) or none.")
    sampling_temperature: PositiveFloat = Field(0.01, description="pixel_mass and hard crops: lower draws the rarest "
                                                                   "hard class more.")
    bootstrap_factor: Positive = Field(2, description="Epoch length with hard classes: images holding one count "
                                                      "this many times.")
    hard_crop_share: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0, description="Share of training crops placed on a pixel of a hard class.")
    # compute
    workers: Positive = Field(1, description="Data-parallel training workers.")
    use_gpu: bool | None = Field(None, description="One GPU per worker (default: if the cluster has GPUs).")
    cpus_per_worker: PositiveFloat | None = Field(None, description="CPUs each worker reserves (default: half its "
                                                                     "torch threads, so decoding has the rest).")
    torch_threads: Positive | None = Field(None, description="Torch threads per worker (default: the cluster's CPUs "
                                                              "per worker, at most 4).")
    decode_cpus: PositiveFloat = Field(0.5, description="CPUs each decode-and-augment task reserves.")
    placement_strategy: str = Field("PACK", description="Where Ray places the workers: PACK, SPREAD or "
                                                        "STRICT_SPREAD (one per node).")
    max_failures: Annotated[int, Field(ge=0)] = 2  # worker crashes tolerated; training resumes from a checkpoint
    ray_address: str | None = Field(None, description="Ray cluster address (default: $RAY_ADDRESS or an "
                                                       "in-process Ray).")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (default: $AWS_ENDPOINT_URL).")
    # tracking and results
    storage_path: str = Field(default_factory=lambda: os.path.abspath(".segmill/train"),
                              description="Checkpoints folder (local or s3://).")
    run_name: str | None = Field(None, description="Run name (default: model name and time).")
    resume: bool = Field(False, description="Continue the latest (or --run-name) stopped run.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                                                       "SQLite beside the storage folder).")
    experiment: str = "segmill-train"
    register: str | None = Field(None, description="Register the result as a version of this MLflow model.")
    champion_margin: Annotated[float, Field(ge=0)] = Field(
        0.005, description="mIoU the lower end of the gain's 95% interval (a paired bootstrap over the validation "
                           "images) must exceed for a new version to replace the champion.")
    max_class_drop: Annotated[float, Field(ge=0, le=1)] = Field(
        0.05, description="Most IoU any one class may lose against the champion for the new version to replace it.")
    overlays: Annotated[int, Field(ge=0)] = 4

    @field_validator("hard_classes", mode="before")
    @classmethod
    def _names_from_a_list(cls, value: Any) -> Any:
        """A YAML list of names reads naturally; it means the same as names separated by commas."""
        return ",".join(str(name) for name in value) if isinstance(value, list) else value

    @field_validator("optimizer", "precision", "sampling", "class_weighting", "placement_strategy")
    @classmethod
    def _one_of(cls, value: str, info) -> str:
        choices = {"optimizer": OPTIMIZERS, "precision": TRAIN_PRECISIONS, "sampling": SAMPLINGS,
                   "class_weighting": CLASS_WEIGHTINGS,
                   "placement_strategy": ("PACK", "SPREAD", "STRICT_SPREAD")}[info.field_name]
        if value not in choices:
            raise ValueError(f"Train job {info.field_name} {value!r} must be one of {list(choices)}.")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.scale_min > self.scale_max:
            raise ValueError(f"Train job scale range {self.scale_min}-{self.scale_max} must be ordered.")
        if self.val_labels is not None and self.val_images is None:
            raise ValueError("Train job has val_labels but no val_images.")
        if self.hard_classes is not None and not self.hard_classes.strip():
            raise ValueError("Train job hard_classes must be 'auto' or class names.")
        return self

    def model_arguments(self) -> dict[str, Any]:
        """The architecture's arguments: as given, else the recipe's for this model."""
        return dict(self.arch_kwargs if self.arch_kwargs is not None else RECIPE_ARCH_KWARGS.get(self.model, {}))

    def named_hard_classes(self) -> list[str] | None:
        """The hard classes given by name, or None for 'auto' or no hard classes."""
        if self.hard_classes is None or self.hard_classes.strip() == AUTO:
            return None
        return [name.strip() for name in self.hard_classes.split(",") if name.strip()]

    def resolved_tracking_uri(self) -> str:
        found = settings.tracking_uri(self.tracking_uri)
        if found:
            return found
        if "://" in self.storage_path and not self.storage_path.startswith("file://"):
            raise ValueError("Train job needs tracking_uri (or $MLFLOW_TRACKING_URI) when storage_path is remote.")
        root = os.path.dirname(os.path.abspath(self.storage_path.removeprefix("file://")))
        return f"sqlite:///{os.path.join(root, 'mlflow.db')}"
