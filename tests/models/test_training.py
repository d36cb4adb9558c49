"""The training recipe: a tiny U-Net learns a simple pattern; poly schedule, augmentation and loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from segmill.models import get_model
from segmill.models.training import (
    AUX_LOSS_WEIGHT,
    POLY_POWER,
    hard_pixel_cross_entropy,
    optimizer_with_poly,
    poly_lr_lambda,
    random_scale_crop_flip,
    segmentation_loss,
    train_step,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pattern_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32x32 images: a square on a background, and halves with a corner; one flat colour per class."""
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[0, 8:24, 8:24] = 1
    masks[1, :, 16:] = 1
    masks[1, 20:, :8] = 2
    colours = torch.tensor([[0.1, 0.2, 0.8], [0.9, 0.4, 0.1], [0.2, 0.8, 0.2]])
    return colours[masks].permute(0, 3, 1, 2).contiguous(), masks


def test_train_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    model = get_model("unet", num_classes=3, base_channels=8, depth=2)
    optimizer, scheduler = optimizer_with_poly(model, lr=0.05, total_steps=30)
    images, masks = pattern_batch()
    losses = [train_step(model, images, masks, optimizer, scheduler) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)  # poly schedule ran to its end


def test_train_step_refuses_a_non_finite_loss() -> None:
    torch.manual_seed(0)
    model = get_model("unet", num_classes=3, base_channels=8, depth=2)
    optimizer, _ = optimizer_with_poly(model, lr=0.05, total_steps=1)
    images, masks = pattern_batch()
    with pytest.raises(FloatingPointError, match="learning rate"):
        train_step(model, torch.full_like(images, float("nan")), masks, optimizer)


def test_poly_lr_lambda() -> None:
    factor = poly_lr_lambda(100)
    assert factor(0) == 1.0
    assert factor(50) == pytest.approx(0.5**POLY_POWER)
    assert factor(100) == 0.0
    assert factor(150) == 0.0  # never negative past the end
    assert poly_lr_lambda(10, power=1.0)(5) == pytest.approx(0.5)


def scene(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.rand(3, height, width) + 1.0, torch.randint(0, 4, (height, width))  # image > 0 everywhere


def test_random_scale_crop_flip_returns_crop_size() -> None:
    image, mask = scene(48, 64)
    generator = torch.Generator().manual_seed(0)
    for _ in range(10):
        out_image, out_mask = random_scale_crop_flip(image, mask, 40, generator=generator)
        assert out_image.shape == (3, 40, 40) and out_mask.shape == (40, 40)
        assert out_image.dtype == torch.float32 and out_mask.dtype == torch.long


def test_random_scale_crop_flip_pads_mask_with_ignore_index() -> None:
    image, mask = scene(10, 12)
    generator = torch.Generator().manual_seed(0)
    out_image, out_mask = random_scale_crop_flip(
        image, mask, 32, generator=generator, scale_range=(1.0, 1.0), ignore_index=99
    )
    assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
    padded = out_mask == 99
    assert padded.sum() == 32 * 32 - 10 * 12
    assert (out_mask[~padded] < 4).all()
    assert (out_image[:, padded] == 0).all() and (out_image[:, ~padded] > 0).all()  # image padded with zeros


def test_random_scale_crop_flip_flips_image_and_mask_together() -> None:
    image, mask = scene(16, 16)
    flipped = 0
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        out_image, out_mask = random_scale_crop_flip(image, mask, 16, generator=generator, scale_range=(1.0, 1.0))
        if torch.equal(out_mask, mask):
            assert torch.equal(out_image, image)
        else:
            flipped += 1
            assert torch.equal(out_mask, mask.flip(-1)) and torch.equal(out_image, image.flip(-1))
    assert 0 < flipped < 8


def test_random_scale_crop_flip_is_deterministic_for_a_seeded_generator() -> None:
    image, mask = scene(48, 64)
    first = random_scale_crop_flip(image, mask, 40, generator=torch.Generator().manual_seed(7))
    again = random_scale_crop_flip(image, mask, 40, generator=torch.Generator().manual_seed(7))
    other = random_scale_crop_flip(image, mask, 40, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_segmentation_loss_adds_weighted_aux() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    out, aux = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    main = segmentation_loss({"out": out}, target)
    assert main == pytest.approx(F.cross_entropy(out, target).item())
    total = segmentation_loss({"out": out, "aux": aux}, target)
    assert AUX_LOSS_WEIGHT == 0.5
    assert total.item() == pytest.approx(main.item() + 0.5 * F.cross_entropy(aux, target).item())


def test_segmentation_loss_ignores_ignore_index_pixels() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (1, 8, 8))
    target[0, :4] = 255
    logits = torch.randn(1, 3, 8, 8)
    loss = segmentation_loss({"out": logits}, target)
    changed = logits.clone()
    changed[0, :, :4] = 100.0 * torch.randn(3, 4, 8)  # only where the target is ignored
    assert segmentation_loss({"out": changed}, target).item() == pytest.approx(loss.item())
    labelled = F.cross_entropy(logits[..., 4:, :], target[:, 4:])
    assert loss.item() == pytest.approx(labelled.item())


def test_hard_pixel_loss_keeps_only_the_hardest_share():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    target[0, 0] = 255
    assert torch.isclose(hard_pixel_cross_entropy(logits, target, 1.0), F.cross_entropy(logits, target, ignore_index=255))
    per_pixel = F.cross_entropy(logits, target, ignore_index=255, reduction="none")[target != 255]
    top = per_pixel.sort(descending=True).values[: int(np.ceil(per_pixel.numel() * 0.25))].mean()
    assert torch.isclose(hard_pixel_cross_entropy(logits, target, 0.25), top)
    ignored = hard_pixel_cross_entropy(logits.requires_grad_(), torch.full_like(target, 255), 0.5)
    ignored.backward()
    assert ignored.item() == 0 and logits.grad is not None


def test_class_weighted_loss_is_torchs_weighted_mean_and_an_all_ignore_batch_costs_nothing():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    target[0, :3] = 255
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    expected = F.cross_entropy(logits, target, weight=weights, ignore_index=255)
    torch.testing.assert_close(segmentation_loss({"out": logits}, target, class_weights=weights), expected)
    torch.testing.assert_close(segmentation_loss({"out": logits}, target), F.cross_entropy(logits, target, ignore_index=255))
    logits.requires_grad_()
    nothing = segmentation_loss({"out": logits}, torch.full_like(target, 255), class_weights=weights)
    nothing.backward()
    assert nothing.item() == 0 and logits.grad is not None


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_bf16_step_with_either_optimizer_learns(optimizer: str):
    torch.manual_seed(0)
    model = get_model("unet", num_classes=2, base_channels=4, depth=1)
    images, masks = torch.randn(2, 3, 16, 16), (torch.rand(2, 16, 16) > 0.5).long()
    opt, scheduler = optimizer_with_poly(model, lr=0.01 if optimizer == "adamw" else 0.1, total_steps=20,
                                         optimizer=optimizer)
    losses = [train_step(model, images, masks, opt, scheduler, autocast_dtype=torch.bfloat16) for _ in range(20)]
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="Optimizer 'lion'"):
        optimizer_with_poly(model, lr=0.1, total_steps=1, optimizer="lion")
