"""`segmill demo` (what `make run` runs): the bulk job end to end on the embedded default.

A small U-Net is trained once on generated scenes (about a minute on 2 CPU cores, then cached in the state
folder), new scenes plus one broken file are segmented with an in-process Ray, and the results are queried.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console

from segmill.jobs.progress import ProgressView
from segmill.jobs.progress import images as progress_line
from segmill.jobs.query import connect
from segmill.jobs.report import try_write_report
from segmill.jobs.summary import segment_summary
from segmill.models.checkpoint import ModelSpec, save_checkpoint
from segmill.models.metrics import ConfusionAccumulator
from segmill.models.predict import Predictor, normalize
from segmill.models.training import autocast_dtype, optimizer_with_poly, random_scale_crop_flip, train_step
from segmill.pipeline.bulk.config import SegmentConfig
from segmill.pipeline.bulk.job import segment
from segmill.pipeline.common.scenes import (
    SCENE_CLASSES,
    SCENE_PALETTE,
    render_scene,
    write_scenes,
)
from segmill.pipeline.train.sampling import ClassStats, class_weights, hard_class_probabilities

log = logging.getLogger(__name__)
DEMO_ARCH_KWARGS = {"base_channels": 16, "depth": 3}
DEMO_HARD_CLASSES = ("pole", "sign")
TRAIN_SEED, HOLDOUT_SEED, DEMO_SEED = 0, 101, 1


def train_demo_model(path: Path, *, steps: int = 800, scenes: int = 200, crop: int = 96, batch_size: int = 8,
                     seed: int = 0, hard_crop_share: float = 0.5, progress: Callable[[str], None] | None = None,
                     ) -> dict[str, float]:
    """Train the demo U-Net on generated scenes with the retraining job's hard-class recipe (median-frequency class
    weights, half the crops placed on a pole or a sign pixel, bf16 where native), save it, return held-out metrics."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    spec = ModelSpec(arch="unet", classes=SCENE_CLASSES, arch_kwargs=DEMO_ARCH_KWARGS, palette=SCENE_PALETTE)
    model = spec.build().to(memory_format=torch.channels_last)
    data = [render_scene(TRAIN_SEED, i) for i in range(scenes)]
    inputs = [(normalize(image, spec.mean, spec.std), torch.from_numpy(mask).long()) for image, mask in data]
    stats = ClassStats(np.arange(scenes), np.stack([np.bincount(m.ravel(), minlength=len(SCENE_CLASSES))
                                                    for _, m in data]))
    weights = torch.tensor(class_weights(stats, "median_frequency"), dtype=torch.float32)
    hard = [SCENE_CLASSES.index(c) for c in DEMO_HARD_CLASSES]
    holding = np.flatnonzero(stats.holds(hard))
    rarity = hard_class_probabilities(stats, hard, temperature=1.0)
    optimizer, scheduler = optimizer_with_poly(model, lr=0.05, total_steps=steps)
    dtype = autocast_dtype("auto", torch.device("cpu"))
    model.train()
    for step in range(steps):
        crops = []
        for k in range(batch_size):
            if k < hard_crop_share * batch_size:  # an image with a pole or a sign, the crop on one of them
                i = int(holding[torch.randint(0, len(holding), (), generator=generator)])
                present = [c for c in hard if stats.pixels[i, c]]
                focus = max(present, key=lambda c: rarity[hard.index(c)])
            else:
                i, focus = int(torch.randint(0, scenes, (), generator=generator)), None
            crops.append(random_scale_crop_flip(*inputs[i], crop, generator=generator, scale_range=(0.75, 1.25),
                                                focus_class=focus))
        images = torch.stack([c[0] for c in crops]).contiguous(memory_format=torch.channels_last)
        loss = train_step(model, images, torch.stack([c[1] for c in crops]), optimizer, scheduler,
                          class_weights=weights, autocast_dtype=dtype)
        if progress and (step + 1) % 100 == 0:
            progress(f"  step {step + 1}/{steps}, loss {loss:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model.to(memory_format=torch.contiguous_format), spec)
    return evaluate_on_scenes(model, spec, count=40)


def evaluate_on_scenes(model: torch.nn.Module, spec: ModelSpec, *, count: int) -> dict[str, float]:
    """Dataset mIoU and per-class IoU on held-out scenes (confusion matrices summed over images)."""
    accumulator = ConfusionAccumulator(spec.num_classes, spec.ignore_index)
    predictor = Predictor(model, mean=spec.mean, std=spec.std, device="cpu")
    for i in range(count):
        image, mask = render_scene(HOLDOUT_SEED, i)
        accumulator.update(predictor.predict(image)[0], torch.from_numpy(mask))
    result = accumulator.compute()
    return {"miou": result.mean_iou, **{name: float(v) for name, v in zip(spec.classes, result.iou.tolist())}}


def _recipe_digest() -> str:
    """Names the cached demo model after the code that trains it, so that a changed recipe trains a new one instead
    of serving a model an older version cached (a state folder outlives upgrades)."""
    import hashlib
    import inspect

    return hashlib.sha256(inspect.getsource(train_demo_model).encode()).hexdigest()[:10]


def run_demo(state: Path, images: int, console: Console) -> None:
    checkpoint = state / "models" / f"demo-unet-{_recipe_digest()}.pt"
    if not checkpoint.exists():
        console.print("Training the demo U-Net on generated scenes (once; about a minute on 2 cores)...")
        started = time.time()
        metrics = train_demo_model(checkpoint, progress=lambda line: console.print(line, highlight=False))
        checkpoint.with_suffix(".metrics.json").write_text(json.dumps(metrics, indent=2))
        console.print(f"  trained in {time.time() - started:.0f} s; held-out mIoU {metrics['miou']:.3f} (pole "
                      f"{metrics['pole']:.3f}, sign {metrics['sign']:.3f})")
    scenes_dir, results = state / "demo" / "scenes", state / "demo" / "results"
    if not (scenes_dir / "images").is_dir() or len(os.listdir(scenes_dir / "images")) != images + 1:
        shutil.rmtree(scenes_dir, ignore_errors=True)
        write_scenes(str(scenes_dir), images, seed=DEMO_SEED)
        (scenes_dir / "images" / "broken.png").write_bytes(b"not an image")  # shows a bad file becoming an error row
    shutil.rmtree(results, ignore_errors=True)  # the demo runs afresh each time; real jobs resume instead
    console.print(f"Segmenting {images + 1} images with an in-process Ray...")
    started = time.time()
    with ProgressView(console, progress_line, title="segment") as view:
        record = segment(SegmentConfig(input=str(scenes_dir / "images"), labels=str(scenes_dir / "labels"),
                                       output=str(results), model=str(checkpoint), export_png=True), progress=view)
    seconds = time.time() - started
    report = try_write_report(str(results))
    for line in segment_summary(record, str(results), seconds=seconds, report=report):
        console.print(line, highlight=False, markup=False)
    example = "SELECT image_uri, round(miou, 3) AS miou, round(class_fraction.vehicle, 3) AS vehicle FROM results " \
              "WHERE status = 'ok' ORDER BY miou LIMIT 3"
    console.print(f"\nThe three images the model did worst on (overlays in {results}/png/overlays):", highlight=False)
    console.print(f'  segmill query {results} "{example}"', highlight=False, markup=False)
    console.print(connect(str(results)).sql(example))
