"""dlpipe: a reproducible deep-learning pipeline (DVC + PyTorch + MLflow)."""

__version__ = "0.1.0"
