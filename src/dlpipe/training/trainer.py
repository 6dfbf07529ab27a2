"""One training loop for every model family.

Everything model-specific is in the model module and in `Split.batch`; the loop only sees
`model(*inputs) -> logits`. It checkpoints after every epoch and can resume from such a
checkpoint to exactly the weights and metrics of an uninterrupted run (on the CPU).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from dlpipe.config import TrainConfig
from dlpipe.data.tensors import Split
from dlpipe.training.checkpoint import CheckpointStore
from dlpipe.training.runtime import Runtime
from dlpipe.training.schedule import make_optimizer, make_scheduler

EpochCallback = Callable[[dict[str, float]], None]


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_metric: float
    stopped_early: bool
    resumed_from_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def train_time_s(self) -> float:
        return sum(row["epoch_time_s"] for row in self.history)


@torch.no_grad()
def predict_logits(model: nn.Module, split: Split, runtime: Runtime, batch_size: int) -> Tensor:
    """Float32 logits for every row of `split`, in the split's row order."""
    model.eval()
    out: Tensor | None = None
    for index in split.batch_indices(batch_size):
        inputs, _ = split.batch(index)
        with runtime.autocast():
            logits = model(*inputs).float()
        if out is None:
            out = torch.empty(len(split), logits.shape[1], device=logits.device)
        out[index] = logits
    assert out is not None, "empty split"
    return out


def cuda_rng_states() -> list[Tensor]:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


def _shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator per epoch, so the batch order of epoch k never depends on earlier epochs."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        runtime: Runtime,
        seed: int,
        checkpoints: CheckpointStore | None = None,
        on_epoch_end: EpochCallback | None = None,
        label: str = "train",
    ) -> None:
        self.model = model.to(runtime.device)
        self.config = config
        self.runtime = runtime
        self.seed = seed
        self.checkpoints = checkpoints
        self.on_epoch_end = on_epoch_end
        self.label = label
        self.optimizer = make_optimizer(self.model, config)

    def _better(self, value: float, best: float) -> bool:
        return value < best if self.config.monitor == "val_loss" else value > best

    def _evaluate(self, split: Split) -> tuple[float, float]:
        logits = predict_logits(self.model, split, self.runtime, self.config.eval_batch_size)
        loss = F.cross_entropy(logits, split.labels).item()
        accuracy = (logits.argmax(1) == split.labels).float().mean().item()
        return loss, accuracy

    def _train_epoch(self, train: Split, epoch: int, scheduler: Any) -> dict[str, float]:
        config, device = self.config, self.runtime.device
        self.model.train()
        batches = train.batch_indices(config.batch_size, _shuffle_generator(self.seed, epoch))
        if config.max_steps_per_epoch:
            batches = batches[: config.max_steps_per_epoch]
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        start = time.perf_counter()
        bar = tqdm(
            batches,
            desc=f"{self.label} epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=not sys.stderr.isatty(),
            leave=True,
        )
        for step, index in enumerate(bar):
            inputs, targets = train.batch(index)
            with self.runtime.autocast():
                logits = self.model(*inputs)
                loss = F.cross_entropy(
                    logits.float(), targets, label_smoothing=config.label_smoothing
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
            self.optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(targets)
            correct += (logits.argmax(1) == targets).sum()
            seen += len(targets)
            if step % 20 == 0 and not bar.disable:
                rate = seen / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:,.0f}")
        elapsed = time.perf_counter() - start
        return {
            "train_loss": loss_sum.item() / max(1, seen),
            "train_accuracy": correct.item() / max(1, seen),
            "epoch_time_s": elapsed,
            "samples_per_s": seen / elapsed if elapsed > 0 else 0.0,
        }

    def fit(
        self,
        train: Split,
        val: Split,
        resume: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> FitResult:
        """Train for `config.epochs` (or until early stopping); the best weights end up loaded."""
        config = self.config
        steps = len(train.batch_indices(config.batch_size))
        if config.max_steps_per_epoch:
            steps = min(steps, config.max_steps_per_epoch)
        scheduler = make_scheduler(self.optimizer, config, steps)
        history: list[dict[str, float]] = []
        best_metric = float("inf") if config.monitor == "val_loss" else float("-inf")
        best_epoch, best_state, since_best = 0, copy.deepcopy(self.model.state_dict()), 0
        first_epoch = 1
        extra = dict(extra or {})
        if resume is not None:
            self.model.load_state_dict(resume["model"])
            self.optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            torch.set_rng_state(resume["torch_rng"])
            if resume.get("cuda_rng") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(resume["cuda_rng"])
            history = list(resume["history"])
            best_metric, best_epoch = resume["best_metric"], resume["best_epoch"]
            best_state, since_best = resume["best_model"], resume["since_best"]
            first_epoch = resume["epoch"] + 1
            extra = {**resume.get("extra", {}), **extra}
        stopped_early = False
        for epoch in range(first_epoch, config.epochs + 1):
            if config.early_stopping_patience and since_best >= config.early_stopping_patience:
                stopped_early = True
                break
            lr = self.optimizer.param_groups[0]["lr"]
            row: dict[str, float] = {"epoch": epoch, "lr": lr}
            row |= self._train_epoch(train, epoch, scheduler)
            row["val_loss"], row["val_accuracy"] = self._evaluate(val)
            history.append(row)
            if self._better(row[config.monitor], best_metric):
                best_metric, best_epoch, since_best = row[config.monitor], epoch, 0
                best_state = copy.deepcopy(self.model.state_dict())
            else:
                since_best += 1
            # The bar (TTY only) shows progress inside the epoch; this line is the epoch's record.
            print(
                f"{self.label} epoch {epoch}/{config.epochs}: "
                f"loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
                f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} | "
                f"{row['epoch_time_s']:.1f}s {row['samples_per_s']:,.0f} samples/s",
                flush=True,
            )
            if self.checkpoints is not None:
                self.checkpoints.save(
                    {
                        "epoch": epoch,
                        "model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": cuda_rng_states(),
                        "history": history,
                        "best_metric": best_metric,
                        "best_epoch": best_epoch,
                        "best_model": best_state,
                        "since_best": since_best,
                        "extra": extra,
                    }
                )
            if self.on_epoch_end is not None:
                self.on_epoch_end(row)
        self.model.load_state_dict(best_state)
        return FitResult(
            history,
            best_epoch,
            best_metric,
            stopped_early,
            resumed_from_epoch=first_epoch - 1,
            extra=extra,
        )
