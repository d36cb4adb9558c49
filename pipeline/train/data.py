"""The retraining job's data: labelled pairs, the train/validation split, and Ray Data streams of decoded crops.

Images and labels are listed by the bulk job's readers (prefix pairing or manifest) and decoded by its
decoder, so a label the bulk job rejects is rejected here too, with the same sentence.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from segmill.models.training import random_scale_crop_flip
from segmill.pipeline.common.decode import (
    DEFAULT_MAX_PIXELS,
    DecodeError,
    decode_image,
    decode_label,
    read_bytes,
)
from segmill.pipeline.common.listing import is_manifest, iter_image_batches
from segmill.pipeline.common.storage import join_uri, redact
from segmill.pipeline.train.bootstrap import (
    OK,
    PRESENCE_INDEX_NAME,
    class_presence_index,
    default_index_uri,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelledSet:
    """The usable pairs of a labelled set, its class-presence index, and what was skipped and why."""

    index: pa.Table  # bootstrap.INDEX_SCHEMA, one row per labelled pair (bad labels: status error)
    unlabelled: list[str]  # images without a label
    fingerprint: str  # changes when the pairs or any label file (size, mtime/ETag) change

    @property
    def usable(self) -> pa.Table:
        return self.index.filter(pa.compute.equal(self.index["status"], OK))

    @property
    def errors(self) -> list[tuple[str, str]]:
        bad = self.index.filter(pa.compute.not_equal(self.index["status"], OK))
        return list(zip(bad["label_uri"].to_pylist(), bad["error"].to_pylist()))


def list_pairs(images: str, labels: str | None, endpoint_url: str | None) -> tuple[list[tuple[str, str]], list[str]]:
    """(image, label) pairs in a stable order, and the images that have no label."""
    if labels is None and not is_manifest(images):
        raise ValueError(f"Images at {redact(images)} need labels: give a label prefix or a manifest with label_uri.")
    pairs, unlabelled = [], []
    for batch in iter_image_batches(images, labels, endpoint_url=endpoint_url):
        for image_uri, label_uri in zip(batch["image_uri"].to_pylist(), batch["label_uri"].to_pylist()):
            (pairs.append((image_uri, label_uri)) if label_uri else unlabelled.append(image_uri))
    return pairs, unlabelled


def in_validation_split(key: str, fraction: float) -> bool:
    """A stable split by hash: the same image stays on the same side whatever else is added."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_key(image_uri: str, images: str) -> str:
    """What the split hashes: the path under the images prefix, so that the same set copied to another bucket or
    folder splits the same way (a manifest's URIs are hashed whole)."""
    prefix = images.rstrip("/") + "/"
    return image_uri[len(prefix):] if image_uri.startswith(prefix) else image_uri


def labelled_set(pairs: list[tuple[str, str]], unlabelled: list[str], num_classes: int, *, cache_uri: str,
                 endpoint_url: str | None, ignore_index: int) -> LabelledSet:
    index = class_presence_index(pairs, num_classes, cache_uri=cache_uri, endpoint_url=endpoint_url,
                                 ignore_index=ignore_index)
    return LabelledSet(index, unlabelled, _fingerprint_of(index))


def _index_uri(images: str, labels: str | None) -> str:
    """Beside the labels; for a manifest (no label prefix), beside the manifest."""
    return default_index_uri(labels) if labels else join_uri(images.rsplit("/", 1)[0], PRESENCE_INDEX_NAME)


def load_sets(images: str, labels: str | None, val_images: str | None, val_labels: str | None, val_fraction: float,
              num_classes: int, *, endpoint_url: str | None, ignore_index: int) -> tuple[LabelledSet, LabelledSet]:
    """The training and validation sets, each with its presence index (cached beside the labels)."""
    pairs, unlabelled = list_pairs(images, labels, endpoint_url)
    cache = _index_uri(images, labels)
    if val_images is None:
        held_out = [in_validation_split(split_key(p[0], images), val_fraction) for p in pairs]
        val_pairs = [p for p, out in zip(pairs, held_out) if out]
        pairs = [p for p, out in zip(pairs, held_out) if not out]
        val_unlabelled: list[str] = []
        val_cache = cache
    else:
        val_pairs, val_unlabelled = list_pairs(val_images, val_labels, endpoint_url)
        val_cache = _index_uri(val_images, val_labels)
    if not pairs or not val_pairs:
        raise ValueError(f"Images at {redact(images)} give {len(pairs)} training and {len(val_pairs)} validation pairs; "
                         "both need at least one labelled image.")
    if val_cache == cache:  # one index file per label folder: build it over both sides at once, then split it
        both = labelled_set(pairs + val_pairs, unlabelled, num_classes, cache_uri=cache, endpoint_url=endpoint_url,
                            ignore_index=ignore_index)
        n = len(pairs)
        train = LabelledSet(both.index.slice(0, n), unlabelled, _fingerprint_of(both.index.slice(0, n)))
        val = LabelledSet(both.index.slice(n), [], _fingerprint_of(both.index.slice(n)))
    else:
        train = labelled_set(pairs, unlabelled, num_classes, cache_uri=cache, endpoint_url=endpoint_url,
                             ignore_index=ignore_index)
        val = labelled_set(val_pairs, val_unlabelled, num_classes, cache_uri=val_cache, endpoint_url=endpoint_url,
                           ignore_index=ignore_index)
    for name, subset in (("training", train), ("validation", val)):
        if subset.usable.num_rows == 0:
            reasons = "; ".join(error for _, error in subset.errors[:3]) or "no labelled images"
            raise ValueError(f"The {name} set at {redact(images)} has no usable labelled image ({reasons}).")
    return train, val


def _fingerprint_of(index: pa.Table) -> str:
    """Changes when any image URI, label URI or label file (size, mtime/ETag) changes."""
    digest = hashlib.sha256()
    for row in zip(index["image_uri"].to_pylist(), index["label_uri"].to_pylist(), index["label_fingerprint"].to_pylist()):
        digest.update("\0".join(map(str, row)).encode() + b"\n")
    return digest.hexdigest()[:16]


def read_pair(image_uri: str, label_uri: str, num_classes: int, ignore_index: int,
              endpoint_url: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pair with the bulk job's decoder; DecodeError names the file and the problem."""
    image = decode_image(read_bytes(image_uri, endpoint_url), image_uri, DEFAULT_MAX_PIXELS)
    label = decode_label(read_bytes(label_uri, endpoint_url, what="Label"), label_uri, image.shape[:2],
                         num_classes, ignore_index)
    return np.require(image, requirements="W"), label  # writable: torch warns on read-only arrays


def decode_and_augment(batch: dict[str, np.ndarray], *, num_classes: int, ignore_index: int, crop: int,
                       scale_range: tuple[float, float], endpoint_url: str | None) -> dict[str, np.ndarray]:
    """Ray Data stage: read a batch of planned pairs (sampling.PLAN_SCHEMA), then random scale, crop and flip each
    to `crop` x `crop` uint8 arrays, the crop placed on a pixel of the row's `crop_class` where it has one.

    Each row's augmentation is drawn from its own `seed`, so a plan gives the same crops wherever it runs. A pair
    that fails to decode (e.g. a label of the wrong size) is logged and becomes an all-ignore crop (`valid` false):
    it costs one sample and no gradient, and every worker still takes the same number of steps.
    """
    images, masks, valid = [], [], []
    mask_dtype = np.uint8 if ignore_index <= 255 else np.int32
    for image_uri, label_uri, crop_class, seed in zip(batch["image_uri"], batch["label_uri"], batch["crop_class"],
                                                      batch["seed"]):
        try:
            image, label = read_pair(image_uri, label_uri, num_classes, ignore_index, endpoint_url)
        except DecodeError as exc:
            log.warning("skipping training pair: %s", exc)
            images.append(np.zeros((crop, crop, 3), np.uint8))
            masks.append(np.full((crop, crop), ignore_index, mask_dtype))
            valid.append(False)
            continue
        generator = torch.Generator().manual_seed(int(seed))
        tensor, mask = random_scale_crop_flip(torch.from_numpy(image).permute(2, 0, 1).float(),
                                              torch.from_numpy(label.astype(np.int64)), crop, generator=generator,
                                              scale_range=scale_range, ignore_index=ignore_index,
                                              focus_class=int(crop_class) if crop_class >= 0 else None)
        images.append(tensor.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
        masks.append(mask.numpy().astype(mask_dtype))
        valid.append(True)
    return {"image": np.stack(images), "mask": np.stack(masks), "valid": np.array(valid, dtype=bool)}


def epoch_dataset(plan: pa.Table, *, num_classes: int, ignore_index: int, crop: int,
                  scale_range: tuple[float, float], endpoint_url: str | None, decode_cpus: float,
                  rows_per_block: int = 16):
    """One worker's share of an epoch plan as a Ray Data stream, decoded and augmented in Ray tasks, in the plan's
    order (so that a seed gives the same batches)."""
    import ray.data

    context = ray.data.DataContext.get_current().copy()
    context.execution_options.preserve_order = True
    blocks = [plan.slice(start, rows_per_block) for start in range(0, plan.num_rows, rows_per_block)]
    with ray.data.DataContext.current(context):
        return ray.data.from_arrow(blocks).map_batches(
            decode_and_augment, batch_size=rows_per_block, num_cpus=decode_cpus,
            fn_kwargs=dict(num_classes=num_classes, ignore_index=ignore_index, crop=crop, scale_range=scale_range,
                           endpoint_url=endpoint_url))
