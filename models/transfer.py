"""Transfer learning helpers: freeze a pretrained backbone, and give it a lower learning rate than new layers.

Every segmill model keeps its pretrained-able parameters in `model.backbone` and its new layers elsewhere,
which is all these helpers rely on.

Frozen BatchNorm: `freeze_backbone` stops gradients and puts the backbone's BatchNorm layers in eval mode so
their running statistics stop moving too. `model.train()` switches them back to training mode, so a training
loop with a frozen backbone calls `set_backbone_bn_eval(model)` after every `model.train()`.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _backbone(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"Model {type(model).__name__} has no `backbone` module; segmill models all have one.")
    return backbone


def set_backbone_bn_eval(model: nn.Module) -> None:
    """Put the backbone's BatchNorm layers in eval mode (use stored statistics, stop updating them)."""
    for module in _backbone(model).modules():
        if isinstance(module, _BatchNorm):
            module.eval()


def freeze_backbone(model: nn.Module) -> nn.Module:
    """Stop training the backbone: no gradients, BatchNorm in eval mode. Returns the model for chaining."""
    _backbone(model).requires_grad_(False)
    set_backbone_bn_eval(model)
    return model


def unfreeze_backbone(model: nn.Module) -> nn.Module:
    """Train the backbone again (BatchNorm follows `model.train()` / `model.eval()` from here on)."""
    backbone = _backbone(model)
    backbone.requires_grad_(True)
    backbone.train(model.training)
    return model


def param_groups(
    model: nn.Module, lr: float, backbone_lr_mult: float = 0.1, weight_decay: float = 1e-4
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: backbone at `lr * backbone_lr_mult`, the rest at `lr`.

    Parameters that do not require gradients (a frozen backbone, fixed upsampling kernels) are left out;
    empty groups are dropped. Each group carries a "name" ("backbone" or "head") for logging.
    """
    backbone_ids = {id(p) for p in _backbone(model).parameters()}
    backbone, head = [], []
    for p in model.parameters():
        if p.requires_grad:
            (backbone if id(p) in backbone_ids else head).append(p)
    groups = [
        {"name": "backbone", "params": backbone, "lr": lr * backbone_lr_mult, "weight_decay": weight_decay},
        {"name": "head", "params": head, "lr": lr, "weight_decay": weight_decay},
    ]
    return [g for g in groups if g["params"]]
