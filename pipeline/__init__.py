"""segmill.pipeline: the Ray programs and what they share.

- `common/`: storage (fsspec URIs), listing, the one image and label decoder, images, class files, settings
  (every environment variable), the typed-config base, model resolution, the Ray runtime, generated scenes.
- `bulk/`: the bulk segmentation job on Ray Data (config, job, dataset, rows, stages, segmenter, results,
  recovery, record, export) and the evaluation job built on it.
- `train/`: retraining on Ray Train (config, driver, data, bootstrap, loop, validate, report).
- `tracking`: MLflow runs, evaluations, registered versions and the champion gate.

Nothing here loads torch on import: the bulk job's driver and its decode and write workers run without it (the
model actors load it). Retraining: `from segmill.pipeline.train.driver import train` (Ray Train is heavy to
import).
"""
from segmill.pipeline.bulk.config import ResourceConfig, SegmentConfig
from segmill.pipeline.bulk.job import segment
from segmill.pipeline.train.config import TrainConfig

__all__ = ["ResourceConfig", "SegmentConfig", "TrainConfig", "segment"]
