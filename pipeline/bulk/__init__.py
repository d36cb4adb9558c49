"""segmill.pipeline.bulk: the bulk segmentation job on Ray Data, and the evaluation job built on it.

`job.segment(config)` is the entry point: `job.prepare` checks everything and lists what is left, `dataset`
plans the Ray Data stages, `job.run` runs them. `rows` declares the columns between stages, `stages` and
`segmenter` are the stages, `results` the committed Parquet table, `recovery` the error rows of lost batches,
`record` the job record, `export` the optional PNGs, `evaluate` an evaluation recorded in MLflow.
"""
