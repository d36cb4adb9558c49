"""segmill.pipeline: the Ray programs (bulk segmentation, retraining) and their storage and tracking.

Nothing here loads torch on import: the bulk job's driver and its decode and write workers run without it (the
model actors load it). Retraining: `from segmill.pipeline.train import train` (Ray Train is heavy to import).
"""
from segmill.pipeline.config import ResourceConfig, SegmentConfig
from segmill.pipeline.segment import segment
from segmill.pipeline.train_config import TrainConfig

__all__ = ["ResourceConfig", "SegmentConfig", "TrainConfig", "segment"]
