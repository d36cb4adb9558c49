"""Folding BatchNorm into convolutions: the same logits to rounding, on every family that has BatchNorm."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from segmill.models import get_model
from segmill.models.fold import fold_batchnorm

# One model per structure the folder handles: torchvision Conv2dNormActivation (MobileNetV3, LR-ASPP), ResNet
# blocks and ASPP (DeepLabv3-ResNet50), segmill's U-Net (an nn.Sequential subclass) and SegNet (VGG-BN, unpooling).
FAMILIES = ["lraspp_mobilenet_v3_large", "deeplabv3_resnet50", "unet", "segnet_vgg16"]


def _with_trained_statistics(model: nn.Module) -> nn.Module:
    """Fresh BatchNorms hold mean 0, variance 1, weight 1, bias 0, which fold to nothing: make them non-trivial."""
    generator = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            shape = m.running_mean.shape
            m.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            m.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            m.bias.data.copy_(torch.randn(shape, generator=generator) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_folded_model_gives_the_same_logits(name: str) -> None:
    torch.manual_seed(0)
    model = _with_trained_statistics(get_model(name, num_classes=3))
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded_model = copy.deepcopy(model)
    folded = fold_batchnorm(folded_model)
    remaining = sum(isinstance(m, nn.BatchNorm2d) for m in folded_model.modules())
    assert folded > 0 and remaining == batchnorms - folded
    # Only U-Net/SegNet/ResNet/MobileNet BatchNorms that follow a conv exist here; each of them must be folded.
    assert remaining <= batchnorms // 10, f"{name}: {remaining} of {batchnorms} BatchNorms left unfolded"
    x = torch.randn(2, 3, 67, 93)
    with torch.no_grad():
        expected, got = model(x)["out"], folded_model(x)["out"]
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    assert (got.argmax(1) == expected.argmax(1)).float().mean() >= 0.999


def test_folding_needs_eval_mode_and_leaves_other_layers_alone() -> None:
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(get_model("unet", num_classes=2))
    # A BatchNorm after a pooling layer, or in a module with its own forward, is not a conv's: left as it is.
    class Custom(nn.Sequential):
        def forward(self, x):
            return self[1](self[0](x)) + x

    model = nn.Sequential(nn.MaxPool2d(2), nn.BatchNorm2d(3), Custom(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))).eval()
    assert fold_batchnorm(model) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
