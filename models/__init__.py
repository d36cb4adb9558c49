"""segmill.models: pure PyTorch segmentation models, checkpoints, prediction and metrics.

`architectures/` holds the networks (one file per family) and `registry` builds them by name; `spec` and
`checkpoint` are what a saved model is (weights plus a small spec, no pickled code); `predict` runs images of any
size (test-time augmentation, tiling, the fast path); `metrics` and `iou` give exact confusion-matrix figures;
`training` and `transfer` are the recipe's torch parts. No Ray, MLflow or object storage here: everything works
in a notebook with torch alone. The registry's names are imported on first use, so that `segmill.models.spec`
(plain Python) can be read where torch is not loaded.
"""
from typing import Any

__all__ = ["get_model", "list_models", "model_paper", "register_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from segmill.models import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
