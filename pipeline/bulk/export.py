"""Optional PNG export beside the table: colour masks and overlays of mask on image."""
from __future__ import annotations

import hashlib
import logging
import posixpath

import numpy as np
import pyarrow as pa

from segmill.pipeline.bulk.rows import OK
from segmill.pipeline.common.decode import decode_image, read_bytes
from segmill.pipeline.common.images import colourise, decode_png, encode_png, overlay
from segmill.pipeline.common.pictures import legend_strip
from segmill.pipeline.common.storage import join_uri, open_fs, redact

log = logging.getLogger(__name__)


def png_key(image_uri: str) -> str:
    """A file name unique per image URI that still shows the image's own name."""
    stem = posixpath.splitext(posixpath.basename(image_uri))[0]
    return f"{stem}-{hashlib.sha256(image_uri.encode()).hexdigest()[:8]}.png"


def export_pngs(table: pa.Table, image_uris: list[str], output: str, palette: tuple[tuple[int, int, int], ...],
                classes: tuple[str, ...], *, endpoint_url: str | None) -> None:
    """Colour mask (class colours only, to be read back) and overlay with a legend of the class names under it,
    per ok row; `image_uris` are the readable (unredacted) URIs of the table's rows.

    An export failure is logged and skipped: the PNGs are a convenience, the table is the result.
    """
    fs, root = open_fs(output, endpoint_url=endpoint_url)
    strips: dict[int, np.ndarray] = {}  # one legend strip per image width
    for folder in ("masks", "overlays"):
        fs.makedirs(join_uri(root, "png", folder), exist_ok=True)
    for row, image_uri in zip(table.select(["image_uri", "status", "mask"]).to_pylist(), image_uris):
        if row["status"] != OK:
            continue
        try:
            mask = decode_png(row["mask"])
            image = decode_image(read_bytes(image_uri, endpoint_url), image_uri, max_pixels=mask.size + 1)
            key = png_key(row["image_uri"])
            if mask.shape[1] not in strips:
                strips[mask.shape[1]] = legend_strip(classes, palette, mask.shape[1])
            with_legend = np.concatenate([overlay(image, mask, palette), strips[mask.shape[1]]], axis=0)
            for folder, picture in (("masks", colourise(mask, palette)), ("overlays", with_legend)):
                with fs.open(join_uri(root, "png", folder, key), "wb") as f:
                    f.write(encode_png(picture))
        except Exception as exc:
            log.warning("PNG export of %s failed: %s", row["image_uri"], redact(str(exc)))
