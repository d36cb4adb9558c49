"""segmill.pipeline.train: retraining on Ray Train, with hard classes, tracked and registered in MLflow.

`driver.train(config)` is the entry point: it checks everything, plans the epoch stream (`bootstrap`, `data`),
runs `loop.train_loop_per_worker` on every worker, and registers the result (`segmill.pipeline.tracking`).
`validate` is shared by the workers and the driver; `report` draws what a run leaves in MLflow.
"""
