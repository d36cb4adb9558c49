"""One image of a results table as a picture: the image, its stored mask over it, and with a label the ground
truth over it and where the two differ; titled panels, a legend of the classes present, a caption with the
image's mIoU and mean confidence.

The palette is the model's (from the checkpoint named in the job record `_job.json`), else a default palette
for the table's classes. Label pixels outside the classes (e.g. 255 = ignore) are darkened: blended with black.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from segmill.jobs.query import connect, literal, table_classes
from segmill.pipeline.common import pictures
from segmill.pipeline.common.images import decode_png, overlay
from segmill.pipeline.common.pictures import differences
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


@dataclass(frozen=True)
class Shown:
    """One image of a results table as panels: (title, HxWx3 picture) each, the classes present, a caption."""

    panels: list[tuple[str, np.ndarray]]
    present: list[int]
    caption: str


def shown(con, image_uri: str, classes: tuple[str, ...], palette, *, endpoint_url: str | None = None) -> Shown:
    """The image; its prediction over it; with a label, the ground truth over it and where the two differ."""
    from segmill.pipeline.common.decode import decode_image, read_bytes

    rows = con.sql(f"SELECT status, error, mask, label_uri, miou, confidence_mean FROM results "
                   f"WHERE image_uri = {literal(image_uri)} ORDER BY processed_at DESC LIMIT 1").fetchall()
    if not rows:
        raise ValueError(f"Image {redact(image_uri)} has no row in the results (give image_uri as stored, or the "
                         "path as given to segment).")
    status, error, mask_png, label_uri, miou, confidence = rows[0]
    if status != "ok":
        raise ValueError(f"Image {redact(image_uri)} has no mask: its row is an error ({error}).")
    mask = decode_png(mask_png)
    image = decode_image(read_bytes(image_uri, endpoint_url), image_uri, max_pixels=mask.size + 1)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"Image {redact(image_uri)} is {image.shape[1]}x{image.shape[0]} now but its mask is "
                         f"{mask.shape[1]}x{mask.shape[0]}; the image changed since the job ran.")
    panels = [("image", image), ("prediction", overlay(image, mask, palette))]
    present = set(np.unique(mask).tolist())
    name = image_uri.rstrip("/").rsplit("/", 1)[-1]
    caption = f"{name}: mean confidence {confidence:.3f}"
    if label_uri:
        label = decode_png(read_bytes(label_uri, endpoint_url, what="Label"))
        if label.shape != mask.shape:
            raise ValueError(f"Label {redact(label_uri)} is not the size of its image {redact(image_uri)}.")
        ignore = len(palette)
        label = np.where(label < len(palette), label, ignore).astype(np.int64)  # ignore pixels: black
        panels.append(("ground truth", overlay(image, label, (*palette, (0, 0, 0)))))
        panels.append(("where they differ", differences(image, mask, label, ignore)))
        present |= set(np.unique(label[label != ignore]).tolist())
        caption += f", image mIoU {miou:.3f}" if miou is not None else ", no labelled pixel"
    return Shown(panels, sorted(present), caption)


def render(results: str, image_uri: str, *, endpoint_url: str | None = None, max_side: int | None = None) -> bytes:
    """PNG of `shown`: titled panels, a legend of the classes present, the caption."""
    con = connect(results, endpoint_url=endpoint_url)
    classes = table_classes(con)
    palette = job_palette(results, classes, endpoint_url=endpoint_url)
    found = shown(con, resolve_image_uri(con, image_uri), classes, palette, endpoint_url=endpoint_url)
    return pictures.panels(found.panels, classes, palette, present=found.present, caption=found.caption,
                           max_side=max_side)


def resolve_image_uri(con, given: str) -> str:
    """`given` as stored in the table: exactly, else as `segment` resolves a local path (absolute), else the one
    row whose URI ends with it (a file name or a relative path)."""
    import os

    from segmill.pipeline.common.storage import protocol_of

    candidates = [given]
    if protocol_of(given) == "file":
        candidates += [os.path.abspath(given.removeprefix("file://")), "file://" + os.path.abspath(given.removeprefix("file://"))]
    for candidate in candidates:
        if con.sql(f"SELECT 1 FROM results WHERE image_uri = {literal(candidate)} LIMIT 1").fetchall():
            return candidate
    suffix = "/" + given.lstrip("./")
    found = con.sql(f"SELECT DISTINCT image_uri FROM results WHERE suffix(image_uri, {literal(suffix)}) LIMIT 2").fetchall()
    return found[0][0] if len(found) == 1 else given


def write_png(picture: bytes, output: str, *, endpoint_url: str | None = None) -> str:
    fs, path = open_fs(output, endpoint_url=endpoint_url)
    with fs.open(path, "wb") as f:
        f.write(picture)
    return output
