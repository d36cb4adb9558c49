"""What a saved model is: architecture, arguments and classes; plain Python, no torch.

The bulk job's driver reads a model's spec to plan its stages and never loads torch (see
pipeline/model_source.py); building the network (`ModelSpec.build`) imports the registry then.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IGNORE_INDEX = 255  # label pixels with this value count for nothing (a class file may choose another)


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild a model and to read its output: architecture, arguments, classes."""

    arch: str
    classes: tuple[str, ...]
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    palette: tuple[tuple[int, int, int], ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = DEFAULT_IGNORE_INDEX

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError(f"Model spec for {self.arch!r} names no classes.")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"Model spec for {self.arch!r} has duplicate class names: {list(self.classes)}.")
        if self.palette and len(self.palette) != len(self.classes):
            raise ValueError(
                f"Model spec for {self.arch!r} has {len(self.palette)} palette colours for {len(self.classes)} classes."
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def colours(self) -> tuple[tuple[int, int, int], ...]:
        """The palette, or a deterministic default one when the spec has none."""
        return self.palette or default_palette(self.num_classes)

    def build(self) -> "nn.Module":
        """A freshly initialised model of this architecture (no pretrained weights)."""
        from segmill.models.registry import get_model

        kwargs = {k: v for k, v in self.arch_kwargs.items() if k not in ("backbone_weights", "weights")}
        return get_model(self.arch, num_classes=self.num_classes, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Model spec has unknown keys {sorted(unknown)}; expected a subset of {sorted(known)}.")
        data = dict(data)
        data["classes"] = tuple(data["classes"])
        data["palette"] = tuple(tuple(int(c) for c in rgb) for rgb in data.get("palette", ()))
        for key in ("mean", "std"):
            if key in data:
                data[key] = tuple(float(v) for v in data[key])
        return cls(**data)


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """PASCAL VOC's bit-interleaved palette: distinct, stable colours for any class count."""
    colours = []
    for index in range(num_classes):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        colours.append((r, g, b))
    return tuple(colours)


__all__ = ["DEFAULT_IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "ModelSpec", "default_palette"]
