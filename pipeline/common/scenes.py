"""A deterministic generator of labelled street-like scenes, written to any fsspec URI.

Each scene has sky, road, buildings, vegetation and vehicles, and sometimes the rare, small classes
`pole` and `sign` (thin and tiny, as poles and signs are in street scenes). Colours are jittered per
image and noisy per pixel so a model must look at shape and context, not only one pixel's value.
The same (seed, index) always gives the same scene, on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from segmill.pipeline.common.images import encode_png
from segmill.pipeline.common.storage import join_uri, open_fs

SCENE_CLASSES: tuple[str, ...] = ("sky", "road", "building", "vegetation", "vehicle", "pole", "sign")
SCENE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (70, 130, 180), (128, 64, 128), (70, 70, 70), (107, 142, 35), (0, 0, 142), (153, 153, 153), (220, 220, 0),
)
_BASE_COLOUR = np.array(
    [(135, 180, 225), (90, 90, 95), (150, 110, 90), (60, 130, 50), (180, 30, 40), (230, 200, 60), (240, 240, 240)],
    dtype=np.float32,
)
POLE_PROBABILITY = 0.35
SIGN_PROBABILITY = 0.5  # of scenes that have a pole


@dataclass(frozen=True)
class SceneSpec:
    """Size range of generated scenes (pixels)."""

    min_side: int = 96
    max_side: int = 256


def render_scene(seed: int, index: int, spec: SceneSpec = SceneSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Return (image HxWx3 uint8, mask HxW uint8 of class indices) for scene `index` of `seed`."""
    rng = np.random.default_rng([seed, index])
    height, width = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, size=2))
    mask = np.zeros((height, width), dtype=np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.6))
    _draw_road(mask, horizon, rng)
    _draw_buildings(mask, horizon, rng)
    _draw_vegetation(mask, horizon, rng)
    _draw_vehicles(mask, horizon, rng)
    if rng.random() < POLE_PROBABILITY:
        _draw_pole_and_sign(mask, horizon, rng)
    return _paint(mask, rng), mask


def _draw_road(mask: np.ndarray, horizon: int, rng: np.random.Generator) -> None:
    height, width = mask.shape
    rows = np.arange(horizon, height)
    spread = (rows - horizon + 1) / max(height - horizon, 1)
    centre = width * rng.uniform(0.35, 0.65)
    half = width * (0.08 + 0.6 * spread)
    cols = np.arange(width)
    mask[horizon:] = np.where(np.abs(cols[None, :] - centre) < half[:, None], 1, 3)


def _draw_buildings(mask: np.ndarray, horizon: int, rng: np.random.Generator) -> None:
    height, width = mask.shape
    for _ in range(rng.integers(1, 5)):
        x0 = int(rng.integers(0, width - 8))
        x1 = min(width, x0 + int(rng.integers(width // 8, width // 3 + 2)))
        top = int(rng.integers(height // 20, max(horizon - 4, height // 20 + 1)))
        mask[top : horizon + 2, x0:x1] = 2


def _draw_vegetation(mask: np.ndarray, horizon: int, rng: np.random.Generator) -> None:
    height, width = mask.shape
    yy, xx = np.mgrid[:height, :width]
    for _ in range(rng.integers(0, 4)):
        cy, cx = horizon - rng.integers(0, max(horizon // 3, 2)), rng.integers(0, width)
        ry, rx = rng.integers(6, height // 6 + 8), rng.integers(6, width // 8 + 8)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        mask[blob & (mask != 1)] = 3


def _draw_vehicles(mask: np.ndarray, horizon: int, rng: np.random.Generator) -> None:
    height, width = mask.shape
    for _ in range(rng.integers(0, 3)):
        y1 = int(rng.integers(horizon + (height - horizon) // 3, height))
        size = max(4, int((y1 - horizon) * rng.uniform(0.3, 0.6)))
        x0 = int(rng.integers(0, max(width - 2 * size, 1)))
        mask[max(y1 - size, horizon) : y1, x0 : x0 + 2 * size] = 4


def _draw_pole_and_sign(mask: np.ndarray, horizon: int, rng: np.random.Generator) -> None:
    height, width = mask.shape
    x = int(rng.integers(2, width - 4))
    bottom = int(rng.integers(horizon, height))
    top = int(rng.integers(max(bottom - height // 2, 1), max(bottom - 10, 2)))
    thickness = int(rng.integers(2, 4))
    mask[top:bottom, x : x + thickness] = 5
    if rng.random() < SIGN_PROBABILITY:
        side = int(rng.integers(5, 10))
        x0 = max(x - side // 2, 0)
        mask[max(top - side, 0) : top + 1, x0 : x0 + side + thickness] = 6


def _paint(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    jitter = rng.normal(0, 12, size=_BASE_COLOUR.shape).astype(np.float32)
    colours = np.clip(_BASE_COLOUR + jitter, 0, 255)
    image = colours[mask]
    image += rng.normal(0, 10, size=image.shape).astype(np.float32)
    shade = np.linspace(1.1, 0.85, mask.shape[0], dtype=np.float32)[:, None, None]
    return np.clip(image * shade, 0, 255).astype(np.uint8)


def write_scenes(uri: str, count: int, *, seed: int = 0, spec: SceneSpec = SceneSpec(), start: int = 0) -> list[str]:
    """Write `count` scenes as `URI/images/scene_NNNNN.png` and `URI/labels/scene_NNNNN.png`; return image URIs."""
    fs, root = open_fs(uri)
    fs.makedirs(join_uri(root, "images"), exist_ok=True)
    fs.makedirs(join_uri(root, "labels"), exist_ok=True)
    written = []
    for index in range(start, start + count):
        image, mask = render_scene(seed, index, spec)
        name = f"scene_{index:05d}.png"
        with fs.open(join_uri(root, "images", name), "wb") as f:
            f.write(encode_png(image))
        with fs.open(join_uri(root, "labels", name), "wb") as f:
            f.write(encode_png(mask))
        written.append(join_uri(uri, "images", name))
    with fs.open(join_uri(root, "classes.yaml"), "w") as f:
        f.write(classes_yaml())
    return written


def classes_yaml() -> str:
    """The class file of the generated scenes (names and colours), as the CLI reads it."""
    lines = ["classes:"]
    for name, (r, g, b) in zip(SCENE_CLASSES, SCENE_PALETTE):
        lines.append(f"  - {{name: {name}, colour: [{r}, {g}, {b}]}}")
    return "\n".join(lines) + "\n"
