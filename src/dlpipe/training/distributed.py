"""Data-parallel training under torchrun: which process this is, and the collectives the trainer
needs.

torchrun (or any launcher that sets RANK, WORLD_SIZE and LOCAL_RANK, MASTER_ADDR and MASTER_PORT)
starts one process per device. Each trains on its slice of every global batch, and
DistributedDataParallel averages their gradients, so `batch_size` in params.yaml is the global
batch and the learning rate needs no rescaling: 1 and N processes train the same recipe. Without
those variables there is one process and every collective here is a no-op.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dlpipe.errors import DlpipeError


@dataclass(frozen=True)
class World:
    """This process's place among the training's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # which device of this machine it drives

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes outputs, checkpoints and MLflow records."""
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> World:
        """The world torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK (one process when
        they are unset)."""
        env = os.environ if env is None else env
        values = {}
        for var, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
            raw = env.get(var, "")
            try:
                values[var] = int(raw) if raw else default
            except ValueError:
                raise DlpipeError(f"{var}={raw!r}: not an integer (set by torchrun)") from None
        rank, size, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
        if size < 1 or not 0 <= rank < size or local < 0:
            raise DlpipeError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local}: inconsistent")
        return cls(rank, size, local)

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """`values` summed (or maxed, op="max") over all processes: every process gets the same
        numbers, so all of them take the same early-stopping and best-epoch decisions."""
        if not self.distributed:
            return values
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(tensor, op=reduce_op)
        return [float(v) for v in tensor.tolist()]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` (e.g. the checkpoint it read), on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=_collective_device())
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (e.g. their generator states)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def _collective_device() -> torch.device:
    """Where the process group's tensors live: the process's GPU for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """The process group for the block (NCCL on CUDA, gloo on the CPU); nothing for one process.
    It is torn down only after a clean finish: when the block fails, a peer may be gone, tearing
    down could wait for it, and torchrun stops the other processes anyway."""
    if not world.distributed:
        yield
        return
    if device.type not in ("cuda", "cpu"):
        raise DlpipeError(f"device {device.type}: data-parallel training needs CUDA or the CPU")
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()


def check_batch_size(batch_size: int, processes: int, family: str) -> None:
    """batch_size is the global batch: each of `processes` takes an equal slice of it."""
    if batch_size % processes:
        raise DlpipeError(
            f"train.{family}.batch_size {batch_size} does not divide among {processes} processes "
            f"(it is the global batch; each process takes batch_size / {processes})"
        )


def under_launcher() -> bool:
    """True in a process that torchrun (or another launcher) started as one of many."""
    return "RANK" in os.environ


def relaunch_under_torchrun(nproc: int, argv: list[str]) -> None:
    """Replace this process by `torchrun --standalone --nproc_per_node=nproc <argv>` when
    nproc > 1 and no launcher started it. DVC then waits on torchrun, which starts the workers,
    forwards Ctrl-C and SIGTERM to them, and stops all of them when one fails."""
    if nproc <= 1 or under_launcher():
        return
    script, *args = argv
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        os.path.abspath(script),
        *args,
    ]
    print(f"{os.path.basename(script)}: {nproc} processes: {' '.join(command[1:])}", flush=True)
    sys.stderr.flush()
    os.execv(sys.executable, command)
