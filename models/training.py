"""The training recipe's pure-torch parts: loss, poly learning rate, augmentation, one optimisation step.

Shared by the demo model and by the Ray Train loop, so a notebook trains exactly as the cluster does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from segmill.models.options import OPTIMIZERS
from segmill.models.spec import DEFAULT_IGNORE_INDEX

AUX_LOSS_WEIGHT = 0.5
POLY_POWER = 0.9


def segmentation_loss(
    outputs: dict[str, torch.Tensor], target: torch.Tensor, *, ignore_index: int = DEFAULT_IGNORE_INDEX,
    aux_weight: float = AUX_LOSS_WEIGHT, ohem_fraction: float | None = None, class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pixel cross-entropy on the logits at target size, plus the auxiliary head's loss when present.

    `class_weights` weigh each labelled pixel by its class (the loss is their weighted mean). With `ohem_fraction`,
    only that share of the labelled pixels with the highest (weighted) loss counts (online hard example mining, or
    bootstrapped cross-entropy), for the main and the auxiliary head alike. A batch with no labelled pixel has a
    loss of 0 (with a graph, so that DDP's gradient hooks still run).
    """
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        per_pixel = F.cross_entropy(logits.float(), safe_target, weight=class_weights, reduction="none") * valid
        if ohem_fraction is not None:
            return _hardest_share(per_pixel, valid, ohem_fraction)
        weight = class_weights[safe_target] * valid if class_weights is not None else valid.float()
        return per_pixel.sum() / weight.sum().clamp(min=torch.finfo(torch.float32).tiny)

    loss = loss_of(outputs["out"])
    if "aux" in outputs:
        loss = loss + aux_weight * loss_of(outputs["aux"])
    return loss


def hard_pixel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, fraction: float, *,
                             ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of the `fraction` of labelled pixels with the highest loss (at least one pixel)."""
    valid = target != ignore_index
    per_pixel = F.cross_entropy(logits, torch.where(valid, target, 0), reduction="none") * valid
    return _hardest_share(per_pixel, valid, fraction)


def _hardest_share(per_pixel: torch.Tensor, valid: torch.Tensor, fraction: float) -> torch.Tensor:
    if not 0 < fraction <= 1:
        raise ValueError(f"The hard-pixel fraction must lie in (0, 1], got {fraction}.")
    labelled = per_pixel[valid]
    if labelled.numel() == 0:
        return per_pixel.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) alive on an all-ignore batch
    kept = max(1, math.ceil(labelled.numel() * fraction))
    return labelled.topk(kept, sorted=False).values.mean()


def poly_lr_lambda(total_steps: int, power: float = POLY_POWER):
    """The poly schedule, lr * (1 - step/total)^power, as a LambdaLR factor."""
    return lambda step: max(0.0, 1.0 - step / max(total_steps, 1)) ** power


def optimizer_with_poly(
    param_groups: list[dict] | nn.Module, *, lr: float, total_steps: int, optimizer: str = "sgd",
    momentum: float = 0.9, weight_decay: float = 1e-4,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """SGD with momentum (the papers' recipe) or AdamW (beta1 = `momentum`), under the poly schedule."""
    params = param_groups.parameters() if isinstance(param_groups, nn.Module) else param_groups
    if optimizer == "sgd":
        built: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adamw":
        built = torch.optim.AdamW(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    else:
        raise ValueError(f"Optimizer {optimizer!r} must be one of {list(OPTIMIZERS)}.")
    return built, torch.optim.lr_scheduler.LambdaLR(built, poly_lr_lambda(total_steps))


def random_scale_crop_flip(
    image: torch.Tensor,
    mask: torch.Tensor,
    crop: int,
    *,
    generator: torch.Generator,
    scale_range: tuple[float, float] = (0.5, 2.0),
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    focus_class: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one float image [3,H,W] and its mask [H,W]: random scale, pad (mask with ignore), crop, h-flip.

    With `focus_class`, the crop is placed on a pixel of that class drawn uniformly from the scaled mask (anywhere
    in the crop's window), when the class is there; otherwise, and by default, the crop's place is uniform. The
    mask is resized with nearest neighbour only as part of augmentation; evaluation never resizes labels.
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
    top, left = _crop_corner(mask, crop, focus_class, generator)
    image, mask = image[:, top : top + crop, left : left + crop], mask[top : top + crop, left : left + crop]
    if torch.rand((), generator=generator).item() < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    return image, mask


def _crop_corner(mask: torch.Tensor, crop: int, focus_class: int | None,
                 generator: torch.Generator) -> tuple[int, int]:
    """Top-left corner of the crop: uniform, or so that the crop holds a uniformly drawn pixel of `focus_class`."""
    height, width = mask.shape
    if focus_class is not None:
        where = (mask == focus_class).nonzero()
        if len(where):
            y, x = where[int(torch.randint(0, len(where), (), generator=generator))].tolist()
            dy, dx = (int(v) for v in torch.randint(0, crop, (2,), generator=generator))
            return min(max(y - dy, 0), height - crop), min(max(x - dx, 0), width - crop)
    top = int(torch.randint(0, height - crop + 1, (), generator=generator))
    return top, int(torch.randint(0, width - crop + 1, (), generator=generator))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on `device`: "auto" is bf16 where the hardware computes it natively
    (a GPU that supports it, or a CPU with AVX512-BF16 or AMX), else fp32 (None)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"Training precision {precision!r} must be auto, fp32 or bf16.")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_has_native_bf16() else None


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: bf16 would likely be emulated, and slow
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    ohem_fraction: float | None = None,
    class_weights: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """One optimiser step on a model already in training mode; returns the loss.

    With `autocast_dtype` (bf16 on CPU, bf16 or fp16 on a GPU) the forward runs under autocast; the loss is taken
    in float32. The loss is read once (the step's one device synchronisation); a loss that is not finite raises
    before the weights change, since training on would be wasted.
    """
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        outputs = model(images)
    loss = segmentation_loss(outputs, masks, ignore_index=ignore_index, ohem_fraction=ohem_fraction,
                             class_weights=class_weights)
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"Training loss became {value}; lower the learning rate.")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return value
