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
    # Every BatchNorm here follows a conv; only the one in ASPP's image-pooling branch (its own forward) stays.
    assert remaining <= (1 if name.startswith("deeplabv3") else 0), f"{name}: {remaining} BatchNorms left unfolded"
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


def test_a_backbone_layer_whose_output_is_returned_keeps_its_own_output() -> None:
    from collections import OrderedDict

    from torchvision.models._utils import IntermediateLayerGetter

    torch.manual_seed(0)
    layers = OrderedDict(conv=nn.Conv2d(3, 4, 3), bn=nn.BatchNorm2d(4), conv2=nn.Conv2d(4, 4, 1), bn2=nn.BatchNorm2d(4))
    backbone = _with_trained_statistics(IntermediateLayerGetter(nn.Sequential(layers),
                                                                {"conv": "early", "bn2": "out"}))
    x = torch.randn(1, 3, 9, 9)
    with torch.no_grad():
        expected = backbone(x)
        assert fold_batchnorm(backbone) == 1  # conv2 + bn2; `conv`'s own output is returned, so its bn stays
        got = backbone(x)
    assert isinstance(backbone.bn, nn.BatchNorm2d) and isinstance(backbone.bn2, nn.Identity)
    for key in ("early", "out"):
        assert torch.allclose(got[key], expected[key], atol=1e-5)
