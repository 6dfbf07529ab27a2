"""Where and how training runs: device, numeric precision, seeds and determinism."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dlpipe.errors import DlpipeError


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """bf16 autocast where chosen (CUDA, or CPUs with native bf16); a no-op otherwise."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return {"mps": "Apple MPS", "cpu": "CPU"}.get(self.device.type, self.device.type)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX tiles or AVX512-BF16), where bf16 autocast
    trains 1.5-2.5x faster than fp32 at the same accuracy."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def select_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if not available[requested]:
        raise DlpipeError(f"device {requested!r} requested but not available; use device: auto")
    return torch.device(requested)


def make_runtime(device: str, precision: str) -> Runtime:
    """Resolve `auto` settings; turn on TF32 matmuls on CUDA (bf16 autocast covers the rest)."""
    chosen = select_device(device)
    if precision == "auto":
        bf16 = chosen.type == "cuda" or (chosen.type == "cpu" and cpu_has_fast_bf16())
    else:
        bf16 = precision == "bf16"
    if chosen.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(chosen, bf16)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; optionally force deterministic kernels (slower on GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
