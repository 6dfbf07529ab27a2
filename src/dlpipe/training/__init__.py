"""Training: one loop for all model families, its runtime, schedule and checkpoints."""
