"""MLflow tracking, one job a module: `store` (which store, is it usable), `spool` (metrics kept
on disk while the store does not answer, and their delivery), `run` (`StageRun`: the MLflow run a
stage logs to, never fatal mid-training) and `requirements` (logging a model's pinned
requirements quickly)."""
