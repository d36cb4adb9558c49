"""The per-worker training loop that Ray Train runs (DDP over N workers); nothing here runs on the driver.

Each epoch: the worker's shard of the training stream, poly-decayed SGD, then validation (validate.py) on its
share of the validation pairs at native size; confusion matrices are summed over workers, so every worker
reports the same figures. Rank 0 alone writes the checkpoint and logs to MLflow.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist

from segmill.models.allocator import keep_freed_memory
from segmill.models.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from segmill.models.metrics import SegmentationMetrics
from segmill.models.registry import get_model
from segmill.models.training import sgd_with_poly, train_step
from segmill.models.transfer import freeze_backbone, param_groups, set_backbone_bn_eval
from segmill.pipeline.train.validate import confusion_on_pairs, epoch_metrics

log = logging.getLogger(__name__)
MODEL_FILE, STATE_FILE = "model.pt", "train_state.pt"


def build_model(spec: ModelSpec, backbone_weights: str | None, init_checkpoint: bytes | None) -> torch.nn.Module:
    """The model to train: from a checkpoint's weights, or fresh with optional pretrained backbone weights."""
    kwargs = dict(spec.arch_kwargs)
    if backbone_weights and init_checkpoint is None:
        kwargs["backbone_weights"] = backbone_weights
    model = get_model(spec.arch, num_classes=spec.num_classes, **kwargs)
    if init_checkpoint is not None:
        initial, initial_spec = load_checkpoint(init_checkpoint)
        if tuple(initial_spec.classes) != tuple(spec.classes) or initial_spec.arch != spec.arch:
            raise ValueError(f"The starting model ({initial_spec.arch}, classes {list(initial_spec.classes)}) does not "
                             f"match the job ({spec.arch}, classes {list(spec.classes)}).")
        model.load_state_dict(initial.state_dict())
    return model


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    spec = ModelSpec.from_dict(config["spec"])
    torch.manual_seed(config["seed"])
    if config.get("torch_threads"):
        torch.set_num_threads(config["torch_threads"])
    keep_freed_memory()  # activations and gradients reuse one heap instead of being faulted in every step
    model = build_model(spec, config["backbone_weights"], config["init_checkpoint"])
    pretrained = bool(config["backbone_weights"] or config["init_checkpoint"])
    if config["freeze_backbone"]:
        freeze_backbone(model)
    groups = param_groups(model, config["lr"], config["backbone_lr_mult"] if pretrained else 1.0, config["weight_decay"])
    steps_per_epoch = max(1, config["epoch_images"] // (config["batch_size"] * world))
    optimizer, scheduler = sgd_with_poly(groups, lr=config["lr"], total_steps=steps_per_epoch * config["epochs"],
                                         momentum=config["momentum"], weight_decay=config["weight_decay"])
    start_epoch = _restore(ray.train.get_checkpoint(), model, optimizer, scheduler)

    model = ray.train.torch.prepare_model(model)
    plain = model.module if hasattr(model, "module") else model
    device = ray.train.torch.get_device()
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255
    shard = ray.train.get_dataset_shard("train")
    val_pairs = [tuple(p) for p in config["val_pairs"][rank::world]]
    tracker = _Tracker(config) if rank == 0 else None

    for epoch in range(start_epoch, config["epochs"]):
        started, loss_sum, batches, samples = time.time(), 0.0, 0, 0
        model.train()
        if config["freeze_backbone"]:
            set_backbone_bn_eval(plain)
        for batch in shard.iter_torch_batches(batch_size=config["batch_size"], device=device, drop_last=False):
            images = (batch["image"].permute(0, 3, 1, 2).float() - mean) / std
            value = train_step(model, images, batch["mask"].long(), optimizer, scheduler,
                               ignore_index=spec.ignore_index, ohem_fraction=config["ohem_fraction"])
            loss_sum, batches, samples = loss_sum + value, batches + 1, samples + len(images)
        confusion, val_skipped = confusion_on_pairs(plain, spec, val_pairs, device=device,
                                                    endpoint_url=config["endpoint_url"])
        totals = torch.tensor([loss_sum, batches, samples, val_skipped], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(confusion)
            dist.all_reduce(totals)
        metrics = SegmentationMetrics.from_confusion(confusion)
        loss_sum, batches, samples, val_skipped = totals.tolist()
        figures = {"epoch": epoch, "loss": loss_sum / max(batches, 1), "samples": int(samples),
                   "skipped_train_pairs": max(0, config["epoch_images"] - int(samples)),
                   "skipped_val_pairs": int(val_skipped), "epoch_seconds": time.time() - started,
                   "lr": optimizer.param_groups[-1]["lr"], **epoch_metrics(metrics, spec.classes)}
        reported = {**figures, "confusion": metrics.confusion.tolist()}
        if rank == 0:
            tracker.log(figures, epoch)
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(os.path.join(folder, MODEL_FILE), plain, spec)
                torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                           os.path.join(folder, STATE_FILE))
                ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(reported)


def _restore(checkpoint, model, optimizer, scheduler) -> int:
    """Load the latest reported checkpoint (a replaced worker, or --resume); returns the epoch to start at."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, MODEL_FILE), "rb") as f:
            saved, _ = load_checkpoint(f.read())
        state = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)
    model.load_state_dict(saved.state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resuming after epoch %d from %s", state["epoch"], checkpoint.path)
    return state["epoch"] + 1


class _Tracker:
    """Rank 0's MLflow logging: per-epoch metrics into the run the driver opened."""

    def __init__(self, config: dict[str, Any]):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=config["tracking_uri"])
        self.run_id = config["run_id"]

    def log(self, figures: dict[str, float], epoch: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in figures.items()
                                                    if k != "epoch"])


def load_saved_model(checkpoint_dir: str) -> bytes:
    """The segmill checkpoint bytes (state dict + spec) inside a Ray Train checkpoint folder."""
    with open(os.path.join(checkpoint_dir, MODEL_FILE), "rb") as f:
        return f.read()


