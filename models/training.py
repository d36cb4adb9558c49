"""The training recipe's pure-torch parts: loss, poly learning rate, augmentation, one optimisation step.

Shared by the demo model and by the Ray Train loop, so a notebook trains exactly as the cluster does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segmill.models.spec import DEFAULT_IGNORE_INDEX

AUX_LOSS_WEIGHT = 0.5
POLY_POWER = 0.9


def segmentation_loss(
    outputs: dict[str, torch.Tensor], target: torch.Tensor, *, ignore_index: int = DEFAULT_IGNORE_INDEX, aux_weight: float = AUX_LOSS_WEIGHT,
    ohem_fraction: float | None = None,
) -> torch.Tensor:
    """Per-pixel cross-entropy on the logits at target size, plus the auxiliary head's loss when present.

    With `ohem_fraction`, only that share of the labelled pixels with the highest loss counts (online hard
    example mining, or bootstrapped cross-entropy), for the main and the auxiliary head alike.
    """
    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        if ohem_fraction is None:
            return F.cross_entropy(logits, target, ignore_index=ignore_index)
        return hard_pixel_cross_entropy(logits, target, ohem_fraction, ignore_index=ignore_index)

    loss = loss_of(outputs["out"])
    if "aux" in outputs:
        loss = loss + aux_weight * loss_of(outputs["aux"])
    return loss


def hard_pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, fraction: float, *,
                             ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of the `fraction` of labelled pixels with the highest loss (at least one pixel)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"The hard-pixel fraction must lie in (0, 1], got {fraction}.")
    per_pixel = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    labelled = per_pixel[target != ignore_index]
    if labelled.numel() == 0:
        return per_pixel.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) alive on an all-ignore batch
    kept = max(1, math.ceil(labelled.numel() * fraction))
    return labelled.topk(kept, sorted=False).values.mean()


def poly_lr_lambda(total_steps: int, power: float = POLY_POWER):
    """The poly schedule, lr * (1 - step/total)^power, as a LambdaLR factor."""
    return lambda step: max(0.0, 1.0 - step / max(total_steps, 1)) ** power


def sgd_with_poly(
    param_groups: list[dict] | nn.Module, *, lr: float, total_steps: int, momentum: float = 0.9, weight_decay: float = 1e-4
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = param_groups.parameters() if isinstance(param_groups, nn.Module) else param_groups
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lr_lambda(total_steps))


def random_scale_crop_flip(
    image: torch.Tensor,
    mask: torch.Tensor,
    crop: int,
    *,
    generator: torch.Generator,
    scale_range: tuple[float, float] = (0.5, 2.0),
    ignore_index: int = DEFAULT_IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one float image [3,H,W] and its mask [H,W]: random scale, pad (mask with ignore), crop, h-flip.

    The mask is resized with nearest neighbour only as part of augmentation; evaluation never resizes labels.
    """
    low, high = scale_range
    scale = low + (high - low) * torch.rand((), generator=generator).item()
    height, width = mask.shape
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
    mask = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long()
    pad_h, pad_w = max(crop - size[0], 0), max(crop - size[1], 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
        mask = F.pad(mask, (0, pad_w, 0, pad_h), value=ignore_index)
    top = int(torch.randint(0, image.shape[1] - crop + 1, (), generator=generator))
    left = int(torch.randint(0, image.shape[2] - crop + 1, (), generator=generator))
    image, mask = image[:, top : top + crop, left : left + crop], mask[top : top + crop, left : left + crop]
    if torch.rand((), generator=generator).item() < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    return image, mask


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    ohem_fraction: float | None = None,
) -> float:
    """One SGD step on a model already in training mode; returns the loss.

    The loss is read once (the step's one device synchronisation); a loss that is not finite raises before the
    weights change, since training on would be wasted.
    """
    loss = segmentation_loss(model(images), masks, ignore_index=ignore_index, ohem_fraction=ohem_fraction)
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"Training loss became {value}; lower the learning rate.")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return value
