"""The embedded default: a small U-Net trained on generated scenes, then a bulk job over new scenes.

`make run` calls `run_demo`: everything local (in-process Ray, files under the state folder), and the model
is trained by the project itself (about a minute on 2 CPU cores, once; cached afterwards), so masks mean something.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch

from segmill.models import get_model
from segmill.models.checkpoint import ModelSpec, save_checkpoint
from segmill.models.metrics import ConfusionAccumulator
from segmill.models.predict import Predictor, normalize
from segmill.models.training import random_scale_crop_flip, sgd_with_poly, train_step
from segmill.pipeline.scenes import SCENE_CLASSES, SCENE_PALETTE, render_scene

log = logging.getLogger(__name__)
DEMO_ARCH_KWARGS = {"base_channels": 16, "depth": 3}
TRAIN_SEED, TEST_SEED = 0, 1


def train_demo_model(path: str, *, steps: int = 500, scenes: int = 200, crop: int = 96, batch_size: int = 8,
                     seed: int = 0) -> dict[str, float]:
    """Train the demo U-Net on generated scenes and save a checkpoint; returns its validation metrics."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    spec = ModelSpec(arch="unet", classes=SCENE_CLASSES, arch_kwargs=DEMO_ARCH_KWARGS, palette=SCENE_PALETTE)
    model = spec.build()
    data = [render_scene(TRAIN_SEED, i) for i in range(scenes)]
    inputs = [(normalize(image, spec.mean, spec.std), torch.from_numpy(mask).long()) for image, mask in data]
    optimizer, scheduler = sgd_with_poly(model, lr=0.05, total_steps=steps)
    started = time.time()
    for step in range(steps):
        picks = torch.randint(0, scenes, (batch_size,), generator=generator).tolist()
        pairs = [random_scale_crop_flip(*inputs[i], crop, generator=generator, scale_range=(0.75, 1.25)) for i in picks]
        loss = train_step(model, torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), optimizer, scheduler)
        if step % 100 == 0:
            log.info("demo model: step %d/%d loss %.3f (%.0f s)", step, steps, loss, time.time() - started)
    metrics = evaluate_on_scenes(model, spec, count=40)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_checkpoint(path, model, spec)
    return metrics


def evaluate_on_scenes(model: torch.nn.Module, spec: ModelSpec, *, count: int) -> dict[str, float]:
    """mIoU and pixel accuracy on held-out generated scenes (another seed), summed over images."""
    accumulator = ConfusionAccumulator(spec.num_classes, spec.ignore_index)
    predictor = Predictor(model, mean=spec.mean, std=spec.std, device="cpu")
    for i in range(count):
        image, mask = render_scene(TEST_SEED + 100, i)
        accumulator.update(predictor.predict(image)[0], torch.from_numpy(mask))
    result = accumulator.compute()
    return {"miou": result.mean_iou, "pixel_accuracy": result.pixel_accuracy,
            **{f"iou_{name}": float(v) for name, v in zip(spec.classes, result.iou.tolist())}}


def demo_numbers(values: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in values.items() if not np.isnan(v))
