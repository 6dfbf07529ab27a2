"""Where and how training runs: device, numeric precision, seeds and determinism.

Determinism is asked of torch in warn-only mode: a kernel without a deterministic variant (on
CUDA, a few scatter/index kernels; cuBLAS without its workspace setting) still runs, and
`watch_nondeterminism` names it, so the run can be tagged `best-effort` rather than `true`.

The precision a run is tagged with is measured, not assumed: `compute_dtypes` runs one forward
pass and records the dtype each matrix-multiply, convolution, attention or RNN kernel was given
(after autocast's casts), so a layer that autocast hands another dtype, or that a model keeps in
fp32 on purpose, shows in the tag.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dlpipe.errors import DlpipeError

Precision = Literal["bf16", "fp16", "fp32"]
PrecisionSetting = Literal["auto", "bf16", "fp16", "fp32"]
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
CUBLAS_DETERMINISTIC = ":4096:8"  # CUBLAS_WORKSPACE_CONFIG for reproducible cuBLAS results
SHORT_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

# The kernels that do a model's arithmetic, as the dispatcher sees them after autocast: their
# input dtype is the precision the model really computes in.
COMPUTE_OPS = frozenset(
    {
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "convolution",
        "_cudnn_rnn",
        "miopen_rnn",
        "mkldnn_rnn_layer",
        "_thnn_fused_gru_cell",
        "_thnn_fused_lstm_cell",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    }
)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: Precision

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager[object]:
        """bf16 or fp16 autocast where chosen; a no-op for fp32."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, on for fp16 only (its gradients underflow without it); a disabled scaler
        passes every call straight through to the optimizer."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def synchronize(self) -> None:
        """Wait for the device's queued work: GPU timings taken without it measure the launches."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    @property
    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return {"mps": "Apple MPS", "cpu": "CPU"}.get(self.device.type, self.device.type)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 natively (AMX tiles or AVX512-BF16), where bf16 autocast
    trains convolutions faster than fp32 at the same accuracy (but not every model: see
    `Family.cpu_bf16`)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def nvidia_driver_present() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidiactl").exists()


def cuda_unusable_reason() -> str | None:
    """Why this CUDA build of torch cannot use the machine's NVIDIA GPU (e.g. a driver older than
    the wheels' CUDA); None when CUDA works, when torch has no CUDA, when the machine has no
    NVIDIA driver, or when CUDA_VISIBLE_DEVICES hides every GPU on purpose."""
    if torch.version.cuda is None or torch.cuda.is_available() or not nvidia_driver_present():
        return None
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return None
    try:
        torch.cuda.init()
    except Exception as err:  # torch raises RuntimeError or AssertionError, message varies
        lines = str(err).strip().splitlines()
        return lines[0] if lines else type(err).__name__
    return "torch sees no CUDA device"


def select_device(requested: str, local_rank: int = 0, warn: bool = True) -> torch.device:
    """The device `requested` (auto: CUDA, then MPS, then the CPU); on CUDA, GPU `local_rank`
    (the process's GPU under torchrun). `warn`: say in one line why auto skips an NVIDIA GPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            reason = cuda_unusable_reason()
            if reason and warn:
                print(f"warning: CUDA is unusable ({reason}); training on the CPU", file=sys.stderr)
            requested = "cpu"
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    if not available[requested]:
        reason = (cuda_unusable_reason() if requested == "cuda" else None) or "not available"
        raise DlpipeError(f"device {requested!r} requested but {reason}; use device: auto")
    if requested != "cuda":
        return torch.device(requested)
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DlpipeError(
            f"process {local_rank} of this machine needs GPU {local_rank}, but {count} are "
            "visible; start at most one process per GPU"
        )
    return torch.device("cuda", local_rank)


def select_precision(
    requested: PrecisionSetting, device: torch.device, cpu_bf16: bool = True
) -> Precision:
    """auto: bf16 on GPUs that compute it natively (else fp16 with loss scaling), bf16 on CPUs
    with AMX or AVX512-BF16 for models that gain from it (`cpu_bf16`, a family's measured
    property), fp32 otherwise. A forced bf16 or fp16 the device cannot do well is an error, not a
    silent emulation."""
    cuda = device.type == "cuda"
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False) if cuda else False
    if requested == "auto":
        if cuda:
            return "bf16" if native_bf16 else "fp16"
        fast = cpu_bf16 and device.type == "cpu" and cpu_has_fast_bf16()
        return "bf16" if fast else "fp32"
    if requested == "fp16" and not cuda:
        raise DlpipeError(f"precision fp16 needs CUDA; on {device.type} use bf16 or fp32")
    if requested == "bf16" and cuda and not native_bf16:
        raise DlpipeError(
            f"precision bf16: {torch.cuda.get_device_name(device)} has no native bf16; "
            "use auto (fp16 with loss scaling) or fp32"
        )
    return requested


def make_runtime(
    device: str,
    precision: PrecisionSetting,
    local_rank: int = 0,
    deterministic: bool = False,
    cpu_bf16: bool = True,
) -> Runtime:
    """Resolve `auto` settings; on CUDA make GPU `local_rank` current and turn on TF32 matmuls
    (autocast covers the rest). `deterministic`: first give cuBLAS its deterministic workspace
    setting (unless the user chose one), which it reads once, before CUDA starts."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
    chosen = select_device(device, local_rank, warn=local_rank == 0)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(chosen, select_precision(precision, chosen, cpu_bf16))


class _DtypeProbe(TorchDispatchMode):
    """Records the dtype of the first floating-point input of every compute kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in COMPUTE_OPS:
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
                    self.seen.setdefault(name, set()).add(leaf.dtype)
                    break
        return func(*args, **kwargs)


@torch.no_grad()
def compute_dtypes(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], runtime: Runtime
) -> dict[str, str]:
    """{kernel: dtype it was given} for one forward pass of `model` on `inputs` under the
    runtime's autocast, e.g. {"addmm": "bf16", "_cudnn_rnn": "fp32"} (eval mode: no dropout draw,
    no BatchNorm update; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with _DtypeProbe() as probe, runtime.autocast():
            model(*inputs)
    finally:
        model.train(was_training)
    return {
        name: "+".join(sorted(SHORT_DTYPES.get(d, str(d).removeprefix("torch.")) for d in kinds))
        for name, kinds in sorted(probe.seen.items())
    }


def precision_label(precision: Precision, dtypes: dict[str, str]) -> str:
    """The precision a run really used: the runtime's, followed by the kernels that computed in
    another dtype, e.g. "bf16 (fp32: _cudnn_rnn)"."""
    others: dict[str, list[str]] = {}
    for name, dtype in dtypes.items():
        if dtype != precision:
            others.setdefault(dtype, []).append(name)
    if not others:
        return precision
    detail = "; ".join(f"{dtype}: {', '.join(names)}" for dtype, names in sorted(others.items()))
    return f"{precision} ({detail})"


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed python, numpy and torch; turn deterministic kernels on (slower on GPU) or off, so a
    mode left on by an earlier training in the same process does not carry over."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC)
        torch.backends.cudnn.benchmark = False


# torch's warnings, in warn-only mode, for a kernel that ran without a deterministic variant
# ("<kernel> does not have a deterministic implementation, ...") and for cuBLAS run without
# CUBLAS_WORKSPACE_CONFIG ("... is not deterministic because it uses CuBLAS ...").
_NONDETERMINISTIC = re.compile(
    r"(?P<kernel>.+?) does not have a deterministic implementation"
    r"|.*not deterministic because it uses (?P<library>CuBLAS)",
    re.DOTALL,
)


def nondeterministic_kernel(message: str) -> str | None:
    """The kernel a torch determinism warning names; None for any other warning."""
    found = _NONDETERMINISTIC.match(message)
    if found is None:
        return None
    return found["kernel"] or found["library"]


@contextlib.contextmanager
def watch_nondeterminism() -> Iterator[list[str]]:
    """The kernels without a deterministic variant that ran in the block (with deterministic
    algorithms on, see `seed_everything`), in the order torch first warned of them. Each such
    warning is shown once, even when one like it was shown before the block; other warnings are
    shown as they would be without the watch."""
    kernels: list[str] = []
    with warnings.catch_warnings():
        show = warnings.showwarning

        def record(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: Any = None,
            line: str | None = None,
        ) -> None:
            kernel = nondeterministic_kernel(str(message))
            if kernel is not None:
                if kernel in kernels:
                    return
                kernels.append(kernel)
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = record
        # every occurrence reaches `record`, not just the first per place that Python would show
        warnings.filterwarnings("always", message=_NONDETERMINISTIC.pattern, category=UserWarning)
        yield kernels


def determinism_label(deterministic: bool, nondeterministic_kernels: list[str]) -> str:
    """The run's `deterministic` tag: "false" when not asked for, "true" when asked for and no
    kernel ran without a deterministic variant, else "best-effort (<those kernels>)"."""
    if not deterministic:
        return "false"
    if not nondeterministic_kernels:
        return "true"
    return f"best-effort ({', '.join(nondeterministic_kernels)})"
