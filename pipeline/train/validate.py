"""Validation shared by the training workers and the driver (which re-scores the champion on the same pairs):
native size, logits upsampled, labels never resized; one confusion matrix summed over the pairs."""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

from segmill.models.checkpoint import ModelSpec
from segmill.models.metrics import ConfusionAccumulator, SegmentationMetrics
from segmill.models.predict import Predictor
from segmill.pipeline.common.decode import DecodeError
from segmill.pipeline.train.data import read_pair

log = logging.getLogger(__name__)


def confusion_on_pairs(model: torch.nn.Module, spec: ModelSpec, pairs: list[tuple[str, str]], *,
                       device: torch.device, endpoint_url: str | None) -> tuple[torch.Tensor, int]:
    """Summed confusion matrix over `pairs` at native size (logits upsampled, labels never resized), and skips."""
    model.eval()
    predictor = Predictor(model, mean=spec.mean, std=spec.std, device=device)
    accumulator = ConfusionAccumulator(spec.num_classes, spec.ignore_index, device=device)
    skipped = 0
    with torch.inference_mode():
        for image_uri, label_uri in pairs:
            try:
                image, label = read_pair(image_uri, label_uri, spec.num_classes, spec.ignore_index, endpoint_url)
            except DecodeError as exc:
                log.warning("skipping validation pair: %s", exc)
                skipped += 1
                continue
            accumulator.update(predictor.predict(image)[0], torch.from_numpy(label.astype(np.int64)).to(device))
    return accumulator.confusion, skipped


def epoch_metrics(metrics: SegmentationMetrics, classes: tuple[str, ...]) -> dict[str, float]:
    """Validation figures named as MLflow logs them (see tracking.py); undefined IoUs are left out."""
    out = {"val_miou": metrics.mean_iou, "val_pixel_accuracy": metrics.pixel_accuracy}
    for name, value in zip(classes, metrics.iou.tolist()):
        if not math.isnan(value):
            out[f"val_iou.{name}"] = value
    return out
