"""SegNet (Badrinarayanan et al. 2017): a VGG16-BN encoder and a mirrored decoder that upsamples with the
encoder's max-pooling indices, so boundaries come back where the encoder saw its maxima.

Each unpooling is given the size of the tensor its paired pool consumed, so odd input sizes come back
exactly without padding or cropping.
"""
from __future__ import annotations

from torch import Size, Tensor, nn
from torchvision.models import VGG16_BN_Weights

from segmill.models.architectures.backbones import load_backbone_weights, vgg16_features
from segmill.models.registry import register_model

_PAPER = (
    "Badrinarayanan, Kendall, Cipolla. SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image "
    "Segmentation. TPAMI 2017."
)
_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (channels, convs) per VGG16 stage

PoolRecord = tuple[Tensor, Size]  # (argmax indices, size of the tensor before pooling)


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SegNetEncoder(nn.Module):
    """VGG16-BN's conv layers (indexed like torchvision's `vgg16_bn().features`); pools keep their indices."""

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_features(batch_norm=True)
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                layer.return_indices = True

    def forward(self, x: Tensor) -> tuple[Tensor, list[PoolRecord]]:
        pools: list[PoolRecord] = []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                size = x.shape[-2:]
                x, indices = layer(x)
                pools.append((indices, size))
            else:
                x = layer(x)
        return x, pools


class SegNetDecoderStage(nn.Module):
    """Unpool with the paired encoder indices, then conv-bn-relu blocks (the last one changes the width)."""

    def __init__(self, channels: int, convs: int, out_channels: int) -> None:
        super().__init__()
        self.unpool = nn.MaxUnpool2d(kernel_size=2, stride=2)
        self.convs = nn.Sequential(
            *[conv_bn_relu(channels, channels) for _ in range(convs - 1)], conv_bn_relu(channels, out_channels)
        )

    def forward(self, x: Tensor, pool: PoolRecord) -> Tensor:
        indices, size = pool
        return self.convs(self.unpool(x, indices, output_size=size))


class SegNet(nn.Module):
    """Encoder (`backbone`), mirrored decoder, and a 3x3 conv to class scores at the input's size."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.backbone = SegNetEncoder()
        stages = []
        for i in reversed(range(len(_STAGES))):
            channels, convs = _STAGES[i]
            out_channels = _STAGES[i - 1][0] if i > 0 else channels
            stages.append(SegNetDecoderStage(channels, convs, out_channels))
        self.decoder = nn.ModuleList(stages)  # decoder[k] undoes the encoder's pool number (5 - k)
        self.classifier = nn.Conv2d(_STAGES[0][0], num_classes, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x, pools = self.backbone(x)
        for stage, pool in zip(self.decoder, reversed(pools)):
            x = stage(x, pool)
        return {"out": self.classifier(x)}


@register_model(paper=_PAPER)
def segnet_vgg16(*, num_classes: int = 21, backbone_weights: str | None = None) -> SegNet:
    """SegNet with a VGG16-BN encoder; `backbone_weights` takes `VGG16_BN_Weights` tags (e.g. "IMAGENET1K_V1")."""
    model = SegNet(num_classes)
    load_backbone_weights(model.backbone, backbone_weights, VGG16_BN_Weights)
    return model
