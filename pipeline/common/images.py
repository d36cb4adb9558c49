"""Pictures as bytes and back: PNG encoding of masks and images, and colouring a mask over its image.

Torch-free (Pillow and numpy), so the bulk job's encode and commit workers use it without loading torch.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

OVERLAY_ALPHA = 0.5
# zlib level 1: several times faster than the default for masks of a few classes, and PNG is lossless at any level
FAST_PNG = 1


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    """An HxW (uint8/uint16) or HxWx3 uint8 array as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def colourise(mask: np.ndarray, palette: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    """HxW class indices as HxWx3 colours; values beyond the palette (e.g. an ignore index) are black."""
    table = np.zeros((max(len(palette), int(mask.max(initial=0)) + 1), 3), dtype=np.uint8)
    table[: len(palette)] = palette
    return table[mask]


def overlay(image: np.ndarray, mask: np.ndarray, palette: tuple[tuple[int, int, int], ...],
            alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend the colour mask over the image (both at the image's size)."""
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colourise(mask, palette).astype(np.float32)
    return blended.round().astype(np.uint8)
