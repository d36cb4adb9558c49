"""segmill's models as MLflow models ("models from code"): MLflow runs this file to build the model, which then
loads its weights from the version's artifacts (checkpoint/model.pt: a state dict and a small spec, read with
`torch.load(weights_only=True)`), so no pickled Python object is ever stored or loaded.

    import mlflow
    model = mlflow.pyfunc.load_model("models:/roads@champion")
    masks = model.predict(images)  # uint8 N x H x W x 3 (one size per call) -> class indices N x H x W

Needs segmill installed where it loads (the pip requirements logged with the model say so).
"""
from __future__ import annotations

import os

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

CHECKPOINT_ARTIFACT = "checkpoint"  # the artifacts key, a folder holding model.pt


class SegmillModel(PythonModel):
    # MLflow would wrap predict for validation by type hints (and warn that there are none); the logged signature
    # (uint8 N x H x W x 3 in, int32 N x H x W out) is what describes the data here.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        from segmill.models.checkpoint import load_checkpoint
        from segmill.models.predict import Predictor

        with open(os.path.join(context.artifacts[CHECKPOINT_ARTIFACT], "model.pt"), "rb") as f:
            model, self.spec = load_checkpoint(f.read())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor(model.eval(), mean=self.spec.mean, std=self.spec.std, device=device)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        if isinstance(model_input, dict):  # a named input
            model_input = next(iter(model_input.values()))
        images = np.asarray(model_input)
        if images.ndim == 3:  # one image
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"Expected uint8 images N x H x W x 3, got an array of shape {images.shape}.")
        masks = self.predictor.predict([image for image in images.astype(np.uint8)])
        return np.stack([m.cpu().numpy() for m in masks]).astype(np.int32)


mlflow.models.set_model(SegmillModel())
