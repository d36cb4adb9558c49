"""segmill.jobs: what a user touches, on top of the Ray programs of segmill.pipeline.

`cli/` is the `segmill` command (one file per command group); `specs` validates YAML job specs and runs them
here, `submit` sends them to a Ray cluster's Jobs API, `history` records every job as Parquet events;
`scheduling/` fires specs by cron or by the data; `query` answers SQL over a results table, `show` draws one of
its images, and `demo` is the embedded default job behind `make run`.
"""
