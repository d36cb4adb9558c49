"""segmill.pipeline: the Ray programs (bulk segmentation, retraining) and their storage and tracking.

Retraining: `from segmill.pipeline.train import train` (kept out of this module: Ray Train is heavy to import).
"""
from segmill.pipeline.config import ResourceConfig, SegmentConfig
from segmill.pipeline.segment import segment
from segmill.pipeline.train_config import TrainConfig

__all__ = ["ResourceConfig", "SegmentConfig", "TrainConfig", "segment"]
