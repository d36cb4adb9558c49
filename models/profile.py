"""Model size and cost: parameter counts and forward GFLOPs, for docs and for choosing an architecture."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from segmill.models.registry import get_model, list_models, model_paper


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not); buffers such as BatchNorm running stats are not counted."""
    return sum(p.numel() for p in model.parameters())


def measure_gflops(model: nn.Module, height: int = 512, width: int = 512) -> float:
    """GFLOPs of one forward pass on a batch of one 3-channel image, in eval mode under inference_mode.

    Counted by `torch.utils.flop_counter.FlopCounterMode`, which counts a multiply-add as 2 FLOPs and counts
    only matrix products and convolutions (no biases, activations, pooling or interpolation), so the value
    is about twice the "GMACs" many papers report. The input goes on the device of the model's parameters.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.inference_mode(), counter:
            model(torch.zeros(1, 3, height, width, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def model_table(names: list[str] | None = None, num_classes: int = 21, *, with_flops: bool = True) -> list[dict[str, Any]]:
    """One row per registered architecture: name, paper, params (millions) and GFLOPs at 512x512 (or None)."""
    rows = []
    for name in names if names is not None else list_models():
        model = get_model(name, num_classes=num_classes)
        rows.append(
            {
                "name": name,
                "paper": model_paper(name),
                "params": count_parameters(model) / 1e6,
                "gflops_512": measure_gflops(model, 512, 512) if with_flops else None,
            }
        )
    return rows
