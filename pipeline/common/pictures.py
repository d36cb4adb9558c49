"""Pictures a person reads, drawn with matplotlib (Agg: no display needed) as PNG bytes.

`panels`: titled panels side by side (image, prediction, ground truth, where they differ) with a legend of the
class names and colours present, and a caption; `confusion`: a row-normalised confusion matrix with axis titles
and full class names; `bars` and `histogram` for reports. The colour blending itself is `images.overlay`
(numpy), since the bulk job's driver must not load torch for torchvision's drawing.
"""
from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

Palette = Sequence[tuple[int, int, int]]
DIFFER = (230, 25, 75)  # pixels where prediction and ground truth differ
PANEL_INCHES = 4.0
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: never a display, also on a laptop with one
    import matplotlib.pyplot as plt

    return plt


def _png(figure, image_format: str = "png") -> bytes:
    buffer = io.BytesIO()
    options = {"pil_kwargs": {"quality": 85}} if image_format == "jpeg" else {}
    figure.savefig(buffer, format=image_format, dpi=DPI, bbox_inches="tight", **options)
    _pyplot().close(figure)
    return buffer.getvalue()


def differences(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray, ignore: int) -> np.ndarray:
    """The image dimmed, with the labelled pixels the prediction gets wrong in red."""
    picture = (image.astype(np.float32) * 0.35).astype(np.uint8)
    wrong = (prediction != truth) & (truth != ignore)
    picture[wrong] = DIFFER
    return picture


def panels(pictures: Sequence[tuple[str, np.ndarray]], classes: Sequence[str], palette: Palette, *,
           present: Sequence[int] | None = None, caption: str | None = None, max_side: int | None = None,
           image_format: str = "png") -> bytes:
    """PNG (or JPEG): the titled pictures in one row, a legend of `present` classes (all by default), a caption.

    `max_side` scales the pictures down so the longer side of each is at most that many pixels, and JPEG keeps
    photographs small: a report's gallery.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    height, width = pictures[0][1].shape[:2]
    scale = min(1.0, max_side / max(height, width)) if max_side else 1.0
    inches = PANEL_INCHES * scale if max_side else PANEL_INCHES
    aspect = height / width
    figure, axes = plt.subplots(1, len(pictures), figsize=(inches * len(pictures), inches * aspect + 0.5),
                                squeeze=False)
    for axis, (title, picture) in zip(axes[0], pictures):
        axis.imshow(picture, interpolation="nearest")
        axis.set_title(title, fontsize=10)
        axis.axis("off")
    shown = range(len(classes)) if present is None else sorted(set(int(c) for c in present if c < len(classes)))
    handles = [Patch(facecolor=np.array(palette[c]) / 255, edgecolor="black", linewidth=0.5, label=classes[c])
               for c in shown]
    if any(title.startswith("where") for title, _ in pictures):
        handles.append(Patch(facecolor=np.array(DIFFER) / 255, label="prediction differs"))
    if handles:
        figure.legend(handles=handles, loc="upper center", ncol=min(len(handles), 8), fontsize=8, frameon=False,
                      bbox_to_anchor=(0.5, 0.08))
    if caption:
        figure.suptitle(caption, fontsize=10)
    return _png(figure, image_format)


def legend_strip(classes: Sequence[str], palette: Palette, width: int) -> np.ndarray:
    """A white strip `width` pixels wide naming each class beside its colour, to put under an exported overlay
    (drawn with Pillow: cheap enough for every image of a bulk job, which shares one strip per width)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = [(name, draw.textlength(name, font=font) + 26) for name in classes]
    rows, x = [[]], 4.0
    for name, size in entries:  # wrap onto as many rows as the width needs
        if x + size > width and rows[-1]:
            rows.append([])
            x = 4.0
        rows[-1].append(name)
        x += size
    strip = Image.new("RGB", (width, 18 * len(rows) + 4), "white")
    draw = ImageDraw.Draw(strip)
    for r, names in enumerate(rows):
        x = 4.0
        for name in names:
            colour = tuple(palette[list(classes).index(name)])
            draw.rectangle((x, 4 + 18 * r, x + 14, 16 + 18 * r), fill=colour, outline="black")
            draw.text((x + 18, 3 + 18 * r), name, fill="black", font=font)
            x += draw.textlength(name, font=font) + 26
    return np.asarray(strip)


def confusion(counts: Sequence[Sequence[int]], classes: Sequence[str], *, title: str | None = None) -> bytes:
    """PNG: each row (a true class) as shares of its labelled pixels over the predicted classes."""
    plt = _pyplot()
    counts = np.asarray(counts, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = max(4.0, 0.55 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(side + 1, side))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axis.set_xticks(range(len(classes)), labels=classes, rotation=45, ha="right", fontsize=8)
    axis.set_yticks(range(len(classes)), labels=classes, fontsize=8)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    if len(classes) <= 30:
        for i in range(len(classes)):
            for j in range(len(classes)):
                if counts[i].sum():
                    axis.text(j, i, f"{shares[i, j]:.2f}", ha="center", va="center", fontsize=7,
                              color="white" if shares[i, j] > 0.5 else "black")
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the true class's pixels")
    axis.set_title(title or "confusion matrix (rows sum to 1)")
    return _png(figure)


def bars(values: dict[str, Sequence[float]], labels: Sequence[str], *, title: str, xlabel: str,
         colours: Sequence[tuple[int, int, int]] | None = None) -> bytes:
    """PNG: horizontal bars per label, one series per key of `values` (e.g. champion and challenger IoU)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 0.32 * len(labels) * max(1, len(values)) + 1.2))
    height = 0.8 / max(1, len(values))
    for k, (name, series) in enumerate(values.items()):
        positions = np.arange(len(labels)) + k * height
        colour = [np.array(c) / 255 for c in colours] if colours and len(values) == 1 else None
        axis.barh(positions, np.nan_to_num(np.asarray(series, dtype=float)), height=height, label=name, color=colour)
    axis.set_yticks(np.arange(len(labels)) + height * (len(values) - 1) / 2, labels=labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel(xlabel)
    axis.set_title(title)
    if len(values) > 1:
        axis.legend(fontsize=8)
    return _png(figure)


def histogram(values: Sequence[float], *, title: str, xlabel: str, bins: int = 20,
              value_range: tuple[float, float] = (0.0, 1.0)) -> bytes:
    """PNG: a histogram of `values` (e.g. images' mean confidence)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3))
    axis.hist(np.asarray(values, dtype=float), bins=bins, range=value_range, color="#4363d8")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("images")
    axis.set_title(title)
    return _png(figure)
