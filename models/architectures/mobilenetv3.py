"""Fast models for bulk inference: LR-ASPP and DeepLabv3 on MobileNetV3-Large, built by torchvision.

torchvision's models already follow our conventions (`model.backbone`, a dict with "out"[, "aux"] at the
input's size), so the builders only translate our arguments:
- `backbone_weights`: a `MobileNet_V3_Large_Weights` tag or a local file, loaded by our one helper;
- `weights`: a tag of the whole torchvision segmentation model (e.g. "COCO_WITH_VOC_LABELS_V1", 21 VOC
  classes); torchvision downloads it, so it needs network access or a warm torch hub cache.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models import MobileNet_V3_Large_Weights
from torchvision.models._api import WeightsEnum
from torchvision.models.segmentation import (
    LRASPP,
    DeepLabV3,
    DeepLabV3_MobileNet_V3_Large_Weights,
    LRASPP_MobileNet_V3_Large_Weights,
)
from torchvision.models.segmentation import (
    deeplabv3_mobilenet_v3_large as _tv_deeplabv3,
)
from torchvision.models.segmentation import lraspp_mobilenet_v3_large as _tv_lraspp

from segmill.models.architectures.backbones import (
    load_backbone_weights,
    resolve_weights_enum,
    strip_prefix,
)
from segmill.models.registry import register_model

_LRASPP_PAPER = "Howard et al. Searching for MobileNetV3. ICCV 2019."
_DEEPLAB_PAPER = "Chen, Papandreou, Schroff, Adam. Rethinking Atrous Convolution for Semantic Image Segmentation. 2017."


def _build(
    tv_builder: Callable[..., nn.Module],
    weights_enum: type[WeightsEnum],
    *,
    num_classes: int,
    weights: str | None,
    backbone_weights: str | None,
    **kwargs: Any,
) -> nn.Module:
    """Build through torchvision without letting it download anything we did not ask for."""
    if weights is not None and backbone_weights is not None:
        raise ValueError("Pass either weights (the whole model) or backbone_weights, not both.")
    if weights is None:
        model = tv_builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
        # torchvision's backbone is `IntermediateLayerGetter(mobilenet.features)`: keys lose "features.".
        load_backbone_weights(
            model.backbone, backbone_weights, MobileNet_V3_Large_Weights, convert=strip_prefix("features.")
        )
        return model
    full = resolve_weights_enum(weights_enum, weights, "weights")
    classes = len(full.meta["categories"])
    if num_classes != classes:
        raise ValueError(
            f"Weights {weights!r} predict {classes} classes; build with num_classes={classes} "
            "(or use backbone_weights to start a model with other classes)."
        )
    return tv_builder(weights=full, progress=False, num_classes=num_classes, **kwargs)


@register_model(paper=_LRASPP_PAPER)
def lraspp_mobilenet_v3_large(
    *, num_classes: int = 21, backbone_weights: str | None = None, weights: str | None = None
) -> LRASPP:
    """Lite R-ASPP on a dilated MobileNetV3-Large: the fastest model here."""
    return _build(
        _tv_lraspp,
        LRASPP_MobileNet_V3_Large_Weights,
        num_classes=num_classes,
        weights=weights,
        backbone_weights=backbone_weights,
    )


@register_model(paper=_DEEPLAB_PAPER)
def deeplabv3_mobilenet_v3_large(
    *,
    num_classes: int = 21,
    aux_loss: bool = False,
    backbone_weights: str | None = None,
    weights: str | None = None,
) -> DeepLabV3:
    """torchvision's DeepLabv3 (ASPP rates 12/24/36) on a dilated MobileNetV3-Large."""
    model = _build(
        _tv_deeplabv3,
        DeepLabV3_MobileNet_V3_Large_Weights,
        num_classes=num_classes,
        weights=weights,
        backbone_weights=backbone_weights,
        aux_loss=aux_loss or weights is not None,  # torchvision's full weights include the aux head
    )
    if not aux_loss:
        model.aux_classifier = None
    return model
