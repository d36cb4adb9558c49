"""DeepLabv3 (Chen et al. 2017) on dilated ResNets, with multi-grid, ASPP rates and cascaded blocks under our
control.

Output stride 16 dilates layer4 (unit rate 2); output stride 8 dilates layer3 and layer4 (unit rate 4) and
doubles the ASPP rates, as in the paper. Multi-grid sets layer4's three 3x3 convs to unit rate * (1, 2, 4).

Cascaded blocks (the paper's section 3.2, "going deeper with atrous convolution"): `cascade_blocks` copies of
ResNet's last block (block5, block6, block7) appended after block4, each atrous with the unit rate doubling from
block to block so that the output stride stays, and multi-grid applied inside each. With `aspp=False` the class
scores come straight from the last block (a 1x1 convolution), as in the paper's cascade-only models.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.models.segmentation.fcn import FCNHead

from segmill.models.architectures.backbones import resnet_backbone
from segmill.models.architectures.base import SegmentationModel, resize_to
from segmill.models.registry import register_model

_PAPER = "Chen, Papandreou, Schroff, Adam. Rethinking Atrous Convolution for Semantic Image Segmentation. 2017."
_DILATE = {16: [False, False, True], 8: [False, True, True]}
_ASPP_RATES_OS16 = (6, 12, 18)
MAX_CASCADE_BLOCKS = 3  # block5, block6, block7 (the paper's deepest cascade)
_BLOCK4_CHANNELS, _BLOCK4_WIDTH = 2048, 512


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool, 1x1 conv + BN + ReLU, upsample back.

    Its BatchNorm sees one value per channel and image, so training needs batches of 2 or more.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = conv_bn_relu(in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return resize_to(self.conv(self.pool(x)), x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 conv, one 3x3 atrous conv per rate, and image pooling,
    concatenated and projected to `out_channels` by a 1x1 conv + BN + ReLU (+ dropout)."""

    def __init__(self, in_channels: int, rates: Sequence[int], out_channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            [
                conv_bn_relu(in_channels, out_channels),
                *(conv_bn_relu(in_channels, out_channels, 3, rate) for rate in self.rates),
                ImagePooling(in_channels, out_channels),
            ]
        )
        self.project = nn.Sequential(
            conv_bn_relu(len(self.branches) * out_channels, out_channels), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.branches], dim=1))


def cascade_block(unit_rate: int, multi_grid: Sequence[int]) -> nn.Sequential:
    """A copy of ResNet's block4 (one Bottleneck per multi-grid entry, 2048 channels in and out, no stride), its
    3x3 convolutions atrous at unit_rate * grid."""
    return nn.Sequential(*[Bottleneck(_BLOCK4_CHANNELS, _BLOCK4_WIDTH, dilation=unit_rate * grid)
                           for grid in multi_grid])


class DeepLabHead(nn.Sequential):
    """Cascaded blocks (none by default), then ASPP (or nothing) and the 1x1 conv to class scores."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int], *,
                 cascade: Sequence[nn.Module] = (), aspp: bool = True) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if cascade:
            layers["cascade"] = nn.Sequential(*cascade)
        if aspp:
            layers["aspp"] = ASPP(in_channels, rates)
        layers["logits"] = nn.Conv2d(256 if aspp else in_channels, num_classes, 1)
        super().__init__(layers)


class DeepLabV3(SegmentationModel):
    """Dilated ResNet backbone + DeepLab head (+ optional FCN aux head on layer3)."""

    def __init__(
        self, backbone: nn.Module, classifier: DeepLabHead, aux_classifier: nn.Module | None, output_stride: int
    ) -> None:
        super().__init__(backbone, classifier, aux_classifier)
        self.output_stride = output_stride

    @property
    def aspp(self) -> ASPP | None:
        return getattr(self.classifier, "aspp", None)

    @property
    def cascade(self) -> list[nn.Sequential]:
        """The cascaded blocks, block5 first (empty without any)."""
        return list(getattr(self.classifier, "cascade", ()))


def apply_multi_grid(layer4: nn.Sequential, unit_rate: int, multi_grid: Sequence[int]) -> None:
    """Set the 3x3 conv of each layer4 Bottleneck to dilation (and padding) unit_rate * grid."""
    if len(multi_grid) != len(layer4):
        raise ValueError(f"multi_grid {tuple(multi_grid)} needs one rate per layer4 block ({len(layer4)}).")
    for block, grid in zip(layer4, multi_grid):
        rate = unit_rate * grid
        block.conv2.dilation = (rate, rate)
        block.conv2.padding = (rate, rate)


def _deeplabv3_resnet(
    depth: int,
    *,
    num_classes: int,
    aux_loss: bool,
    backbone_weights: str | None,
    output_stride: int,
    multi_grid: Sequence[int],
    cascade_blocks: int,
    aspp: bool,
) -> DeepLabV3:
    if output_stride not in _DILATE:
        raise ValueError(f"Unsupported output_stride {output_stride!r}; use 8 or 16.")
    if not 0 <= cascade_blocks <= MAX_CASCADE_BLOCKS:
        raise ValueError(f"cascade_blocks {cascade_blocks!r} must be 0 to {MAX_CASCADE_BLOCKS} (block5 to block7).")
    return_layers = {"layer4": "out", **({"layer3": "aux"} if aux_loss else {})}
    backbone = resnet_backbone(
        depth, backbone_weights, replace_stride_with_dilation=_DILATE[output_stride], return_layers=return_layers
    )
    unit_rate = 32 // output_stride  # block4's
    apply_multi_grid(backbone.layer4, unit_rate, multi_grid)
    cascade = [cascade_block(unit_rate * 2 ** (k + 1), multi_grid) for k in range(cascade_blocks)]
    rates = tuple(r * 16 // output_stride for r in _ASPP_RATES_OS16)
    aux_classifier = FCNHead(1024, num_classes) if aux_loss else None
    head = DeepLabHead(_BLOCK4_CHANNELS, num_classes, rates, cascade=cascade, aspp=aspp)
    return DeepLabV3(backbone, head, aux_classifier, output_stride)


@register_model(paper=_PAPER)
def deeplabv3_resnet50(
    *,
    num_classes: int = 21,
    aux_loss: bool = False,
    backbone_weights: str | None = None,
    output_stride: int = 16,
    multi_grid: Sequence[int] = (1, 2, 4),
    cascade_blocks: int = 0,
    aspp: bool = True,
) -> DeepLabV3:
    """DeepLabv3 on a dilated ResNet-50 (output stride 16 or 8; 0-3 cascaded blocks, with or without ASPP)."""
    return _deeplabv3_resnet(
        50,
        num_classes=num_classes,
        aux_loss=aux_loss,
        backbone_weights=backbone_weights,
        output_stride=output_stride,
        multi_grid=multi_grid,
        cascade_blocks=cascade_blocks,
        aspp=aspp,
    )


@register_model(paper=_PAPER)
def deeplabv3_resnet101(
    *,
    num_classes: int = 21,
    aux_loss: bool = False,
    backbone_weights: str | None = None,
    output_stride: int = 16,
    multi_grid: Sequence[int] = (1, 2, 4),
    cascade_blocks: int = 0,
    aspp: bool = True,
) -> DeepLabV3:
    """DeepLabv3 on a dilated ResNet-101 (output stride 16 or 8; 0-3 cascaded blocks, with or without ASPP), the
    paper's main model."""
    return _deeplabv3_resnet(
        101,
        num_classes=num_classes,
        aux_loss=aux_loss,
        backbone_weights=backbone_weights,
        output_stride=output_stride,
        multi_grid=multi_grid,
        cascade_blocks=cascade_blocks,
        aspp=aspp,
    )
