"""One training loop for every model family, in one process or data-parallel under torchrun.

Everything model-specific is in the model module and in `Split.batch`; the loop only sees
`model(*inputs) -> logits`. It checkpoints after every epoch and can resume from such a
checkpoint to exactly the weights and metrics of an uninterrupted run (on the CPU).

Under torchrun every process plans the same global batch order, takes its slice of each batch
and trains a DistributedDataParallel copy of the model; losses, accuracies and validation are
summed over the processes, so all of them see the same metrics and stop at the same epoch. The
epoch loop reads nothing back from the device: metrics accumulate there and are read once an
epoch.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dlpipe.config import TrainConfig
from dlpipe.data.tensors import Split
from dlpipe.training.adversarial import EmbeddingAdversary
from dlpipe.training.checkpoint import CheckpointStore
from dlpipe.training.distributed import World
from dlpipe.training.runtime import Runtime
from dlpipe.training.schedule import make_optimizer, make_scheduler

EpochCallback = Callable[[dict[str, float]], None]
StopCallback = Callable[[int, float], bool]  # (epoch, monitored value) -> stop now?


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
    for batch in split.batches(batch_size):
        inputs, _ = split.batch(batch.index, batch.width)
        with runtime.autocast():
            logits = model(*inputs).float()
        if out is None:
            out = torch.empty(len(split), logits.shape[1], device=logits.device)
        out[batch.index] = logits
    assert out is not None, "empty split"
    return out


def rng_state(device: torch.device) -> dict[str, Tensor | None]:
    """This process's generators: the CPU's, and its own GPU's only (not every visible GPU's, so
    a checkpoint resumes on a machine with another number of GPUs)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _shuffle_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator per epoch, so the batch order of epoch k never depends on earlier epochs."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def _rank_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """Dropout's seed on process `rank` > 0 (rank 0 draws what one process would)."""
    return (seed * 1_000_003 + rank * 7_919 + epoch) % 2**63


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
        world: World | None = None,
        stop: StopCallback | None = None,
    ) -> None:
        self.world = world or World()
        self.config = config
        self.runtime = runtime
        self.seed = seed
        self.checkpoints = checkpoints
        self.on_epoch_end = on_epoch_end
        self.stop = stop  # asked after every epoch (a search's pruner); rank 0's answer counts
        self.label = label
        self.model = model.to(runtime.device)
        self.network: nn.Module = self.model  # what the training steps call
        if self.world.distributed:
            if runtime.device.type == "cuda":  # BatchNorm over the global batch (CUDA only)
                self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            device_ids = [runtime.device] if runtime.device.type == "cuda" else None
            self.network = DistributedDataParallel(self.model, device_ids=device_ids)
            if self.world.rank > 0:  # other dropout masks than rank 0's
                torch.manual_seed(_rank_seed(seed, self.world.rank))
        self.optimizer = make_optimizer(self.model, config)
        self.scaler = runtime.grad_scaler()
        self.adversary = (
            EmbeddingAdversary(self.model, config.adversarial_eps)
            if config.adversarial_eps > 0
            else None
        )

    def _better(self, value: float, best: float) -> bool:
        return value < best if self.config.monitor == "val_loss" else value > best

    def _print(self, line: str) -> None:
        if self.world.is_main:
            print(line, flush=True)

    @torch.no_grad()
    def _evaluate(self, split: Split) -> tuple[float, float]:
        """Loss and accuracy over `split`, each process taking every world.size-th batch."""
        self.model.eval()  # the bare module: no DDP collective per (uneven) batch
        device = self.runtime.device
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        batches = split.batches(self.config.eval_batch_size)
        for batch in batches[self.world.rank :: self.world.size]:
            inputs, targets = split.batch(batch.index, batch.width)
            with self.runtime.autocast():
                logits = self.model(*inputs).float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum")
            correct += (logits.argmax(1) == targets).sum()
        total_loss, total_correct = self.world.all_reduce([loss_sum.item(), correct.item()])
        return total_loss / len(split), total_correct / len(split)

    def _train_epoch(self, train: Split, epoch: int, scheduler: Any) -> dict[str, float]:
        config, device, world = self.config, self.runtime.device, self.world
        self.network.train()
        generator = _shuffle_generator(self.seed, epoch)
        batches = train.batches(config.batch_size, generator, world.rank, world.size)
        if config.max_steps_per_epoch:
            batches = batches[: config.max_steps_per_epoch]
        loss_sum = torch.zeros((), device=device)
        adversarial_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        bar = tqdm(
            batches,
            desc=f"{self.label} epoch {epoch}/{config.epochs}",
            unit="batch",
            disable=not (sys.stderr.isatty() and world.is_main),
            leave=True,
        )
        adversary = self.adversary.attached() if self.adversary else nullcontext()
        # With an adversarial pass after the clean one, DDP averages the gradients once, after it.
        first_pass: Callable[[], AbstractContextManager[Any]] = nullcontext
        if self.adversary and isinstance(self.network, DistributedDataParallel):
            first_pass = self.network.no_sync
        self.runtime.synchronize()
        start = time.perf_counter()
        with adversary:
            for step, batch in enumerate(bar):
                inputs, targets = train.batch(batch.index, batch.width)
                self.optimizer.zero_grad(set_to_none=True)
                with first_pass():
                    logits, loss = self._loss(inputs, targets)
                    self._backward(loss, batch.share)
                if self.adversary is not None:
                    self.adversary.arm()
                    _, adversarial = self._loss(inputs, targets)
                    self._backward(adversarial, batch.share)
                    adversarial_sum += adversarial.detach() * len(targets)
                if config.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), config.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                scheduler.step()
                loss_sum += loss.detach() * len(targets)
                correct += (logits.argmax(1) == targets).sum()
                seen += len(targets)
                if step % 20 == 0 and not bar.disable:  # the live bar reads the loss (TTY only)
                    rate = seen * world.size / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{rate:,.0f}")
        self.runtime.synchronize()
        elapsed = time.perf_counter() - start
        sums = [loss_sum.item(), float(correct.item()), float(seen)]
        if self.adversary is not None:
            sums.append(adversarial_sum.item())
        total_loss, total_correct, total_seen, *total_adversarial = world.all_reduce(sums)
        row = {"train_loss": total_loss / max(1.0, total_seen)}
        if total_adversarial:
            row["train_adversarial_loss"] = total_adversarial[0] / max(1.0, total_seen)
        return row | {
            "train_accuracy": total_correct / max(1.0, total_seen),
            "epoch_time_s": elapsed,
            "samples_per_s": total_seen / elapsed if elapsed > 0 else 0.0,
        }

    def _loss(self, inputs: tuple[Tensor, ...], targets: Tensor) -> tuple[Tensor, Tensor]:
        """The network's logits and its training loss on one batch."""
        with self.runtime.autocast():
            logits = self.network(*inputs)
            loss = F.cross_entropy(
                logits.float(), targets, label_smoothing=self.config.label_smoothing
            )
        return logits, loss

    def _backward(self, loss: Tensor, share: float) -> None:
        """DDP averages gradients over processes: weighting by the share of an uneven last batch
        makes that average the mean over the global batch's rows."""
        self.scaler.scale(loss if share == 1.0 else loss * share).backward()

    def _restore_rng(self, resume: dict[str, Any]) -> None:
        """Each process's generators as checkpointed; fresh per-process seeds when the
        checkpoint comes from another number of processes."""
        states = resume["rng"]
        device = self.runtime.device
        if len(states) != self.world.size:
            self._print(
                f"{self.label}: checkpoint from {len(states)} process(es), resuming on "
                f"{self.world.size}: dropout draws are reseeded"
            )
            torch.manual_seed(_rank_seed(self.seed, self.world.rank, resume["epoch"]))
            return
        state = states[self.world.rank]
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], device)

    def _peak_memory_mb(self) -> float:
        """The largest GPU memory any process allocated since the epoch began."""
        peak = torch.cuda.max_memory_allocated(self.runtime.device) / 2**20
        return self.world.all_reduce([peak], op="max")[0]

    def fit(
        self,
        train: Split,
        val: Split,
        resume: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> FitResult:
        """Train for `config.epochs` (or until early stopping, or `stop` says so); the best
        weights end up loaded."""
        config, world = self.config, self.world
        cuda = self.runtime.device.type == "cuda"
        steps = train.steps(config.batch_size, world.size)
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
            if resume["scaler"]:
                self.scaler.load_state_dict(resume["scaler"])
            self._restore_rng(resume)
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
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.runtime.device)
            lr = self.optimizer.param_groups[0]["lr"]
            row: dict[str, float] = {"epoch": epoch, "lr": lr}
            row |= self._train_epoch(train, epoch, scheduler)
            row["val_loss"], row["val_accuracy"] = self._evaluate(val)
            if cuda:
                row["peak_gpu_memory_mb"] = self._peak_memory_mb()
            history.append(row)
            if self._better(row[config.monitor], best_metric):
                best_metric, best_epoch, since_best = row[config.monitor], epoch, 0
                best_state = copy.deepcopy(self.model.state_dict())
            else:
                since_best += 1
            # The bar (TTY only) shows progress inside the epoch; this line is the epoch's record.
            self._print(
                f"{self.label} epoch {epoch}/{config.epochs}: "
                f"loss {row['train_loss']:.4f} acc {row['train_accuracy']:.4f} | "
                f"val_loss {row['val_loss']:.4f} val_acc {row['val_accuracy']:.4f} | "
                f"{row['epoch_time_s']:.1f}s {row['samples_per_s']:,.0f} samples/s"
            )
            rng = world.gather(rng_state(self.runtime.device))  # every process's, for resume
            if self.checkpoints is not None:
                self.checkpoints.save(
                    {
                        "epoch": epoch,
                        "model": self.model.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": self.scaler.state_dict(),
                        "rng": rng,
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
            if self.stop is not None and world.broadcast(self.stop(epoch, row[config.monitor])):
                stopped_early = True
                break
        self.model.load_state_dict(best_state)
        return FitResult(
            history,
            best_epoch,
            best_metric,
            stopped_early,
            resumed_from_epoch=first_epoch - 1,
            extra=extra,
        )
