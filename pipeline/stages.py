"""Stateless stages of the bulk job (plain functions run as Ray tasks): decode, and commit results."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from segmill.pipeline.decode import DecodeError, _open, decode_image, decode_label, read_bytes
from segmill.pipeline.results import ERROR, OK, build_table, commit_table, encode_mask_png
from segmill.pipeline.storage import redact


def decode_batch(batch: pa.Table, *, max_pixels: int, num_classes: int, ignore_index: int,
                 endpoint_url: str | None, labels_expected: bool = False,
                 gpu_jpeg: bool = False) -> dict[str, np.ndarray]:
    """Listing rows in; raw RGB pixels (and label indices) out, or an error row with the reason.

    With `labels_expected` (the job has a labels prefix), an image without a label is an error row. With
    `gpu_jpeg`, plain JPEGs (RGB or grey, no EXIF rotation) are passed on still encoded in a `jpeg` column, for
    the model actor to decode on its GPU (`Segmenter`); every other file is decoded here as usual.
    """
    n = batch.num_rows
    keys = ("status", "error", "pixels", "label") + (("jpeg",) if gpu_jpeg else ())
    rows = {key: np.empty(n, dtype=object) for key in keys}
    height, width = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    images, labels = batch["image_uri"].to_pylist(), batch["label_uri"].to_pylist()
    for i, (image_uri, label_uri) in enumerate(zip(images, labels)):
        rows["status"][i], rows["error"][i], rows["pixels"][i], rows["label"][i] = OK, "", b"", b""
        if gpu_jpeg:
            rows["jpeg"][i] = b""
        try:
            data = read_bytes(image_uri, endpoint_url)
            size = _plain_jpeg_size(data, image_uri, max_pixels) if gpu_jpeg else None
            if size is not None:
                (height[i], width[i]), rows["jpeg"][i] = size, data
            else:
                image = decode_image(data, image_uri, max_pixels)
                height[i], width[i] = image.shape[:2]
                rows["pixels"][i] = image.tobytes()
            if label_uri is None and labels_expected:
                raise DecodeError(f"No label was found for {redact(image_uri)} under the labels prefix.")
            if label_uri is not None:
                label = decode_label(read_bytes(label_uri, endpoint_url, what="Label"), label_uri,
                                     (int(height[i]), int(width[i])), num_classes, ignore_index)
                rows["label"][i] = label.tobytes()
        except DecodeError as exc:
            rows["status"][i], rows["error"][i], rows["pixels"][i], rows["label"][i] = ERROR, str(exc), b"", b""
            if gpu_jpeg:
                rows["jpeg"][i] = b""
        except Exception as exc:  # a decoder bug on a malformed file must cost one row, not the job
            reason = f"{redact(image_uri)} could not be decoded ({type(exc).__name__}: {redact(str(exc))[:120]})."
            rows["status"][i], rows["error"][i], rows["pixels"][i], rows["label"][i] = ERROR, reason, b"", b""
            if gpu_jpeg:
                rows["jpeg"][i] = b""
    # Empty strings and bytes stand for "none": Ray turns None in object columns into NaN between stages.
    return {"image_uri": np.array(images, dtype=object), "label_uri": np.array([u or "" for u in labels], dtype=object),
            "height": height, "width": width, **rows}


def _plain_jpeg_size(data: bytes, uri: str, max_pixels: int) -> tuple[int, int] | None:
    """(height, width) of a JPEG the GPU decoder reads as the CPU path would (RGB or grey, upright), else None.

    Only the header is parsed; the pixel limit is checked here as for any image.
    """
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    image = _open(data, uri, max_pixels)
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or image.getexif().get(0x0112, 1) != 1:
        return None
    return image.height, image.width


def encode_masks(batch: dict[str, np.ndarray], *, num_classes: int) -> dict[str, np.ndarray]:
    """Raw masks to PNG in small batches, so the commit stage buffers compressed masks, not raw pixels."""
    masks = batch["mask"].astype(object).copy()
    for i in range(len(masks)):
        if batch["status"][i] == OK:
            masks[i] = encode_mask_png(masks[i], int(batch["height"][i]), int(batch["width"][i]), num_classes)
    return {**batch, "mask": masks}


def commit_batch(batch: dict[str, np.ndarray], *, classes: tuple[str, ...], output: str, job_id: str,
                 model_name: str, model_version: str, endpoint_url: str | None, row_group_rows: int,
                 export_png: bool, palette: tuple[tuple[int, int, int], ...]) -> dict[str, np.ndarray]:
    """Encode and commit one part file; returns one summary row (file, rows, ok, errors) for the driver."""
    table = build_table(batch, classes, job_id=job_id, model_name=model_name, model_version=model_version)
    if export_png:  # before the commit: a resumed job skips committed rows, so their PNGs must exist by then
        from segmill.pipeline.export import export_pngs

        export_pngs(table, batch["image_uri"].tolist(), output, palette, endpoint_url=endpoint_url)
    uri = commit_table(table, output, job_id, endpoint_url=endpoint_url, row_group_rows=row_group_rows)
    ok = int((batch["status"] == OK).sum())
    return {"file": np.array([uri], dtype=object), "rows": np.array([table.num_rows]),
            "ok": np.array([ok]), "errors": np.array([table.num_rows - ok])}


class SegmenterStage:
    """The model stage as Ray Data runs it: torch and the model load in the actor, so the driver (which imports
    this module) never loads torch."""

    def __init__(self, **segmenter_kwargs) -> None:
        from segmill.pipeline.segmenter import Segmenter

        self.segmenter = Segmenter(**segmenter_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.segmenter(batch)
