"""The model stage of the bulk job: a callable class loaded once per Ray actor (through stages.SegmenterStage, so
that the driver never imports this module and torch). Decode-stage rows in, model-stage rows out (rows.py).

Everything per pixel (softmax, argmax, confidence, class histogram, confusion with the label) happens on the
actor's device; only the uint8 mask and small vectors go back to the CPU, in one round of copies per bucket of
images (one device synchronisation, not one per statistic). With `gpu_jpeg_decode`, JPEGs arrive still encoded
(see stages.decode_batch) and are decoded here with torchvision's nvJPEG decoder on the actor's GPU.
"""
from __future__ import annotations

import numpy as np
import torch

from segmill.models.allocator import FreedMemoryTrimmer, keep_freed_memory
from segmill.models.checkpoint import load_checkpoint
from segmill.models.metrics import confusion_matrix
from segmill.models.predict import (
    FastPath,
    InferenceOptions,
    Predictor,
    top_class_and_entropy,
)
from segmill.pipeline.bulk.results import mask_dtype
from segmill.pipeline.bulk.rows import ERROR, OK, STATISTICS, segmented_rows
from segmill.pipeline.common.decode import INFRASTRUCTURE, label_dtype
from segmill.pipeline.common.storage import redact


class Segmenter:
    """`__call__(batch) -> batch`: decoded rows in, rows with a raw mask and per-image statistics out."""

    def __init__(self, checkpoint: bytes, *, use_gpu: bool, torch_threads: int,
                 options: InferenceOptions = InferenceOptions(), fast: FastPath = FastPath(),
                 low_confidence: float = 0.5, keep_host_memory: bool = False):
        # Per process, and taken up by each thread that later calls the model: with `concurrent_batches` > 1
        # every one of the actor's calling threads runs its batch on this many threads.
        torch.set_num_threads(max(1, torch_threads))
        self.trim_freed_memory = FreedMemoryTrimmer() if keep_host_memory and keep_freed_memory() else None
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.device = device
        model, self.spec = load_checkpoint(checkpoint, map_location=device)
        self.num_classes = self.spec.num_classes
        self.mask_dtype = mask_dtype(self.num_classes)
        self.label_dtype = label_dtype(self.num_classes, self.spec.ignore_index)
        self.low_confidence = low_confidence
        self.predictor = Predictor(model, mean=self.spec.mean, std=self.spec.std, device=device, options=options,
                                   fast=fast)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = segmented_rows(batch, self.num_classes)
        ok = [i for i in range(len(out["status"])) if out["status"][i] == OK]
        try:
            self._segment(batch, ok, out)
        except Exception:  # e.g. out of device memory: retry image by image, so only a culprit becomes an error row
            for i in ok:
                try:
                    self._segment(batch, [i], out)
                except Exception as exc:
                    out["mask"][i], out["class_pixels"][i], out["confusion"][i] = None, 0, 0
                    for key in STATISTICS:
                        out[key][i] = np.nan
                    out["status"][i], out["error_kind"][i] = ERROR, INFRASTRUCTURE  # e.g. out of memory: retried
                    out["error"][i] = redact(f"{batch['image_uri'][i]} failed in the model "
                                             f"({type(exc).__name__}: {str(exc)[:200]}).")
        if self.trim_freed_memory is not None:
            self.trim_freed_memory()
        return out

    def _buckets(self, batch, indices: list[int]) -> list[list[int]]:
        """Images that pad to the same forward size. Padded to a larger neighbour's size, an image's mask changes
        near its bottom and right edges (the model sees the padding), so a mask would depend on its batch."""
        divisor, buckets = self.predictor.options.size_divisor, {}
        for i in indices:
            h, w = self.predictor.forward_size((int(batch["height"][i]), int(batch["width"][i])))
            buckets.setdefault((-(-h // divisor), -(-w // divisor)), []).append(i)
        return list(buckets.values())

    @torch.inference_mode()
    def _segment(self, batch, indices, out) -> None:
        for bucket in self._buckets(batch, indices):
            self._segment_bucket(batch, bucket, out)

    def _segment_bucket(self, batch, indices, out) -> None:
        images = [_image(batch, i, self.device) for i in indices]
        found: list[tuple] = []
        for position, scores, are_logits in self.predictor.iter_scores(images):
            i = indices[position]
            top, mask, entropy = top_class_and_entropy(scores, are_logits)
            summary = torch.stack([top.mean(), entropy.mean(), (top < self.low_confidence).float().mean()]).double()
            histogram = torch.bincount(mask.flatten(), minlength=self.num_classes)
            counts = None
            if len(batch["label"][i]):
                label = torch.from_numpy(_label(batch, i, self.label_dtype).astype(np.int64)).to(mask.device,
                                                                                                 non_blocking=True)
                counts = confusion_matrix(mask, label, self.num_classes, self.spec.ignore_index)
            mask = mask.to(torch.int32 if self.mask_dtype != np.uint8 else torch.uint8)
            found.append((i, summary, histogram, counts, mask))
        # Copies are queued without waiting; one synchronisation for the whole bucket, then the numbers are read.
        copied = [[None if t is None else t.to("cpu", non_blocking=True) for t in row[1:]] for row in found]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for (i, *_), (summary, histogram, counts, mask) in zip(found, copied):
            for key, value in zip(STATISTICS, summary.numpy()):
                out[key][i] = value
            out["class_pixels"][i] = histogram.numpy()
            if counts is not None:
                out["confusion"][i] = counts.numpy()
            out["mask"][i] = mask.numpy().astype(self.mask_dtype).tobytes()


def _image(batch: dict[str, np.ndarray], i: int, device: torch.device) -> np.ndarray | torch.Tensor:
    """Row i's HxWx3 image: raw pixels from the decode stage, or a JPEG decoded here (on the GPU if there is one)."""
    encoded = batch.get("jpeg")
    if encoded is not None and len(encoded[i]):
        from torchvision.io import ImageReadMode, decode_jpeg

        data = torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device).permute(1, 2, 0)
    h, w = int(batch["height"][i]), int(batch["width"][i])
    return np.frombuffer(batch["pixels"][i], dtype=np.uint8).reshape(h, w, 3)


def _label(batch: dict[str, np.ndarray], i: int, dtype: type) -> np.ndarray:
    h, w = int(batch["height"][i]), int(batch["width"][i])
    return np.frombuffer(batch["label"][i], dtype=dtype).reshape(h, w)
