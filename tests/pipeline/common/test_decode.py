"""Decoding on CPU without Ray: every mode becomes HxWx3 RGB, every bad file a one-sentence DecodeError."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmill.pipeline.common.decode import (
    DecodeError,
    decode_image,
    decode_label,
    read_bytes,
)
from segmill.pipeline.common.images import encode_png

MAX_PIXELS = 300 * 300


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _one_sentence(message: str, name: str) -> None:
    assert name in message, f"the message must name the file: {message!r}"
    assert "\n" not in message and message.endswith("."), f"not one sentence: {message!r}"


@pytest.mark.parametrize("kind", ["grey16", "rgba", "palette", "cmyk", "rotated"])
def test_convertible_modes_become_rgb(sample_files, kind: str) -> None:
    sample = sample_files[kind]
    image = decode_image(sample.data, f"/data/{sample.name}", MAX_PIXELS)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[:2] == sample.shape
    assert image.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("kind", ["empty", "notes", "truncated", "huge"])
def test_bad_files_raise_one_sentence_naming_the_file(sample_files, kind: str) -> None:
    sample = sample_files[kind]
    with pytest.raises(DecodeError) as info:
        decode_image(sample.data, f"/data/{sample.name}", MAX_PIXELS)
    assert sample.reason in str(info.value)
    _one_sentence(str(info.value), sample.name)


def test_sixteen_bit_grey_keeps_its_high_byte(sample_files) -> None:
    stored = np.asarray(Image.open(io.BytesIO(sample_files["grey16"].data))).astype(np.int64)
    image = decode_image(sample_files["grey16"].data, "grey16.png", MAX_PIXELS)
    assert stored.max() > 255
    np.testing.assert_array_equal(image[..., 0], (stored >> 8).astype(np.uint8))
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()


def test_eight_bit_values_in_a_sixteen_bit_file_are_kept() -> None:
    values = np.arange(200, dtype=np.uint16).reshape(10, 20)
    image = decode_image(_encode(Image.fromarray(values), "PNG"), "low16.png", MAX_PIXELS)
    np.testing.assert_array_equal(image[..., 0], values.astype(np.uint8))


def test_transparent_pixels_become_black(sample_files) -> None:
    image = decode_image(sample_files["rgba"].data, "rgba.png", MAX_PIXELS)
    assert (image[:, :25] == 0).all()  # alpha 0
    assert (image[:, 25:] == 200).all()  # opaque


def test_palette_with_transparency_is_composited() -> None:
    palette = Image.new("P", (8, 6), 1)
    palette.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    palette.info["transparency"] = 0
    palette.putpixel((0, 0), 0)
    image = decode_image(_encode(palette, "PNG", transparency=0), "p.png", MAX_PIXELS)
    assert tuple(image[0, 0]) == (0, 0, 0) and tuple(image[1, 1]) == (40, 50, 60)


def test_exif_orientation_is_applied(sample_files) -> None:
    # Stored 60 wide x 40 high, top half red and bottom half blue; displayed after a 90-degree clockwise turn:
    # 40 wide x 60 high, with red on the right and blue on the left.
    image = decode_image(sample_files["rotated"].data, "rotated.jpg", MAX_PIXELS).astype(int)
    assert image.shape == (60, 40, 3)
    right, left = image[:, 25:].mean((0, 1)), image[:, :15].mean((0, 1))
    assert right[0] > 200 and right[2] < 60, right
    assert left[2] > 200 and left[0] < 60, left


def test_cmyk_is_converted_to_rgb(sample_files) -> None:
    image = decode_image(sample_files["cmyk"].data, "cmyk.jpg", MAX_PIXELS).astype(int)
    red = image.mean((0, 1))  # C=0, M=Y=255, K=0 is red
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red


@pytest.mark.parametrize("mode, fmt", [("L", "PNG"), ("1", "PNG"), ("LA", "PNG"), ("RGB", "BMP"), ("RGB", "TIFF"),
                                       ("RGB", "WEBP"), ("RGB", "JPEG")])
def test_other_modes_and_formats(mode: str, fmt: str) -> None:
    image = decode_image(_encode(Image.new(mode, (21, 13)), fmt), f"x.{fmt.lower()}", MAX_PIXELS)
    assert image.shape == (13, 21, 3) and image.dtype == np.uint8


def test_rgb_pixels_are_unchanged() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_png(rgb), "rgb.png", MAX_PIXELS), rgb)


def test_the_pixel_limit_is_checked_before_decoding() -> None:
    at_limit = _encode(Image.new("RGB", (300, 300)), "PNG")
    assert decode_image(at_limit, "ok.png", MAX_PIXELS).shape == (300, 300, 3)
    with pytest.raises(DecodeError, match="301x300 pixels, over the limit of 90,000"):
        decode_image(_encode(Image.new("RGB", (301, 300)), "PNG"), "big.png", MAX_PIXELS)


# Labels


def _label(values: np.ndarray) -> bytes:
    return _encode(Image.fromarray(values), "PNG")


def test_label_values_come_back_as_uint8() -> None:
    values = np.array([[0, 1, 6], [255, 2, 3]], dtype=np.uint8)  # 255: ignore index
    label = decode_label(_label(values), "l.png", (2, 3), 7, 255)
    assert label.dtype == np.uint8
    np.testing.assert_array_equal(label, values)


@pytest.mark.parametrize("mode", ["P", "1", "I;16"])
def test_single_channel_label_modes(mode: str) -> None:
    values = np.array([[0, 1], [1, 0]], dtype=np.uint8)
    if mode == "I;16":
        image = Image.fromarray(values.astype(np.uint16))
    else:
        image = Image.fromarray(values * (255 if mode == "1" else 1)).convert(mode)
    label = decode_label(_encode(image, "PNG"), "l.png", (2, 2), 2, 255)
    np.testing.assert_array_equal(label, values)


def test_label_outside_the_classes_is_an_error() -> None:
    with pytest.raises(DecodeError) as info:
        decode_label(_label(np.array([[0, 9], [3, 9]], np.uint8)), "/labels/a.png", (2, 2), 7, 255)
    assert "[9]" in str(info.value) and "7 classes" in str(info.value)
    _one_sentence(str(info.value), "a.png")


@pytest.mark.parametrize("size", [(10, 12), (120, 100)])  # smaller, and larger (not a pixel-limit message)
def test_label_of_the_wrong_size_is_an_error(size: tuple[int, int]) -> None:
    with pytest.raises(DecodeError) as info:
        decode_label(_label(np.zeros(size, np.uint8)), "/labels/b.png", (20, 30), 7, 255)
    assert f"is {size[1]}x{size[0]} but its image is 30x20" in str(info.value)
    _one_sentence(str(info.value), "b.png")


def test_colour_label_is_an_error() -> None:
    with pytest.raises(DecodeError, match="mode RGB; labels must be single-channel"):
        decode_label(_encode(Image.new("RGB", (3, 2)), "PNG"), "c.png", (2, 3), 7, 255)


@pytest.mark.parametrize("data, phrase", [(b"", "empty"), (b"not a png", "not a readable image")])
def test_unreadable_label_is_an_error(data: bytes, phrase: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_label(data, "/labels/d.png", (2, 3), 7, 255)
    assert phrase in str(info.value)
    _one_sentence(str(info.value), "d.png")


def test_truncated_label_is_an_error() -> None:
    data = _label(np.random.default_rng(1).integers(0, 7, (64, 64), dtype=np.uint8))
    with pytest.raises(DecodeError, match="truncated or corrupt"):
        decode_label(data[: len(data) // 2], "t.png", (64, 64), 7, 255)


# Reading bytes


def test_read_bytes_of_a_local_file(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"abc")
    assert read_bytes(str(tmp_path / "a.png")) == b"abc"
    assert read_bytes(f"file://{tmp_path / 'a.png'}") == b"abc"


def test_read_bytes_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DecodeError) as info:
        read_bytes(str(tmp_path / "gone.png"))
    assert str(info.value) == f"{tmp_path / 'gone.png'} was not found."
    with pytest.raises(DecodeError) as info:
        read_bytes(str(tmp_path / "gone.png"), what="Label")
    assert str(info.value) == f"Label {tmp_path / 'gone.png'} was not found."


def test_read_bytes_of_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(DecodeError) as info:
        read_bytes(str(tmp_path / "dir.png"))
    _one_sentence(str(info.value), "dir.png")


def test_read_bytes_never_repeats_credentials() -> None:
    with pytest.raises(DecodeError) as info:
        read_bytes("https://alice:s3cr3t@127.0.0.1:9/x.png?token=abc")
    assert "s3cr3t" not in str(info.value) and "abc" not in str(info.value)


def test_blank_manifest_cells_mean_no_label(tmp_path) -> None:
    from segmill.pipeline.common.listing import iter_image_batches

    manifest = tmp_path / "m.csv"
    manifest.write_text("image_uri,label_uri\na.png,a_label.png\nb.png,\n")
    table = next(iter_image_batches(str(manifest)))
    assert table.to_pylist() == [{"image_uri": "a.png", "label_uri": "a_label.png"},
                                 {"image_uri": "b.png", "label_uri": None}]
