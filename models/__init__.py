"""segmill.models: pure PyTorch segmentation models, checkpoints, prediction and metrics.

No Ray, MLflow or object storage here: everything works in a notebook with torch alone.
"""
from segmill.models.registry import get_model, list_models, model_paper, register_model

# Importing the families registers their builders.
from segmill.models import deeplabv3, fast, fcn, segnet, unet  # noqa: F401,E402

__all__ = ["get_model", "list_models", "model_paper", "register_model"]
