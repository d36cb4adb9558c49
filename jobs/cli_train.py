"""`segmill train`: retraining on Ray Train with hard-class bootstrapping, tracked and registered in MLflow."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    app.command(name="train")(train)


def train(
    images: Optional[str] = typer.Option(None, help="Training image prefix (local, s3://...) or a manifest with label_uri."),
    labels: Optional[str] = typer.Option(None, help="Label prefix, paired with images by relative path and stem."),
    classes: Optional[str] = typer.Option(None, help="Class file (YAML: names, colours, optional ignore_index)."),
    model: Optional[str] = typer.Option(None, help="Architecture (see `segmill models`), default unet."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML train spec; command-line values override it."),
    arch_kwargs: Optional[str] = typer.Option(None, help="Architecture arguments as JSON, e.g. '{\"output_stride\": 16}'."),
    init_from: Optional[str] = typer.Option(None, help="Start from these weights: a checkpoint or models:/NAME@champion."),
    backbone_weights: Optional[str] = typer.Option(None, help="Pretrained backbone: torchvision tag or a state-dict file."),
    freeze_backbone: Optional[bool] = typer.Option(None, "--freeze-backbone/--train-backbone", help="Freeze the backbone."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 10)."),
    batch_size: Optional[int] = typer.Option(None, help="Crops per worker per step (default 8)."),
    crop_size: Optional[int] = typer.Option(None, help="Training crop side in pixels (default 512)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate of new layers (default 0.01; poly decay)."),
    ohem_fraction: Optional[float] = typer.Option(None, help="Only this share of the hardest labelled pixels counts in the loss."),
    val_images: Optional[str] = typer.Option(None, help="Validation images (default: a stable share of --images)."),
    val_labels: Optional[str] = typer.Option(None, help="Validation labels."),
    hard_classes: Optional[str] = typer.Option(None, help="'auto' (the champion's lowest-IoU classes) or NAME,NAME."),
    hard_classes_from: Optional[str] = typer.Option(None, help="With auto: a results table made with labels to rank classes by."),
    bootstrap_factor: Optional[int] = typer.Option(None, help="Images with a hard class appear this many times per epoch."),
    workers: Optional[int] = typer.Option(None, help="Data-parallel training workers (default 1)."),
    gpus: Optional[bool] = typer.Option(None, "--gpus/--no-gpus", help="One GPU per worker (default: if the cluster has GPUs)."),
    cpus_per_worker: Optional[float] = typer.Option(None, help="CPUs per worker (default 1)."),
    register_as: Optional[str] = typer.Option(None, "--register", help="Register the result as a version of this MLflow model."),
    champion_margin: Optional[float] = typer.Option(None, help="mIoU a new version must gain over the champion to replace it."),
    storage_path: Optional[str] = typer.Option(None, "--storage", help="Checkpoints folder (local or s3://), default .segmill/train."),
    run_name: Optional[str] = typer.Option(None, help="Run name (default: model name and time)."),
    resume: Optional[bool] = typer.Option(None, "--resume/--no-resume", help="Continue the latest (or --run-name) stopped run."),
    tracking_uri: Optional[str] = typer.Option(None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else SQLite)."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or an in-process Ray)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: $AWS_ENDPOINT_URL)."),
    seed: Optional[int] = typer.Option(None, help="Seed for initialisation and the epoch order."),
) -> None:
    """Train a model on labelled images with Ray Train; log to MLflow; register a version that must beat the champion."""
    from segmill.jobs.cli import _fail, console
    from segmill.pipeline.train_config import TrainConfig

    try:
        kwargs = json.loads(arch_kwargs) if arch_kwargs else None
    except json.JSONDecodeError:
        _fail(ValueError(f"--arch-kwargs {arch_kwargs!r} is not JSON, e.g. '{{\"depth\": 3}}'."))
    values = dict(images=images, labels=labels, classes=classes, model=model, arch_kwargs=kwargs, init_from=init_from,
                  backbone_weights=backbone_weights, freeze_backbone=freeze_backbone, epochs=epochs,
                  batch_size=batch_size, crop_size=crop_size, lr=lr, ohem_fraction=ohem_fraction, val_images=val_images,
                  val_labels=val_labels, hard_classes=hard_classes, hard_classes_from=hard_classes_from,
                  bootstrap_factor=bootstrap_factor, workers=workers, use_gpu=gpus, cpus_per_worker=cpus_per_worker,
                  register=register_as, champion_margin=champion_margin, storage_path=storage_path, run_name=run_name,
                  resume=resume, tracking_uri=tracking_uri, ray_address=address, endpoint_url=endpoint_url, seed=seed)
    try:
        if config is not None:
            cfg = TrainConfig.from_yaml(str(config), overrides=values)
        else:
            cfg = TrainConfig.from_dict({k: v for k, v in values.items() if v is not None}, source="command line")
    except ValueError as exc:
        _fail(exc)
    from segmill.pipeline.train import train as run_training

    try:
        outcome = run_training(cfg)
    except (ValueError, FileNotFoundError) as exc:
        _fail(exc)
    console.print(f"run {outcome.run_name} (MLflow {outcome.run_id}): val mIoU {outcome.val_miou:.4f}")
    console.print("  per-class IoU: " + ", ".join(f"{k} {v:.3f}" for k, v in outcome.val_iou.items()))
    console.print(f"  hard classes {outcome.hard_classes or '-'}; images per epoch {outcome.bootstrap['epoch_images']} "
                  f"(hard-class share {outcome.bootstrap['hard_share_before']:.2f} -> {outcome.bootstrap['hard_share_after']:.2f})")
    if outcome.model_version:
        role = "champion" if outcome.champion else "challenger"
        console.print(f"  registered {outcome.model_name} version {outcome.model_version} as {role}: {outcome.decision}")
        console.print(f"  use it: segmill segment IMAGES OUTPUT --model models:/{outcome.model_name}@{role}")
