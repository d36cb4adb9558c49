"""The per-worker training loop that Ray Train runs (DDP over N workers); nothing here runs on the driver.

Each epoch: the epoch's plan (sampling.py, drawn from the seed and the epoch), this worker's equal share of it
streamed as a Ray Data dataset decoded and augmented in Ray tasks, poly-decayed steps, then validation
(validate.py) on this worker's share of the validation pairs at native size; confusion matrices and counts are
summed over workers, so every worker reports the same figures. Rank 0 alone writes the checkpoint, which holds the
latest state (to resume) and the best validated weights (what gets registered), and logs to MLflow.
"""
from __future__ import annotations

import io
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from segmill.models.allocator import keep_freed_memory
from segmill.models.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from segmill.models.metrics import SegmentationMetrics
from segmill.models.registry import get_model
from segmill.models.training import autocast_dtype, optimizer_with_poly, train_step
from segmill.models.transfer import freeze_backbone, param_groups, set_backbone_bn_eval
from segmill.pipeline.common import progress
from segmill.pipeline.train.data import epoch_dataset
from segmill.pipeline.train.sampling import class_stats, epoch_plan
from segmill.pipeline.train.validate import confusion_on_pairs, epoch_metrics

log = logging.getLogger(__name__)
MODEL_FILE, BEST_FILE, STATE_FILE, EMA_FILE = "model.pt", "best_model.pt", "train_state.pt", "ema_state.pt"


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs, decided by the driver (driver.py)."""

    spec: dict[str, Any]
    index: Any  # the class index (pa.Table), or a Ray object reference to it
    hard_ids: list[int]
    sampling: str
    bootstrap_factor: int
    hard_crop_share: float
    sampling_temperature: float
    class_weights: list[float] | None
    seed: int
    epochs: int
    batch_size: int
    crop_size: int
    scale_range: tuple[float, float]
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float
    backbone_lr_mult: float
    ohem_fraction: float | None
    precision: str
    channels_last: bool
    torch_threads: int
    decode_cpus: float
    val_pairs: list[tuple[str, str]]
    val_every: int
    tracking_uri: str
    run_id: str
    endpoint_url: str | None = None
    backbone_weights: str | None = None
    init_checkpoint: bytes | None = None
    freeze_backbone: bool = False
    ema_decay: float = 0.0  # 0: validate and keep the trained weights themselves
    progress: Any = None  # a progress counter's actor handle (common/progress.py), fed by rank 0


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


def steps_per_epoch(epoch_images: int, batch_size: int, world: int) -> int:
    """Steps every worker takes per epoch: its equal share of the plan in batches, the last one partial."""
    return max(1, math.ceil((epoch_images // world) / batch_size))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    loop: LoopConfig = config["loop"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    spec = ModelSpec.from_dict(loop.spec)
    torch.manual_seed(loop.seed)
    torch.set_num_threads(loop.torch_threads)
    keep_freed_memory()  # activations and gradients reuse one heap instead of being faulted in every step
    index = ray.get(loop.index) if isinstance(loop.index, ray.ObjectRef) else loop.index
    stats = class_stats(index, spec.num_classes)
    plan_of = lambda epoch: epoch_plan(stats, loop.hard_ids, sampling=loop.sampling,  # noqa: E731
                                       factor=loop.bootstrap_factor, hard_crop_share=loop.hard_crop_share,
                                       temperature=loop.sampling_temperature, seed=loop.seed, epoch=epoch)
    steps = steps_per_epoch(len(plan_of(0).rows), loop.batch_size, world)

    model = build_model(spec, loop.backbone_weights, loop.init_checkpoint)
    pretrained = bool(loop.backbone_weights or loop.init_checkpoint)
    if loop.freeze_backbone:
        freeze_backbone(model)
    groups = param_groups(model, loop.lr, loop.backbone_lr_mult if pretrained else 1.0, loop.weight_decay)
    optimizer, scheduler = optimizer_with_poly(groups, lr=loop.lr, total_steps=steps * loop.epochs,
                                               optimizer=loop.optimizer, momentum=loop.momentum,
                                               weight_decay=loop.weight_decay)
    best = _Best()
    memory_format = torch.channels_last if loop.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    ema = _ema(model, loop.ema_decay)
    start_epoch = _restore(ray.train.get_checkpoint(), model, optimizer, scheduler, best, ema)

    model = ray.train.torch.prepare_model(model)
    plain = model.module if hasattr(model, "module") else model
    if ema is not None:
        ema.to(next(plain.parameters()).device)
    scored = plain if ema is None else ema.module  # what is validated, kept as best and saved
    device = ray.train.torch.get_device()
    dtype = autocast_dtype(loop.precision, device)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255
    weights = torch.tensor(loop.class_weights, dtype=torch.float32, device=device) if loop.class_weights else None
    hard = torch.tensor(loop.hard_ids, dtype=torch.long, device=device)
    val_pairs = [tuple(p) for p in loop.val_pairs[rank::world]]
    tracker = _Tracker(loop) if rank == 0 else None
    counter = loop.progress if rank == 0 else None
    # Values, not counts: a replaced worker or a resume restarts from its checkpoint's step without double counting.
    progress.add(counter, {}, {"step": start_epoch * steps, "epoch": start_epoch, "epochs": loop.epochs,
                               "first_step": start_epoch * steps, "first_step_at": time.time()})

    for epoch in range(start_epoch, loop.epochs):
        started = time.time()
        plan = plan_of(epoch).table(index)
        share = plan.num_rows // world  # equal shares: every worker takes the same number of steps
        mine = plan.slice(rank * share, share)
        seen = _Seen(spec.num_classes, device)
        model.train()
        if loop.freeze_backbone:
            set_backbone_bn_eval(plain)
        dataset = epoch_dataset(mine, num_classes=spec.num_classes, ignore_index=spec.ignore_index,
                                crop=loop.crop_size, scale_range=loop.scale_range, endpoint_url=loop.endpoint_url,
                                decode_cpus=loop.decode_cpus)
        for batch in dataset.iter_torch_batches(batch_size=loop.batch_size, device=device, drop_last=False):
            images = ((batch["image"].permute(0, 3, 1, 2).float() - mean) / std).contiguous(memory_format=memory_format)
            masks = batch["mask"].long()
            value = train_step(model, images, masks, optimizer, scheduler, ignore_index=spec.ignore_index,
                               ohem_fraction=loop.ohem_fraction, class_weights=weights, autocast_dtype=dtype)
            if ema is not None:
                ema.update_parameters(plain)
            seen.add(value, masks, batch["valid"], hard, spec.ignore_index)
            progress.add(counter, {}, {
                "step": epoch * steps + seen.batches, "epoch": epoch, "loss": value, "lr": optimizer.param_groups[-1]["lr"],
                "samples_per_second": seen.batches * loop.batch_size * world / max(time.time() - started, 1e-9)})
        train_seconds = time.time() - started
        if (epoch + 1) % loop.val_every and epoch + 1 < loop.epochs:
            _report_unvalidated(seen, spec, epoch, train_seconds, optimizer, best, tracker, world)
            continue
        confusion, val_skipped = confusion_on_pairs(scored, spec, val_pairs, device=device,
                                                    endpoint_url=loop.endpoint_url)
        totals = seen.totals(val_skipped)
        if world > 1:
            dist.all_reduce(confusion)
            dist.all_reduce(totals)
        if not totals[4]:  # no valid crop in the whole epoch, on any worker
            raise ValueError(f"No training pair of epoch {epoch} could be decoded; see the skipped pairs in the log.")
        metrics = SegmentationMetrics.from_confusion(confusion)
        figures = {"epoch": epoch, **seen.figures(totals, spec.classes, train_seconds),
                   "epoch_seconds": time.time() - started, "lr": optimizer.param_groups[-1]["lr"],
                   **epoch_metrics(metrics, spec.classes)}
        improved = best.update(figures, metrics, scored, spec, epoch) if rank == 0 else False
        progress.add(counter, {}, {"val_miou": figures["val_miou"], "val_epoch": epoch})
        reported = {**figures, "confusion": metrics.confusion.tolist(), "best": best.summary()}
        if rank == 0:
            tracker.log({**figures, "best_val_miou": best.miou}, epoch)
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(os.path.join(folder, MODEL_FILE), plain, spec)
                with open(os.path.join(folder, BEST_FILE), "wb") as f:
                    f.write(best.weights)
                if ema is not None:
                    torch.save(ema.state_dict(), os.path.join(folder, EMA_FILE))
                torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "best": best.summary(), "improved": improved}, os.path.join(folder, STATE_FILE))
                ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(reported)


def _report_unvalidated(seen, spec, epoch, seconds, optimizer, best, tracker, world) -> None:
    """An epoch without validation: its training figures, and no checkpoint (a resume repeats it)."""
    import ray.train

    totals = seen.totals(0)
    if world > 1:
        dist.all_reduce(totals)
    figures = {"epoch": epoch, **seen.figures(totals, spec.classes, seconds), "lr": optimizer.param_groups[-1]["lr"]}
    if tracker is not None:
        tracker.log(figures, epoch)
    ray.train.report({**figures, "best": best.summary()})


class _Seen:
    """What one worker's epoch saw: loss, crops (valid ones, those holding a hard class), labelled pixels by class."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.loss_sum, self.batches = 0.0, 0
        self.counts = torch.zeros(3, dtype=torch.float64, device=device)  # samples, valid, holding a hard class
        self.class_pixels = torch.zeros(num_classes, dtype=torch.float64, device=device)

    def add(self, loss: float, masks: torch.Tensor, valid: torch.Tensor, hard: torch.Tensor, ignore: int) -> None:
        self.loss_sum, self.batches = self.loss_sum + loss, self.batches + 1
        self.counts[0] += len(masks)  # in-place on the device: no synchronisation per step
        self.counts[1] += valid.sum()
        self.counts[2] += torch.isin(masks, hard).flatten(1).any(1).sum()
        labelled = masks[masks != ignore]
        self.class_pixels += torch.bincount(labelled, minlength=len(self.class_pixels)).double()

    def totals(self, val_skipped: int) -> torch.Tensor:
        head = torch.tensor([self.loss_sum, self.batches, val_skipped], dtype=torch.float64,
                            device=self.counts.device)
        return torch.cat([head, self.counts, self.class_pixels])

    @staticmethod
    def figures(totals: torch.Tensor, classes: tuple[str, ...], seconds: float) -> dict[str, float]:
        loss_sum, batches, val_skipped, samples, valid, holding = totals[:6].tolist()
        pixels = totals[6:]
        shares = (pixels / pixels.sum().clamp(min=1)).tolist()
        return {"loss": loss_sum / max(batches, 1), "samples": int(samples), "skipped_train_pairs": int(samples - valid),
                "skipped_val_pairs": int(val_skipped), "train_samples_per_second": samples / max(seconds, 1e-9),
                "hard_crop_share": holding / max(samples, 1),
                **{f"train_share.{name}": share for name, share in zip(classes, shares)}}


class _Best:
    """The best validated epoch so far (rank 0): its mIoU, per-class IoU and weights."""

    def __init__(self) -> None:
        self.miou, self.epoch, self.iou, self.confusion, self.weights = -math.inf, -1, {}, None, b""

    def update(self, figures: dict[str, float], metrics: SegmentationMetrics, model: torch.nn.Module,
               spec: ModelSpec, epoch: int) -> bool:
        miou = figures["val_miou"]
        if not math.isfinite(miou) or miou <= self.miou:
            return False
        buffer = io.BytesIO()
        save_checkpoint(buffer, model, spec)
        self.miou, self.epoch, self.weights = miou, epoch, buffer.getvalue()
        self.iou = {k.removeprefix("val_iou."): v for k, v in figures.items() if k.startswith("val_iou.")}
        self.confusion = metrics.confusion.tolist()
        return True

    def summary(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "val_miou": self.miou, "val_iou": self.iou, "confusion": self.confusion}

    def restore(self, summary: dict[str, Any], weights: bytes) -> None:
        self.epoch, self.miou, self.iou = summary["epoch"], summary["val_miou"], summary["val_iou"]
        self.confusion, self.weights = summary["confusion"], weights


def _ema(model: torch.nn.Module, decay: float):
    """An exponential moving average of the weights and of the batch-norm statistics (torch's AveragedModel), or
    None. With batches of 8 crops the running statistics follow the last few batches, so the trained weights
    validate a few points up or down from one epoch to the next; the average does not."""
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel

    return AveragedModel(model, multi_avg_fn=ema_update(decay), use_buffers=True)


def ema_update(decay: float):
    """AveragedModel's update with the decay warmed up, min(decay, (1 + n) / (10 + n)) after n updates (as timm's
    ModelEma): a short run (the demo trains about 150 steps) would otherwise still hold much of its first weights."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = float(n_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:  # batch-norm's step counters: the latest
            for a, c in zip(averaged, current, strict=True):
                a.copy_(c)

    return update


def _restore(checkpoint, model, optimizer, scheduler, best: _Best, ema=None) -> int:
    """Load the latest reported checkpoint (a replaced worker, or --resume); returns the epoch to start at."""
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        with open(os.path.join(folder, MODEL_FILE), "rb") as f:
            saved, _ = load_checkpoint(f.read())
        state = torch.load(os.path.join(folder, STATE_FILE), weights_only=True)
        with open(os.path.join(folder, BEST_FILE), "rb") as f:
            best.restore(state["best"], f.read())
        averaged = os.path.join(folder, EMA_FILE)
        ema_state = torch.load(averaged, weights_only=True) if ema is not None and os.path.exists(averaged) else None
    model.load_state_dict(saved.state_dict())
    if ema_state is not None:
        ema.load_state_dict(ema_state)
    elif ema is not None:  # a checkpoint from before the average: it starts again from these weights
        ema.n_averaged.zero_()
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    log.info("resuming after epoch %d from %s", state["epoch"], checkpoint.path)
    return state["epoch"] + 1


class _Tracker:
    """Rank 0's MLflow logging: per-epoch metrics into the run the driver opened."""

    def __init__(self, loop: LoopConfig):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=loop.tracking_uri)
        self.run_id = loop.run_id

    def log(self, figures: dict[str, float], epoch: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, epoch) for k, v in figures.items()
                                                    if k != "epoch" and math.isfinite(float(v))])


def saved_models(checkpoint_dir: str) -> tuple[bytes, bytes]:
    """(latest, best validated) segmill checkpoint bytes inside a Ray Train checkpoint folder."""
    with open(os.path.join(checkpoint_dir, MODEL_FILE), "rb") as f, \
            open(os.path.join(checkpoint_dir, BEST_FILE), "rb") as g:
        return f.read(), g.read()
