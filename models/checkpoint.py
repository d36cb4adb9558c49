"""Saved models: a state dict plus a small spec, rebuilt from the registry on load.

A checkpoint file holds only tensors and plain values (`{"format": ..., "spec": {...}, "state_dict": {...}}`)
and is read with `torch.load(weights_only=True)`, so loading one never executes pickled code.
"""
from __future__ import annotations

import io
import os
from typing import BinaryIO

import torch
from torch import nn

from segmill.models.spec import ModelSpec, default_palette  # noqa: F401 (re-exported: the checkpoint's spec)

CHECKPOINT_FORMAT = "segmill-checkpoint-v1"


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


def save_random_checkpoint(target: str | os.PathLike | BinaryIO, spec: ModelSpec, *, seed: int = 0,
                           sharpen: float = 20.0) -> None:
    """Save a seeded random-weight model of `spec`, for benchmarks and tests that need a model but no training.

    The class-score convolutions are scaled by `sharpen` (and their bias zeroed): a random head's bias would
    otherwise decide nearly every pixel, and masks of one class prove little when compared.
    """
    torch.manual_seed(seed)
    model = spec.build()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and module.out_channels == spec.num_classes:
                module.weight.mul_(sharpen)
                if module.bias is not None:
                    module.bias.zero_()
    save_checkpoint(target, model, spec)
