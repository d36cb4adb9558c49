"""Read and decode images and labels on CPU: the one image decoder and the one label reader of every job.

Every failure is a DecodeError whose message is one sentence naming the file (a bulk job's error row).
"""
from __future__ import annotations

import io
import sys
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segmill.pipeline.common.storage import open_fs, redact

Image.MAX_IMAGE_PIXELS = None  # the pixel limit is ours (max_pixels), checked before any pixel is decoded
DEFAULT_MAX_PIXELS = 100_000_000  # ~10k x 10k; larger images are usually decompression bombs or need tiling offline
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


INPUT, INFRASTRUCTURE = "input", "infrastructure"  # whose fault an error is: the file's, or the machinery's


class DecodeError(ValueError):
    """An input that cannot become an image row; its message is the row's `error`, its `kind` the row's
    `error_kind`: the input's fault (an unreadable or wrong file), or the infrastructure's (storage that failed to
    answer), which the next run of the job retries."""

    def __init__(self, message: str, kind: str = INPUT) -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keeps `kind` across processes (Ray tasks, the model check's pool)
        return type(self), (str(self), self.kind)


def read_bytes(uri: str, endpoint_url: str | None = None, *, what: str = "") -> bytes:
    """The file's bytes; a one-sentence DecodeError when it cannot be read (`what`, e.g. "Label", prefixes it)."""
    try:
        fs, path = open_fs(uri, endpoint_url=endpoint_url)
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DecodeError(f"{what} {redact(uri)} was not found.".lstrip()) from None
    except PermissionError as exc:
        raise DecodeError(f"{what} {redact(uri)} cannot be read: permission denied ({exc}).".lstrip()) from None
    except Exception as exc:  # network, throttling, a storage outage: the reason goes into the row, retried later
        reason = f"{type(exc).__name__}: {redact(str(exc))[:200]}"
        raise DecodeError(f"{what} {redact(uri)} could not be read ({reason}).".lstrip(), INFRASTRUCTURE) from None


def open_image(data: bytes, uri: str, max_pixels: int) -> Image.Image:
    if not data:
        raise DecodeError(f"{redact(uri)} is empty (0 bytes).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DecodeError(f"{redact(uri)} is not a readable image file.") from None
    width, height = image.size
    if width * height > max_pixels:
        raise DecodeError(
            f"{redact(uri)} has {width}x{height} pixels, over the limit of {max_pixels:,}; raise max_pixels to allow it."
        )
    return image


def decode_image(data: bytes, uri: str, max_pixels: int) -> np.ndarray:
    """HxWx3 uint8 RGB with EXIF orientation applied; grey, palette, alpha, CMYK and 16-bit become RGB."""
    image = open_image(data, uri, max_pixels)
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return np.ascontiguousarray(_to_rgb(image, uri))
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"{redact(uri)} is truncated or corrupt ({str(exc)[:120]}).") from None


def _to_rgb(image: Image.Image, uri: str) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.int64)
        grey = np.clip(values >> 8, 0, 255).astype(np.uint8) if values.max(initial=0) > 255 else values.astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode not in _CONVERTIBLE_MODES:
        raise DecodeError(f"{redact(uri)} has unsupported pixel mode {image.mode}.")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)  # transparent pixels become black, not undefined
    return np.asarray(image.convert("RGB"))


LABEL_MODES = frozenset({"1", "L", "P", "I;16", "I;16B", "I;16L", "I"})  # single-channel class indices


def read_label(data: bytes, uri: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A label file's class indices as stored (HxW); with `shape`, its size must be that, checked before decoding.

    The one label reader: the bulk job, training and the class index all go through it, so a label one of them
    rejects is rejected by all, with the same sentence.
    """
    image = open_image(data, uri, max_pixels=sys.maxsize)  # no pixel limit: a label's size is its image's
    if shape is not None and (image.height, image.width) != shape:
        raise DecodeError(
            f"Label {redact(uri)} is {image.width}x{image.height} but its image is {shape[1]}x{shape[0]}."
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise DecodeError(f"Label {redact(uri)} is truncated or corrupt ({str(exc)[:120]}).") from None
    if image.mode not in LABEL_MODES:
        raise DecodeError(f"Label {redact(uri)} has mode {image.mode}; labels must be single-channel class indices.")
    label = np.asarray(image)
    return label.astype(np.uint8) if label.dtype == bool else label


def check_label_values(values: np.ndarray, uri: str, num_classes: int, ignore_index: int) -> None:
    """Every value of `values` (a label's distinct values) is a class id or the ignore index."""
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    if bad.size:
        raise DecodeError(f"Label {redact(uri)} holds class values {bad[:5].tolist()} outside the {num_classes} "
                          f"classes (ignore index {ignore_index}); remap them or fix the class file.")


def label_dtype(num_classes: int, ignore_index: int) -> type:
    """The dtype that holds every class id and the ignore index: uint8 where it can, else uint16 (16-bit labels)."""
    return np.uint8 if max(num_classes - 1, ignore_index) <= 255 else np.uint16


def decode_label(data: bytes, uri: str, shape: tuple[int, int], num_classes: int, ignore_index: int) -> np.ndarray:
    """HxW class indices (`label_dtype`); wrong size, colour labels or values outside the classes (negative ones
    included) raise DecodeError."""
    label = read_label(data, uri, shape)
    check_label_values(np.unique(label), uri, num_classes, ignore_index)
    return label.astype(label_dtype(num_classes, ignore_index))


def label_class_pixels(data: bytes, uri: str, num_classes: int, ignore_index: int) -> np.ndarray:
    """Pixel count per class (int64 [num_classes]) of a label; DecodeError when it cannot be used."""
    label = read_label(data, uri).ravel()
    if label.dtype == np.uint8:  # bincount is several times faster than unique on 8-bit labels
        counts = np.bincount(label, minlength=256)
        values = np.flatnonzero(counts)
        counts = counts[values]
    else:
        values, counts = np.unique(label, return_counts=True)
    check_label_values(values, uri, num_classes, ignore_index)
    pixels = np.zeros(num_classes, dtype=np.int64)
    inside = (values >= 0) & (values < num_classes)
    pixels[values[inside].astype(np.int64)] = counts[inside]
    return pixels
