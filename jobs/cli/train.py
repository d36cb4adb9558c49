"""`segmill train`: retraining on Ray Train with hard classes, tracked and registered in MLflow."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from segmill.jobs.cli.common import DASHBOARD_HELP, console, dashboard, given, user_errors
from segmill.pipeline.common.config import describe
from segmill.pipeline.train.config import TrainConfig


def _help(name: str) -> str:
    return describe(TrainConfig, name)


def train(
    images: Optional[str] = typer.Option(None, help=_help("images")),
    labels: Optional[str] = typer.Option(None, help=_help("labels")),
    classes: Optional[str] = typer.Option(None, help=_help("classes")),
    model: Optional[str] = typer.Option(None, help=_help("model")),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML job spec (kind: train, keys as these options); "
                                          "options override it."),
    arch_kwargs: Optional[str] = typer.Option(None, help=_help("arch_kwargs")),
    init_from: Optional[str] = typer.Option(None, help=_help("init_from")),
    backbone_weights: Optional[str] = typer.Option(None, help=_help("backbone_weights")),
    freeze_backbone: Optional[bool] = typer.Option(None, "--freeze-backbone/--no-freeze-backbone",
                                                   help=_help("freeze_backbone")),
    epochs: Optional[int] = typer.Option(None, help=_help("epochs")),
    batch_size: Optional[int] = typer.Option(None, help=_help("batch_size")),
    crop_size: Optional[int] = typer.Option(None, help=_help("crop_size")),
    optimizer: Optional[str] = typer.Option(None, help=_help("optimizer")),
    lr: Optional[float] = typer.Option(None, help=_help("lr")),
    scale_min: Optional[float] = typer.Option(None, help=_help("scale_min")),
    scale_max: Optional[float] = typer.Option(None, help=_help("scale_max")),
    precision: Optional[str] = typer.Option(None, help=_help("precision")),
    ohem_fraction: Optional[float] = typer.Option(None, help=_help("ohem_fraction")),
    ema_decay: Optional[float] = typer.Option(None, help=_help("ema_decay")),
    class_weighting: Optional[str] = typer.Option(None, help=_help("class_weighting")),
    val_images: Optional[str] = typer.Option(None, help=_help("val_images")),
    val_labels: Optional[str] = typer.Option(None, help=_help("val_labels")),
    val_every: Optional[int] = typer.Option(None, help=_help("val_every")),
    hard_classes: Optional[str] = typer.Option(None, help=_help("hard_classes")),
    hard_class_count: Optional[int] = typer.Option(None, help=_help("hard_class_count")),
    hard_classes_from: Optional[str] = typer.Option(None, help=_help("hard_classes_from")),
    sampling: Optional[str] = typer.Option(None, help=_help("sampling")),
    sampling_temperature: Optional[float] = typer.Option(None, help=_help("sampling_temperature")),
    bootstrap_factor: Optional[int] = typer.Option(None, help=_help("bootstrap_factor")),
    hard_crop_share: Optional[float] = typer.Option(None, help=_help("hard_crop_share")),
    workers: Optional[int] = typer.Option(None, help=_help("workers")),
    gpus: Optional[bool] = typer.Option(None, "--use-gpu/--no-use-gpu", "--gpus/--no-gpus", help=_help("use_gpu")),
    cpus_per_worker: Optional[float] = typer.Option(None, help=_help("cpus_per_worker")),
    torch_threads: Optional[int] = typer.Option(None, help=_help("torch_threads")),
    placement_strategy: Optional[str] = typer.Option(None, help=_help("placement_strategy")),
    register_as: Optional[str] = typer.Option(None, "--register", help=_help("register")),
    champion_margin: Optional[float] = typer.Option(None, help=_help("champion_margin")),
    storage_path: Optional[str] = typer.Option(None, "--storage-path", "--storage", help=_help("storage_path")),
    run_name: Optional[str] = typer.Option(None, help=_help("run_name")),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help=_help("resume")),
    tracking_uri: Optional[str] = typer.Option(None, help=_help("tracking_uri")),
    address: Optional[str] = typer.Option(None, "--ray-address", "--address", help=_help("ray_address")),
    endpoint_url: Optional[str] = typer.Option(None, help=_help("endpoint_url")),
    seed: Optional[int] = typer.Option(None, help=_help("seed")),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, only the summary."),
    show_dashboard: bool = typer.Option(False, "--dashboard", help=DASHBOARD_HELP),
) -> None:
    """Train a model on labelled images with Ray Train; log to MLflow; register a version that must beat the champion."""
    dashboard(show_dashboard)
    with user_errors():
        try:
            kwargs = json.loads(arch_kwargs) if arch_kwargs else None
        except json.JSONDecodeError:
            raise ValueError(f"--arch-kwargs {arch_kwargs!r} is not JSON, e.g. '{{\"depth\": 3}}'.") from None
        values = given(images=images, labels=labels, classes=classes, model=model, arch_kwargs=kwargs,
                       init_from=init_from, backbone_weights=backbone_weights, freeze_backbone=freeze_backbone,
                       epochs=epochs, batch_size=batch_size, crop_size=crop_size, optimizer=optimizer, lr=lr,
                       scale_min=scale_min, scale_max=scale_max, precision=precision, ohem_fraction=ohem_fraction,
                       ema_decay=ema_decay,
                       class_weighting=class_weighting, val_images=val_images, val_labels=val_labels,
                       val_every=val_every,
                       hard_classes=hard_classes, hard_class_count=hard_class_count,
                       hard_classes_from=hard_classes_from, sampling=sampling,
                       sampling_temperature=sampling_temperature, bootstrap_factor=bootstrap_factor,
                       hard_crop_share=hard_crop_share, workers=workers, use_gpu=gpus,
                       cpus_per_worker=cpus_per_worker, torch_threads=torch_threads,
                       placement_strategy=placement_strategy, register=register_as,
                       champion_margin=champion_margin, storage_path=storage_path, run_name=run_name, resume=resume,
                       tracking_uri=tracking_uri, ray_address=address, endpoint_url=endpoint_url, seed=seed)
        cfg = TrainConfig.from_yaml(str(config), values) if config else TrainConfig.from_dict(values, "command line")
        from segmill.jobs.progress import ProgressView, training
        from segmill.pipeline.train.driver import (
            train as run_training,  # Ray Train is heavy to import
        )

        with ProgressView(console, training, title="train", quiet=quiet) as view:
            outcome = run_training(cfg, progress=view)
    plan = outcome.bootstrap
    console.print(f"run {outcome.run_name} (MLflow {outcome.run_id}): val mIoU {outcome.val_miou:.4f} "
                  f"(best epoch, {outcome.best_epoch})")
    console.print("  per-class IoU: " + ", ".join(f"{k} {v:.3f}" for k, v in outcome.val_iou.items()))
    console.print(f"  hard classes {outcome.hard_classes or '-'}; sampling {plan['sampling']}, images per epoch "
                  f"{plan['epoch_images']} (hard-class share {plan['hard_share_before']:.2f} -> "
                  f"{plan['hard_share_after']:.2f}), hard-class crops planned {plan['hard_crops_planned']:.2f}")
    if not outcome.model_version:
        console.print(f"  model (best epoch): {outcome.checkpoint_uri} (a Ray Train checkpoint; --register NAME "
                      "makes it a model version)")
    if outcome.model_version:
        role = "champion" if outcome.champion else "challenger"
        console.print(f"  registered {outcome.model_name} version {outcome.model_version} as {role}: {outcome.decision}")
        console.print(f"  use it: segmill segment IMAGES OUTPUT --model models:/{outcome.model_name}@{role}")
