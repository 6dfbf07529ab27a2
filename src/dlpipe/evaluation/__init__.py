"""Evaluation on the held-out test split: metrics, latency, figures, and its DVC stage."""
