"""The model shape shared by the backbone + head families (FCN-ResNet, DeepLabv3)."""
from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


def resize_to(logits: Tensor, size: tuple[int, int] | list[int]) -> Tensor:
    """Bilinearly resize logits to `size` (the input's height and width); targets are never resized."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class SegmentationModel(nn.Module):
    """`backbone` returns {"out": map[, "aux": map]}; heads turn maps into logits at the input's size.

    All pretrained-able parameters live in `backbone`, all new layers in `classifier` / `aux_classifier`,
    which is what `segmill.models.transfer` relies on.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        result = {"out": resize_to(self.classifier(features["out"]), size)}
        if self.aux_classifier is not None:
            result["aux"] = resize_to(self.aux_classifier(features["aux"]), size)
        return result
