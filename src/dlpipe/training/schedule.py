"""Optimiser and learning-rate schedule from the training params (stepped once per batch)."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from dlpipe.config import TrainConfig


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam(W); with `fused_optimizer`, PyTorch's fused kernel (CPUs and GPUs): one pass over all
    the parameters instead of a loop of small ops, which pays off for large embedding tables.
    The numbers differ in the last bits, so a recipe tuned with one may lose a little with the
    other: each recipe ships with the optimizer it was tuned with."""
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    device = next(model.parameters()).device.type
    fused = config.fused_optimizer and device in ("cpu", "cuda")
    return kind(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> LRScheduler:
    """Linear warm-up, then constant or cosine decay to zero; or PyTorch's one-cycle policy."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = min(total - 1, round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "onecycle":
        pct_start = warmup / total if warmup else 0.3
        return OneCycleLR(optimizer, max_lr=config.lr, total_steps=total, pct_start=pct_start)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)
