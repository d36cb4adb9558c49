"""Saved models: a state dict plus a small spec, rebuilt from the registry on load.

A checkpoint file holds only tensors and plain values (`{"format": ..., "spec": {...}, "state_dict": {...}}`)
and is read with `torch.load(weights_only=True)`, so loading one never executes pickled code.
"""
from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import torch
from torch import nn

from segmill.models.predict import IMAGENET_MEAN, IMAGENET_STD
from segmill.models.registry import get_model

CHECKPOINT_FORMAT = "segmill-checkpoint-v1"


@dataclass(frozen=True)
class ModelSpec:
    """What it takes to rebuild a model and to read its output: architecture, arguments, classes."""

    arch: str
    classes: tuple[str, ...]
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    palette: tuple[tuple[int, int, int], ...] = ()
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    ignore_index: int = 255

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

    def build(self) -> nn.Module:
        """A freshly initialised model of this architecture (no pretrained weights)."""
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


def save_checkpoint(target: str | os.PathLike | BinaryIO, model: nn.Module, spec: ModelSpec) -> None:
    """Write weights and spec to a path or a binary file object (e.g. an fsspec file)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "spec": spec.to_dict(), "state_dict": state}, target)


def load_checkpoint(
    source: str | os.PathLike | BinaryIO | bytes, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model from the registry and load its weights safely; returns (model in eval mode, spec)."""
    name = source if isinstance(source, (str, os.PathLike)) else "<checkpoint bytes>"
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        payload = torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"Checkpoint {name} does not exist.") from None
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"Checkpoint {name} is not a readable segmill checkpoint ({exc.__class__.__name__}).") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"Checkpoint {name} is not a segmill checkpoint (no {CHECKPOINT_FORMAT!r} header).")
    spec = ModelSpec.from_dict(payload["spec"])
    model = spec.build()
    model.load_state_dict(payload["state_dict"])
    return model.eval(), spec
