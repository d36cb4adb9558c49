"""Optional PNG export beside the table: colour masks and overlays of mask on image."""
from __future__ import annotations

import hashlib
import logging
import io
import posixpath

import numpy as np
import pyarrow as pa
from PIL import Image

from segmill.pipeline.decode import decode_image, read_bytes
from segmill.pipeline.results import OK, decode_mask_png
from segmill.pipeline.storage import join_uri, open_fs, redact

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.5


def colourise(mask: np.ndarray, palette: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    table = np.zeros((max(len(palette), int(mask.max(initial=0)) + 1), 3), dtype=np.uint8)
    table[: len(palette)] = palette
    return table[mask]


def overlay(image: np.ndarray, mask: np.ndarray, palette: tuple[tuple[int, int, int], ...],
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend the colour mask over the image (both at the image's size)."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colourise(mask, palette).astype(np.float32)
    return blended.round().astype(np.uint8)


def png_key(image_uri: str) -> str:
    """A file name unique per image URI that still shows the image's own name."""
    stem = posixpath.splitext(posixpath.basename(image_uri))[0]
    return f"{stem}-{hashlib.sha256(image_uri.encode()).hexdigest()[:8]}.png"


def export_pngs(table: pa.Table, image_uris: list[str], output: str, palette: tuple[tuple[int, int, int], ...], *,
                endpoint_url: str | None) -> None:
    """Colour mask and overlay per ok row; `image_uris` are the readable (unredacted) URIs of the table's rows.

    An export failure is logged and skipped: the PNGs are a convenience, the table is the result.
    """
    fs, root = open_fs(output, endpoint_url=endpoint_url)
    for folder in ("masks", "overlays"):
        fs.makedirs(join_uri(root, "png", folder), exist_ok=True)
    for row, image_uri in zip(table.select(["image_uri", "status", "mask"]).to_pylist(), image_uris):
        if row["status"] != OK:
            continue
        try:
            mask = decode_mask_png(row["mask"])
            image = decode_image(read_bytes(image_uri, endpoint_url), image_uri, max_pixels=mask.size + 1)
            key = png_key(row["image_uri"])
            _save(fs, join_uri(root, "png", "masks", key), colourise(mask, palette))
            _save(fs, join_uri(root, "png", "overlays", key), overlay(image, mask, palette))
        except Exception as exc:
            log.warning("PNG export of %s failed: %s", row["image_uri"], redact(str(exc)))


def _save(fs, path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    with fs.open(path, "wb") as f:
        f.write(buffer.getvalue())
