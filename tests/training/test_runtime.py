"""What the GPU path depends on, checked where a CPU can check it: the precision `auto` picks, the
warning when CUDA is installed but unusable, the measured compute dtypes a run is tagged with,
loss scaling, device synchronisation around the epoch timer, and an epoch loop that reads nothing
back from the device per batch.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import pytest
import torch
from support.families import dataset_of, family_model
from support.tiny import TinyProject
from torch.utils._python_dispatch import TorchDispatchMode

from dlpipe import paths
from dlpipe.config import train_config
from dlpipe.data.tensors import load_split
from dlpipe.errors import DlpipeError
from dlpipe.family import DataMeta
from dlpipe.io import read_json
from dlpipe.training import runtime as runtime_module
from dlpipe.training.checkpoint import CheckpointStore
from dlpipe.training.runtime import (
    Runtime,
    compute_dtypes,
    precision_label,
    select_device,
    select_precision,
)
from dlpipe.training.trainer import Trainer

CPU = torch.device("cpu")
GPU = torch.device("cuda", 0)


# --- precision --------------------------------------------------------------------------------


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda_asks_for_native_bf16(
    monkeypatch: pytest.MonkeyPatch, native_bf16: bool, expected: str
) -> None:
    asked: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return native_bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert select_precision("auto", GPU) == expected
    assert asked == [False]  # emulated bf16 does not count


def test_forced_bf16_without_native_support_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(DlpipeError, match="precision bf16: Tesla T4 has no native bf16"):
        select_precision("bf16", GPU)
    assert select_precision("fp32", GPU) == "fp32"


@pytest.mark.parametrize(("fast", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, fast: bool, expected: str
) -> None:
    monkeypatch.setattr(runtime_module, "cpu_has_fast_bf16", lambda: fast)
    assert select_precision("auto", CPU) == expected


def test_auto_precision_on_the_cpu_stays_fp32_for_families_without_bf16_gains(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runtime_module, "cpu_has_fast_bf16", lambda: True)
    assert select_precision("auto", CPU, cpu_bf16=False) == "fp32"
    assert select_precision("bf16", CPU, cpu_bf16=False) == "bf16"  # asked for, so given


def test_fp16_needs_cuda() -> None:
    with pytest.raises(DlpipeError, match="precision fp16 needs CUDA; on cpu use bf16 or fp32"):
        select_precision("fp16", CPU)


def test_only_fp16_scales_the_loss() -> None:
    assert not Runtime(CPU, "fp32").grad_scaler().is_enabled()
    assert not Runtime(CPU, "bf16").grad_scaler().is_enabled()
    assert Runtime(CPU, "fp16").grad_scaler().is_enabled()  # CPU scaler: the same code path


# --- CUDA installed but unusable ----------------------------------------------------------------


def broken_cuda(monkeypatch: pytest.MonkeyPatch, driver: bool) -> None:
    """A CUDA build of torch on a machine whose NVIDIA driver is too old for it."""

    def init() -> None:
        raise RuntimeError(
            "The NVIDIA driver on your system is too old (found version 12020).\n"
            "Please update your GPU driver."
        )

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", init)
    monkeypatch.setattr(runtime_module, "nvidia_driver_present", lambda: driver)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_auto_says_in_one_line_why_it_falls_back_to_the_cpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken_cuda(monkeypatch, driver=True)
    assert select_device("auto") == CPU
    assert capsys.readouterr().err == (
        "warning: CUDA is unusable (The NVIDIA driver on your system is too old "
        "(found version 12020).); training on the CPU\n"
    )
    with pytest.raises(DlpipeError, match=r"device 'cuda' requested but The NVIDIA driver"):
        select_device("cuda")


def test_no_warning_without_an_nvidia_driver_or_with_gpus_hidden(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    broken_cuda(monkeypatch, driver=False)
    assert select_device("auto") == CPU
    monkeypatch.setattr(runtime_module, "nvidia_driver_present", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert select_device("auto") == CPU
    assert capsys.readouterr().err == ""


# --- measured compute dtypes --------------------------------------------------------------------


class HalfFp32(torch.nn.Module):
    """A linear layer under autocast, then one kept in fp32 on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        with torch.autocast("cpu", enabled=False):
            return self.second(x.float())


def test_compute_dtypes_are_what_the_kernels_were_given() -> None:
    model = HalfFp32().train()
    x = torch.randn(4, 8)
    dtypes = compute_dtypes(model, (x,), Runtime(CPU, "bf16"))
    assert dtypes == {"addmm": "bf16+fp32"}
    assert model.training  # the probe restores the mode
    assert compute_dtypes(model, (x,), Runtime(CPU, "fp32")) == {"addmm": "fp32"}


def test_precision_label_names_the_kernels_in_another_dtype() -> None:
    assert precision_label("bf16", {"addmm": "bf16", "convolution": "bf16"}) == "bf16"
    mixed = {"addmm": "bf16", "_cudnn_rnn": "fp32"}
    assert precision_label("bf16", mixed) == "bf16 (fp32: _cudnn_rnn)"
    assert precision_label("bf16", {"_cudnn_rnn": "fp16", "mm": "fp32"}) == (
        "bf16 (fp16: _cudnn_rnn; fp32: mm)"
    )


@pytest.mark.parametrize("family", ["cnn", "rnn", "transformer"])
def test_every_family_computes_in_the_autocast_dtype_on_the_cpu(
    tiny_project: TinyProject, family: str
) -> None:
    split, meta = tiny_data(family)
    model = family_model(family, tiny_project.params, meta)
    inputs, _ = split.batch(torch.arange(4))
    dtypes = compute_dtypes(model, inputs, Runtime(CPU, "bf16"))
    assert dtypes and set(dtypes.values()) == {"bf16"}, dtypes


# --- the epoch loop -----------------------------------------------------------------------------


def tiny_data(family: str) -> tuple[Any, DataMeta]:
    prepared = paths.PREPARED_DIR / dataset_of(family)
    return load_split(prepared, "train"), DataMeta.from_json(read_json(prepared / "meta.json"))


class DeviceReads(TorchDispatchMode):
    """Every tensor read back as a Python number (`.item()`, `int(t)`: on a GPU, a sync), but
    the optimizer's reads of its step counters, which PyTorch keeps on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.read: list[torch.Tensor] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = traceback.extract_stack()
            if not any(f"torch{os.sep}optim{os.sep}" in frame.filename for frame in frames):
                self.read.append(args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("family", ["rnn", "cnn"])
def test_an_epoch_reads_from_the_device_only_at_its_end(
    tiny_project: TinyProject, family: str
) -> None:
    """8 batches of text (with gradient clipping and, the RNN's default, an adversarial pass) or
    images; 2 reads in all (loss and accuracy sums; 3 with the adversarial loss's), none per
    batch."""
    params = tiny_project.with_train(family, epochs=1)
    config = train_config(params, family)
    train, meta = tiny_data(family)
    trainer = Trainer(family_model(family, params, meta), config, Runtime(CPU, "fp32"), 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda step: 1.0)
    with DeviceReads() as reads:
        row = trainer._train_epoch(train, 1, scheduler)
    assert train.steps(config.batch_size) == 8
    assert len(reads.read) == 2 + (config.adversarial_eps > 0), reads.read
    assert row["train_loss"] > 0


def test_the_epoch_timer_waits_for_the_device(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    monkeypatch.setattr(Runtime, "synchronize", lambda self: events.append("sync"))
    params = tiny_project.with_train("cnn", epochs=1)
    train, meta = tiny_data("cnn")
    trainer = Trainer(
        family_model("cnn", params, meta), train_config(params, "cnn"), Runtime(CPU, "fp32"), 0
    )
    trainer.fit(train, train)
    assert events == ["sync", "sync"]  # before the clock starts and before it stops


def test_loss_scaling_trains_and_resumes(tiny_project: TinyProject, tmp_path: Any) -> None:
    """fp16's GradScaler path (unscale before clipping, scaled step), run on the CPU."""
    params = tiny_project.with_train("cnn", epochs=2, grad_clip=1.0, max_steps_per_epoch=3)
    config = train_config(params, "cnn")
    train, meta = tiny_data("cnn")
    store = CheckpointStore(tmp_path / "ck")

    def stop(row: dict[str, float]) -> None:
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    runtime = Runtime(CPU, "fp16")
    first = Trainer(family_model("cnn", params, meta), config, runtime, 0, store, stop)
    with pytest.raises(KeyboardInterrupt):
        first.fit(train, train)
    state = store.load()
    assert state is not None and state["scaler"]["scale"] > 0
    resumed = Trainer(family_model("cnn", params, meta), config, runtime, 0, store)
    result = resumed.fit(train, train, resume=state)
    assert resumed.scaler.get_scale() > 0 and len(result.history) == 2
    assert all(row["train_loss"] == row["train_loss"] for row in result.history)  # not NaN
