"""One image of a results table as a PNG: its stored mask over the image, and the ground truth beside it.

The palette is the model's (from the checkpoint named in the job record `_job.json`), else a default palette
for the table's classes. The left half is the prediction; with a label the right half is the ground truth
over the same image (label pixels outside the classes, e.g. 255 = ignore, are darkened: blended with black).
"""
from __future__ import annotations

import logging

import numpy as np

from segmill.jobs.query import connect, literal, table_classes
from segmill.pipeline.common.images import decode_png, encode_png, overlay
from segmill.pipeline.common.storage import open_fs, redact

log = logging.getLogger(__name__)


def job_palette(results: str, classes: tuple[str, ...], *, endpoint_url: str | None = None) -> tuple[tuple[int, int, int], ...]:
    """The palette of the model that made the table; the default palette when that model cannot be read."""
    from segmill.models.spec import default_palette
    from segmill.pipeline.bulk.record import read_job_record
    from segmill.pipeline.common.model_source import resolve_model

    try:
        spec = read_job_record(results, endpoint_url)["spec"]
        resolved = resolve_model(spec["model"], endpoint_url=endpoint_url, tracking_uri=spec.get("tracking_uri"))
        if tuple(resolved.spec.classes) == tuple(classes):
            return resolved.spec.colours()
        log.warning("the job's model classes differ from the table's; using the default palette")
    except Exception as exc:  # the record or the model is gone: the picture is still worth drawing
        log.warning("using the default palette (%s)", redact(str(exc))[:200])
    return default_palette(len(classes))


def render(results: str, image_uri: str, *, endpoint_url: str | None = None,
           palette: tuple[tuple[int, int, int], ...] | None = None) -> np.ndarray:
    """HxW(x2 with a label)x3 uint8: the mask over the image, and the ground truth over it beside."""
    from segmill.pipeline.common.decode import decode_image, read_bytes

    con = connect(results, endpoint_url=endpoint_url)
    rows = con.sql(f"SELECT status, error, mask, label_uri FROM results WHERE image_uri = {literal(image_uri)} "
                   "ORDER BY processed_at DESC LIMIT 1").fetchall()
    if not rows:
        raise ValueError(f"Image {redact(image_uri)} has no row in results {redact(results)} (give image_uri exactly as stored).")
    status, error, mask_png, label_uri = rows[0]
    if status != "ok":
        raise ValueError(f"Image {redact(image_uri)} has no mask: its row is an error ({error}).")
    classes = table_classes(con)
    palette = palette or job_palette(results, classes, endpoint_url=endpoint_url)
    mask = decode_png(mask_png)
    image = decode_image(read_bytes(image_uri, endpoint_url), image_uri, max_pixels=mask.size + 1)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"Image {redact(image_uri)} is {image.shape[1]}x{image.shape[0]} now but its mask is "
                         f"{mask.shape[1]}x{mask.shape[0]}; the image changed since the job ran.")
    panels = [overlay(image, mask, palette)]
    if label_uri:
        label = decode_png(read_bytes(label_uri, endpoint_url, what="Label"))
        if label.shape != mask.shape:
            raise ValueError(f"Label {redact(label_uri)} is not the size of its image {redact(image_uri)}.")
        label = np.where(label < len(palette), label, len(palette)).astype(np.int64)  # ignore pixels: black
        panels.append(overlay(image, label, (*palette, (0, 0, 0))))
    return np.concatenate(panels, axis=1)


def write_png(picture: np.ndarray, output: str, *, endpoint_url: str | None = None) -> str:
    fs, path = open_fs(output, endpoint_url=endpoint_url)
    with fs.open(path, "wb") as f:
        f.write(encode_png(picture))
    return output
