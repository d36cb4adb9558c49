"""Stateless stages of the bulk job (plain functions run as Ray tasks): decode, and commit results."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from segmill.pipeline.decode import DecodeError, decode_image, decode_label, read_bytes
from segmill.pipeline.results import ERROR, OK, build_table, commit_table, encode_mask_png
from segmill.pipeline.storage import redact


def decode_batch(batch: pa.Table, *, max_pixels: int, num_classes: int, ignore_index: int,
                 endpoint_url: str | None, labels_expected: bool = False) -> dict[str, np.ndarray]:
    """Listing rows in; raw RGB pixels (and label indices) out, or an error row with the reason.

    With `labels_expected` (the job has a labels prefix), an image without a label is an error row.
    """
    n = batch.num_rows
    rows = {key: np.empty(n, dtype=object) for key in ("status", "error", "pixels", "label")}
    height, width = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    images, labels = batch["image_uri"].to_pylist(), batch["label_uri"].to_pylist()
    for i, (image_uri, label_uri) in enumerate(zip(images, labels)):
        rows["status"][i], rows["error"][i], rows["pixels"][i], rows["label"][i] = OK, "", b"", b""
        try:
            image = decode_image(read_bytes(image_uri, endpoint_url), image_uri, max_pixels)
            height[i], width[i] = image.shape[:2]
            rows["pixels"][i] = image.tobytes()
            if label_uri is None and labels_expected:
                raise DecodeError(f"No label was found for {redact(image_uri)} under the labels prefix.")
            if label_uri is not None:
                label = decode_label(read_bytes(label_uri, endpoint_url, what="Label"), label_uri, image.shape[:2],
                                     num_classes, ignore_index)
                rows["label"][i] = label.tobytes()
        except DecodeError as exc:
            rows["status"][i], rows["error"][i], rows["pixels"][i], rows["label"][i] = ERROR, str(exc), b"", b""
        except Exception as exc:  # a decoder bug on a malformed file must cost one row, not the job
            reason = f"{redact(image_uri)} could not be decoded ({type(exc).__name__}: {redact(str(exc))[:120]})."
            rows["status"][i], rows["error"][i], rows["pixels"][i], rows["label"][i] = ERROR, reason, b"", b""
    # Empty strings and bytes stand for "none": Ray turns None in object columns into NaN between stages.
    return {"image_uri": np.array(images, dtype=object), "label_uri": np.array([u or "" for u in labels], dtype=object),
            "height": height, "width": width, **rows}


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
