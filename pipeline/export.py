"""Optional PNG export beside the table: colour masks and overlays of mask on image."""
from __future__ import annotations

import hashlib
import io
import posixpath

import numpy as np
import pyarrow as pa
from PIL import Image

from segmill.pipeline.decode import decode_image, read_bytes
from segmill.pipeline.results import OK, decode_mask_png
from segmill.pipeline.storage import join_uri, open_fs

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


def export_pngs(table: pa.Table, output: str, palette: tuple[tuple[int, int, int], ...], *,
                endpoint_url: str | None) -> None:
    fs, root = open_fs(output, endpoint_url=endpoint_url)
    for folder in ("masks", "overlays"):
        fs.makedirs(join_uri(root, "png", folder), exist_ok=True)
    rows = table.select(["image_uri", "status", "mask"]).to_pylist()
    for row in rows:
        if row["status"] != OK:
            continue
        mask = decode_mask_png(row["mask"])
        image = decode_image(read_bytes(row["image_uri"], endpoint_url), row["image_uri"], max_pixels=mask.size + 1)
        key = png_key(row["image_uri"])
        _save(fs, join_uri(root, "png", "masks", key), colourise(mask, palette))
        _save(fs, join_uri(root, "png", "overlays", key), overlay(image, mask, palette))


def _save(fs, path: str, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    with fs.open(path, "wb") as f:
        f.write(buffer.getvalue())
