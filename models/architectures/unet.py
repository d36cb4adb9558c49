"""U-Net (Ronneberger et al. 2015): a contracting path and an expanding path joined by concatenated skips.

Deviations from the paper, as in most modern U-Nets: padded 3x3 convs with BatchNorm, so the output has the
input's size without cropping. Odd sizes work because each upsampling takes its output size from the skip it
is concatenated with (the skip is always 2n or 2n+1 for a coarser map of n).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from segmill.models.architectures.backbones import load_backbone_weights
from segmill.models.registry import register_model

_PAPER = "Ronneberger, Fischer, Brox. U-Net: Convolutional Networks for Biomedical Image Segmentation. MICCAI 2015."


class DoubleConv(nn.Sequential):
    """Two (3x3 conv, BatchNorm, ReLU) blocks."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNetEncoder(nn.Module):
    """The contracting path: a double conv, then `depth` times (2x2 max-pool, double conv doubling width)."""

    def __init__(self, in_channels: int, base_channels: int, depth: int) -> None:
        super().__init__()
        self.channels = [base_channels * 2**i for i in range(depth + 1)]
        self.stem = DoubleConv(in_channels, base_channels)
        self.downs = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), DoubleConv(self.channels[i], self.channels[i + 1])) for i in range(depth)
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        """Feature maps from finest (input size) to coarsest (input / 2**depth)."""
        features = [self.stem(x)]
        for down in self.downs:
            features.append(down(features[-1]))
        return features


class UpBlock(nn.Module):
    """Upsample to the skip's size while halving the width, concatenate the skip, double conv."""

    def __init__(self, in_channels: int, out_channels: int, bilinear: bool) -> None:
        super().__init__()
        self.bilinear = bilinear
        if bilinear:
            self.up: nn.Module = nn.Conv2d(in_channels, out_channels, kernel_size=1)  # after interpolation
        else:
            self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        size = skip.shape[-2:]
        if self.bilinear:
            x = self.up(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        else:
            x = self.up(x, output_size=size)
        return self.conv(torch.cat([skip, x], dim=1))


class UNet(nn.Module):
    """Contracting path (`backbone`), expanding path (`decoder`, deepest block first), 1x1 classifier."""

    def __init__(self, num_classes: int, *, in_channels: int, base_channels: int, depth: int, bilinear: bool) -> None:
        super().__init__()
        if depth < 1 or base_channels < 1:
            raise ValueError(f"U-Net needs depth >= 1 and base_channels >= 1, got {depth} and {base_channels}.")
        self.backbone = UNetEncoder(in_channels, base_channels, depth)
        widths = self.backbone.channels
        self.decoder = nn.ModuleList(UpBlock(widths[i + 1], widths[i], bilinear) for i in reversed(range(depth)))
        self.classifier = nn.Conv2d(base_channels, num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        *skips, x = self.backbone(x)
        for block, skip in zip(self.decoder, reversed(skips)):
            x = block(x, skip)
        return {"out": self.classifier(x)}


@register_model(paper=_PAPER)
def unet(
    *,
    num_classes: int = 21,
    backbone_weights: str | None = None,
    in_channels: int = 3,
    base_channels: int = 64,
    depth: int = 4,
    bilinear: bool = False,
) -> UNet:
    """U-Net with its own encoder; `backbone_weights` can only be a local file (no published weights)."""
    model = UNet(num_classes, in_channels=in_channels, base_channels=base_channels, depth=depth, bilinear=bilinear)
    load_backbone_weights(model.backbone, backbone_weights, None)
    return model
