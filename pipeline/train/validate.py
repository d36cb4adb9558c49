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


def counts_per_image(model: torch.nn.Module, spec: ModelSpec, pairs: list[tuple[str, str]], *,
                     device: torch.device, endpoint_url: str | None) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per-image intersection and union counts (images x classes, int64) over the readable `pairs`, and the
    positions of those pairs: what a paired comparison of two models on the same images needs (models/comparison.py)."""
    from segmill.models.metrics import confusion_matrix, intersection_and_union

    model.eval()
    predictor = Predictor(model, mean=spec.mean, std=spec.std, device=device)
    inters, unions, kept = [], [], []
    with torch.inference_mode():
        for position, (image_uri, label_uri) in enumerate(pairs):
            try:
                image, label = read_pair(image_uri, label_uri, spec.num_classes, spec.ignore_index, endpoint_url)
            except DecodeError:
                continue
            target = torch.from_numpy(label.astype(np.int64)).to(device)
            prediction = predictor.predict(image)[0].to(device)
            inter, union = intersection_and_union(confusion_matrix(prediction, target, spec.num_classes,
                                                                   spec.ignore_index))
            inters.append(inter.cpu().numpy())
            unions.append(union.cpu().numpy())
            kept.append(position)
    shape = (0, spec.num_classes)
    return (np.stack(inters) if inters else np.zeros(shape, np.int64),
            np.stack(unions) if unions else np.zeros(shape, np.int64), kept)


def epoch_metrics(metrics: SegmentationMetrics, classes: tuple[str, ...]) -> dict[str, float]:
    """Validation figures named as MLflow logs them (see tracking.py); undefined IoUs are left out."""
    out = {"val_miou": metrics.mean_iou, "val_pixel_accuracy": metrics.pixel_accuracy}
    for name, value in zip(classes, metrics.iou.tolist()):
        if not math.isnan(value):
            out[f"val_iou.{name}"] = value
    return out
