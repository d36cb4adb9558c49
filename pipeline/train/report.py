"""Pictures a training run leaves in MLflow: the validation confusion matrix and a few prediction overlays."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from segmill.models.checkpoint import ModelSpec
from segmill.models.predict import Predictor
from segmill.pipeline.common.decode import DecodeError
from segmill.pipeline.common.images import colourise, encode_png, overlay
from segmill.pipeline.train.data import read_pair

CELL = 28


def confusion_png(confusion: list[list[int]], classes: tuple[str, ...]) -> bytes:
    """Row-normalised confusion matrix (rows: ground truth, columns: prediction) with class names and shares."""
    counts = np.asarray(confusion, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    margin = 8 + 7 * max(len(c) for c in classes)
    size = margin + CELL * len(classes)
    picture = Image.new("RGB", (size + 4, size + 4), "white")
    draw = ImageDraw.Draw(picture)
    for i, name in enumerate(classes):
        draw.text((4, margin + i * CELL + 8), name, fill="black")
        draw.text((margin + i * CELL + 2, 4 + (i % 2) * 12), name[:4], fill="black")
        for j in range(len(classes)):
            share = shares[i, j]
            shade = int(255 * (1 - share))
            box = (margin + j * CELL, margin + i * CELL, margin + (j + 1) * CELL - 1, margin + (i + 1) * CELL - 1)
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text((box[0] + 3, box[1] + 8), f"{share:.2f}"[1:] if share < 1 else "1.0",
                      fill="white" if share > 0.5 else "black")
    return encode_png(np.asarray(picture))


def overlay_pngs(model: torch.nn.Module, spec: ModelSpec, pairs: list[tuple[str, str]], count: int, *,
                 endpoint_url: str | None) -> dict[str, bytes]:
    """For the first `count` readable pairs: image | prediction overlay | ground truth, side by side."""
    predictor = Predictor(model.eval(), mean=spec.mean, std=spec.std, device="cpu")
    palette, pictures = spec.colours(), {}
    for image_uri, label_uri in pairs:
        if len(pictures) >= count:
            break
        try:
            image, label = read_pair(image_uri, label_uri, spec.num_classes, spec.ignore_index, endpoint_url)
        except DecodeError:
            continue
        with torch.inference_mode():
            pred = predictor.predict(image)[0].numpy().astype(np.uint8)
        truth = colourise(label, palette)  # ignored pixels (beyond the palette) come out black
        strip = np.concatenate([image, overlay(image, pred, palette), truth], axis=1)
        pictures[image_uri.rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".png"] = encode_png(strip)
    return pictures
