"""segmill.pipeline.common: what every Ray program shares, none of it tied to one job.

`storage` (one filesystem layer for local, file:// and s3:// URIs, redaction, the write probe), `listing` (a
prefix or a manifest, labels paired by path), `decode` (the one image decoder and the one label reader),
`images` (PNG bytes, colouring a mask over its image), `classes` (class files, torch-free), `settings` (every
environment variable), `config` (the pydantic base of every job config), `model_source` (a MODEL URI to
checkpoint bytes), `runtime` (starting or joining Ray), `scenes` (the generated labelled street scenes).
"""
