"""DeconvNet (Noh, Hong, Han, ICCV 2015): a VGG16 encoder with its fully connected layers as 7x7 and 1x1
convolutions, and a mirrored decoder of unpooling layers (at the encoder's max-pooling indices) each followed by
deconvolutions (transposed convolutions), down to per-pixel class scores. Every (de)convolution is followed by
BatchNorm and ReLU, as in the paper.

Deviation from the paper, so that any input size works: fc6 is a 7x7 convolution without padding, as in the
paper, but the pool5 map is first padded at the bottom and right to at least 7x7, and the matching 7x7
deconvolution's output is cropped back. At the paper's 224x224 the padding is nil (pool5 is 7x7, fc6 1x1);
smaller inputs, and odd sizes, work because every unpooling takes the size its paired pool consumed.
"""
from __future__ import annotations

from torch import Size, Tensor, nn
from torch.nn import functional as F
from torchvision.models import VGG16_BN_Weights

from segmill.models.architectures.backbones import load_backbone_weights, vgg16_features, vgg_classifier_as_conv
from segmill.models.registry import register_model

_PAPER = "Noh, Hong, Han. Learning Deconvolution Network for Semantic Segmentation. ICCV 2015."
_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (channels, convs) per VGG16 stage
FC_KERNEL = 7

PoolRecord = tuple[Tensor, Size]  # (argmax indices, size of the tensor before pooling)


def _bn_relu(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class DeconvNetEncoder(nn.Module):
    """VGG16-BN's conv layers (indexed like torchvision's `vgg16_bn().features`), pools keeping their indices, then
    fc6 (7x7) and fc7 (1x1) as convolutions with BatchNorm, initialised from VGG16-BN's classifier."""

    def __init__(self, fc_channels: int = 4096) -> None:
        super().__init__()
        self.features = vgg16_features(batch_norm=True)
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                layer.return_indices = True
        self.fc6 = nn.Conv2d(512, fc_channels, FC_KERNEL)
        self.fc6_bn = nn.BatchNorm2d(fc_channels)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1)
        self.fc7_bn = nn.BatchNorm2d(fc_channels)

    def forward(self, x: Tensor) -> tuple[Tensor, list[PoolRecord], Size]:
        pools: list[PoolRecord] = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                size = x.shape[-2:]
                x, indices = layer(x)
                pools.append((indices, size))
            else:
                x = layer(x)
        pool5 = x.shape[-2:]
        x = F.pad(x, (0, max(0, FC_KERNEL - pool5[1]), 0, max(0, FC_KERNEL - pool5[0])))
        x = F.relu(self.fc6_bn(self.fc6(x)))
        return F.relu(self.fc7_bn(self.fc7(x))), pools, pool5


class DeconvNetDecoderStage(nn.Module):
    """Unpool at the paired encoder indices, then 3x3 deconvolutions (the last one changes the width)."""

    def __init__(self, channels: int, convs: int, out_channels: int) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)
        widths = [channels] * convs + [out_channels]
        self.deconvs = nn.Sequential(*[_bn_relu(nn.ConvTranspose2d(a, b, 3, padding=1, bias=False), b)
                                       for a, b in zip(widths, widths[1:])])

    def forward(self, x: Tensor, pool: PoolRecord) -> Tensor:
        indices, size = pool
        return self.deconvs(self.unpool(x, indices, output_size=size))


class DeconvNet(nn.Module):
    """Encoder (`backbone`); the 7x7 deconvolution undoing fc6; unpool + deconvolution stages mirroring the
    encoder's; a 1x1 convolution to class scores at the input's size."""

    def __init__(self, num_classes: int, fc_channels: int = 4096) -> None:
        super().__init__()
        self.backbone = DeconvNetEncoder(fc_channels)
        self.deconv6 = _bn_relu(nn.ConvTranspose2d(fc_channels, 512, FC_KERNEL, bias=False), 512)
        stages = []
        for i in reversed(range(len(_STAGES))):
            channels, convs = _STAGES[i]
            stages.append(DeconvNetDecoderStage(channels, convs, _STAGES[i - 1][0] if i > 0 else channels))
        self.decoder = nn.ModuleList(stages)  # decoder[k] undoes the encoder's pool number (5 - k)
        self.classifier = nn.Conv2d(_STAGES[0][0], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x, pools, pool5 = self.backbone(x)
        x = self.deconv6(x)[..., : pool5[0], : pool5[1]]
        for stage, pool in zip(self.decoder, reversed(pools)):
            x = stage(x, pool)
        return {"out": self.classifier(x)}


@register_model(paper=_PAPER)
def deconvnet_vgg16(*, num_classes: int = 21, backbone_weights: str | None = None,
                    fc_channels: int = 4096) -> DeconvNet:
    """DeconvNet on VGG16-BN; `backbone_weights` takes `VGG16_BN_Weights` tags (e.g. "IMAGENET1K_V1"), whose
    classifier initialises fc6/fc7 (kept random when `fc_channels` differs from 4096)."""
    model = DeconvNet(num_classes, fc_channels)
    load_backbone_weights(model.backbone, backbone_weights, VGG16_BN_Weights,
                          convert=vgg_classifier_as_conv(model.backbone))
    return model
