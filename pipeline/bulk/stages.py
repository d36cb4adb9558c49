"""The bulk job's stages as Ray Data runs them: decode, encode and commit are plain functions (Ray tasks); the
model stage is a callable class (one per actor). Their columns are declared in rows.py."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from segmill.pipeline.bulk.results import build_table, commit_table, mask_dtype
from segmill.pipeline.bulk.rows import OK, decoded_rows, mark_error
from segmill.pipeline.common import progress
from segmill.pipeline.common.decode import (
    INPUT,
    DecodeError,
    decode_image,
    decode_label,
    open_image,
    read_bytes,
)
from segmill.pipeline.common.images import FAST_PNG, encode_png
from segmill.pipeline.common.storage import redact


def decode_batch(batch: pa.Table, *, max_pixels: int, num_classes: int, ignore_index: int,
                 endpoint_url: str | None, labels_expected: bool = False,
                 gpu_jpeg: bool = False) -> dict[str, np.ndarray]:
    """Listing rows in; raw RGB pixels (and label indices) out (rows.DECODED), or an error row with the reason.

    With `labels_expected` (the job has a labels prefix), an image without a label is an error row. With
    `gpu_jpeg`, plain JPEGs (RGB or grey, no EXIF rotation) are passed on still encoded in a `jpeg` column, for
    the model actor to decode on its GPU (`Segmenter`); every other file is decoded here as usual.
    """
    images, labels = batch["image_uri"].to_pylist(), batch["label_uri"].to_pylist()
    rows = decoded_rows(images, labels, gpu_jpeg=gpu_jpeg)
    for i, (image_uri, label_uri) in enumerate(zip(images, labels)):
        try:
            data = read_bytes(image_uri, endpoint_url)
            size = _plain_jpeg_size(data, image_uri, max_pixels) if gpu_jpeg else None
            if size is not None:
                (rows["height"][i], rows["width"][i]), rows["jpeg"][i] = size, data
            else:
                image = decode_image(data, image_uri, max_pixels)
                rows["height"][i], rows["width"][i] = image.shape[:2]
                rows["pixels"][i] = image.tobytes()
            if label_uri is None and labels_expected:
                raise DecodeError(f"No label was found for {redact(image_uri)} under the labels prefix.")
            if label_uri is not None:
                label = decode_label(read_bytes(label_uri, endpoint_url, what="Label"), label_uri,
                                     (int(rows["height"][i]), int(rows["width"][i])), num_classes, ignore_index)
                rows["label"][i] = label.tobytes()
        except DecodeError as exc:
            mark_error(rows, i, str(exc), exc.kind)
        except Exception as exc:  # a decoder bug on a malformed file must cost one row, not the job
            mark_error(rows, i, f"{redact(image_uri)} could not be decoded ({type(exc).__name__}: "
                                f"{redact(str(exc))[:120]}).", INPUT)
    return rows


def _plain_jpeg_size(data: bytes, uri: str, max_pixels: int) -> tuple[int, int] | None:
    """(height, width) of a JPEG the GPU decoder reads as the CPU path would (RGB or grey, upright), else None.

    Only the header is parsed; the pixel limit is checked here as for any image.
    """
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    image = open_image(data, uri, max_pixels)
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or image.getexif().get(0x0112, 1) != 1:
        return None
    return image.height, image.width


def encode_masks(batch: dict[str, np.ndarray], *, num_classes: int, counter: Any = None) -> dict[str, np.ndarray]:
    """Raw masks to PNG in small batches, so the commit stage buffers compressed masks, not raw pixels; the rows
    count towards the job's progress (`counter`, when one is shown)."""
    masks = batch["mask"].astype(object).copy()
    dtype = mask_dtype(num_classes)
    for i in range(len(masks)):
        if batch["status"][i] == OK:
            shape = (int(batch["height"][i]), int(batch["width"][i]))
            masks[i] = encode_png(np.frombuffer(masks[i], dtype=dtype).reshape(shape), compress_level=FAST_PNG)
    ok = int((batch["status"] == OK).sum())
    progress.add(counter, {"ok": ok, "errors": len(masks) - ok})
    return {**batch, "mask": masks}


def commit_batch(batch: dict[str, np.ndarray], *, classes: tuple[str, ...], output: str, job_id: str,
                 model_name: str, model_version: str, endpoint_url: str | None, row_group_rows: int,
                 export_png: bool, palette: tuple[tuple[int, int, int], ...]) -> dict[str, np.ndarray]:
    """Encode and commit one part file; returns one summary row (file, rows, ok, errors) for the driver."""
    table = build_table(batch, classes, job_id=job_id, model_name=model_name, model_version=model_version)
    if export_png:  # before the commit: a resumed job skips committed rows, so their PNGs must exist by then
        from segmill.pipeline.bulk.export import export_pngs

        export_pngs(table, batch["image_uri"].tolist(), output, palette, classes, endpoint_url=endpoint_url)
    uri = commit_table(table, output, job_id, endpoint_url=endpoint_url, row_group_rows=row_group_rows)
    ok = int((batch["status"] == OK).sum())
    return {"file": np.array([uri], dtype=object), "rows": np.array([table.num_rows]),
            "ok": np.array([ok]), "errors": np.array([table.num_rows - ok])}


class SegmenterStage:
    """The model stage as Ray Data runs it: torch and the model load in the actor, so the driver (which imports
    this module) never loads torch."""

    def __init__(self, *, checkpoint_uri: str, endpoint_url: str | None, **segmenter_kwargs) -> None:
        from segmill.pipeline.bulk.segmenter import Segmenter

        self.segmenter = Segmenter(read_bytes(checkpoint_uri, endpoint_url, what="Model checkpoint"),
                                   **segmenter_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.segmenter(batch)
