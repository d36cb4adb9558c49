"""FCN (Long et al. 2015): FCN-32s/16s/8s on VGG16, and torchvision-style FCN on dilated ResNets.

VGG16 variants differ only in which skips they fuse (`skips`), so one private builder makes all three.
Deviation from the paper: fc6 is padded (7x7 conv, padding 3) instead of padding the input by 100 and
cropping, and every upsampling takes its output size from the finer map (or the input), so any input of at
least 32x32 pixels works without crop offsets.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models import VGG16_Weights
from torchvision.models.segmentation.fcn import FCNHead

from segmill.models.architectures.backbones import (
    load_backbone_weights,
    resnet_backbone,
    vgg16_features,
    vgg_classifier_as_conv,
)
from segmill.models.architectures.base import SegmentationModel
from segmill.models.registry import register_model

_PAPER = "Long, Shelhamer, Darrell. Fully Convolutional Networks for Semantic Segmentation. CVPR 2015."
_SKIP_ORDER = ("pool4", "pool3")  # coarse to fine: FCN-16s adds pool4, FCN-8s adds pool3 as well
_SKIP_CHANNELS = {"pool3": 256, "pool4": 512}
_POOL_NAMES = {3: "pool3", 4: "pool4", 5: "pool5"}


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size: int) -> Tensor:
    """ConvTranspose2d weight (in, out, k, k) that upsamples each channel bilinearly (channel i -> i only)."""
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(kernel_size, dtype=torch.float32) - center).abs() / factor
    weight = torch.zeros(in_channels, out_channels, kernel_size, kernel_size)
    diag = torch.arange(min(in_channels, out_channels))
    weight[diag, diag] = taps[:, None] * taps[None, :]
    return weight


def bilinear_upsampler(channels: int, stride: int) -> nn.ConvTranspose2d:
    """A stride-`stride` transposed conv initialised to bilinear interpolation (kernel 2*stride, pad stride/2)."""
    up = nn.ConvTranspose2d(channels, channels, 2 * stride, stride=stride, padding=stride // 2, bias=False)
    with torch.no_grad():
        up.weight.copy_(bilinear_kernel(channels, channels, 2 * stride))
    return up


class VGG16Backbone(nn.Module):
    """VGG16's conv layers with fc6/fc7 as convolutions; returns the pool3, pool4 and fc7 maps.

    fc6/fc7 belong to the backbone because the paper initialises them from VGG16's classifier.
    """

    def __init__(self, fc_channels: int = 4096, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = vgg16_features(batch_norm=False)
        self.fc6 = nn.Conv2d(512, fc_channels, kernel_size=7, padding=3)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, kernel_size=1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        pools = 0
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                pools += 1
                if pools in _POOL_NAMES:
                    out[_POOL_NAMES[pools]] = x
        x = self.dropout(F.relu(self.fc6(x)))
        out["fc7"] = self.dropout(F.relu(self.fc7(x)))
        return out


class FCNVGG16(nn.Module):
    """FCN on VGG16: score fc7, then for each skip upsample 2x (bilinear init) and add that pool's scores."""

    def __init__(self, backbone: VGG16Backbone, num_classes: int, skips: tuple[str, ...]) -> None:
        super().__init__()
        if skips != _SKIP_ORDER[: len(skips)]:
            raise ValueError(f"Unknown FCN skips {skips!r}; use (), ('pool4',) or ('pool4', 'pool3').")
        self.backbone = backbone
        self.skips = skips
        self.score_fr = nn.Conv2d(backbone.fc7.out_channels, num_classes, kernel_size=1)
        self.score_pool = nn.ModuleDict({s: nn.Conv2d(_SKIP_CHANNELS[s], num_classes, 1) for s in skips})
        for conv in self.score_pool.values():  # zero-init: training starts from the coarser net's output
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.upscore2x = nn.ModuleDict({s: bilinear_upsampler(num_classes, 2) for s in skips})
        self.output_stride = 32 // 2 ** len(skips)
        # The paper fixes the last upsampling to bilinear interpolation; only the 2x ones are learned.
        self.upscore_final = bilinear_upsampler(num_classes, self.output_stride).requires_grad_(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.backbone(x)
        score = self.score_fr(features["fc7"])
        for skip in self.skips:
            skip_score = self.score_pool[skip](features[skip])
            score = self.upscore2x[skip](score, output_size=skip_score.shape[-2:]) + skip_score
        return {"out": self.upscore_final(score, output_size=x.shape[-2:])}


def _fcn_vgg16(
    skips: tuple[str, ...], *, num_classes: int, backbone_weights: str | None, fc_channels: int
) -> FCNVGG16:
    backbone = VGG16Backbone(fc_channels)
    load_backbone_weights(backbone, backbone_weights, VGG16_Weights, convert=vgg_classifier_as_conv(backbone))
    return FCNVGG16(backbone, num_classes, skips)


@register_model(paper=_PAPER)
def fcn32s_vgg16(*, num_classes: int = 21, backbone_weights: str | None = None, fc_channels: int = 4096) -> FCNVGG16:
    """FCN-32s: fc7 scores upsampled 32x in one bilinear step."""
    return _fcn_vgg16((), num_classes=num_classes, backbone_weights=backbone_weights, fc_channels=fc_channels)


@register_model(paper=_PAPER)
def fcn16s_vgg16(*, num_classes: int = 21, backbone_weights: str | None = None, fc_channels: int = 4096) -> FCNVGG16:
    """FCN-16s: fuses pool4 scores, then upsamples 16x."""
    return _fcn_vgg16(("pool4",), num_classes=num_classes, backbone_weights=backbone_weights, fc_channels=fc_channels)


@register_model(paper=_PAPER)
def fcn8s_vgg16(*, num_classes: int = 21, backbone_weights: str | None = None, fc_channels: int = 4096) -> FCNVGG16:
    """FCN-8s: fuses pool4 and pool3 scores, then upsamples 8x."""
    return _fcn_vgg16(
        ("pool4", "pool3"), num_classes=num_classes, backbone_weights=backbone_weights, fc_channels=fc_channels
    )


def _fcn_resnet(depth: int, *, num_classes: int, aux_loss: bool, backbone_weights: str | None) -> SegmentationModel:
    """torchvision's FCN: dilated ResNet (output stride 8) + FCNHead, optional aux FCNHead on layer3."""
    return_layers = {"layer4": "out", **({"layer3": "aux"} if aux_loss else {})}
    backbone = resnet_backbone(
        depth, backbone_weights, replace_stride_with_dilation=[False, True, True], return_layers=return_layers
    )
    aux_classifier = FCNHead(1024, num_classes) if aux_loss else None
    return SegmentationModel(backbone, FCNHead(2048, num_classes), aux_classifier)


@register_model(paper=_PAPER)
def fcn_resnet50(
    *, num_classes: int = 21, aux_loss: bool = False, backbone_weights: str | None = None
) -> SegmentationModel:
    """FCN head on a dilated ResNet-50 (torchvision's `fcn_resnet50` layout)."""
    return _fcn_resnet(50, num_classes=num_classes, aux_loss=aux_loss, backbone_weights=backbone_weights)


@register_model(paper=_PAPER)
def fcn_resnet101(
    *, num_classes: int = 21, aux_loss: bool = False, backbone_weights: str | None = None
) -> SegmentationModel:
    """FCN head on a dilated ResNet-101 (torchvision's `fcn_resnet101` layout)."""
    return _fcn_resnet(101, num_classes=num_classes, aux_loss=aux_loss, backbone_weights=backbone_weights)
