"""segmill.pipeline: the Ray programs (bulk segmentation, later retraining) and their storage."""
from segmill.pipeline.config import ResourceConfig, SegmentConfig
from segmill.pipeline.segment import segment

__all__ = ["ResourceConfig", "SegmentConfig", "segment"]
