"""On CUDA: what each family's kernels really compute in (what cuDNN, cuBLAS and the attention
kernels are given, not the dtype of the last layer's output), one epoch's loss on the GPU against
the CPU's, every family training an epoch under bf16 autocast with the GPU's system metrics and
peak memory in MLflow, and, with two GPUs, the train stage as two NCCL processes.

Marked `gpu`, so the default run deselects them (`pytest -m gpu` runs them), and skipped where
CUDA is missing. They reuse the tiny project of the training tests (256 synthetic rows).
"""

from __future__ import annotations

import json
import math
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from support.families import MODELS, dataset_of, family_model
from support.tiny import TinyProject, hook_after_epoch
from test_distributed import finish, stage

from dlpipe.config import train_config
from dlpipe.data.tensors import Split, load_split
from dlpipe.family import DataMeta
from dlpipe.training import run as run_module
from dlpipe.training.runtime import compute_dtypes, make_runtime, precision_label, seed_everything
from dlpipe.training.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU_PREFIX = "system/gpu_"


def wait_for_gpu_metrics(uri: str, timeout_s: float = 30) -> None:
    """Keep the active run open until MLflow's monitor has logged a GPU sample: a tiny training
    can end before the first sampling interval, and then no system metrics are logged at all."""
    active = mlflow.active_run()
    assert active is not None
    run_id, client = active.info.run_id, MlflowClient(uri)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(k.startswith(GPU_PREFIX) for k in client.get_run(run_id).data.metrics):
            return
        time.sleep(0.2)
    metrics = sorted(client.get_run(run_id).data.metrics)
    raise AssertionError(f"no {GPU_PREFIX}* metric within {timeout_s:.0f}s; logged: {metrics}")


def tiny(project: TinyProject, family: str, split: str = "val") -> tuple[Split, DataMeta]:
    prepared = project.root / "data" / "prepared" / dataset_of(family)
    meta = DataMeta.from_json(json.loads((prepared / "meta.json").read_text()))
    return load_split(prepared, split), meta


@pytest.mark.parametrize("family", MODELS)
def test_the_kernels_compute_in_bf16_but_the_rnn_recurrence_in_fp32(
    tiny_project: TinyProject, family: str
) -> None:
    """The dtypes cuBLAS, cuDNN and the attention kernels receive under bf16 autocast: bf16
    everywhere but cuDNN's RNN, which the RNN runs in fp32 on purpose (autocast's cuDNN RNN
    wrapper would hand it float16). A float16 kernel would show here as "fp16"."""
    runtime = make_runtime("cuda", "bf16")
    assert runtime.device.type == "cuda" and runtime.precision == "bf16"
    params = tiny_project.with_train(family, device="cuda", precision="bf16")
    split, meta = tiny(tiny_project, family)
    split = split.to(runtime.device)
    model = family_model(family, params, meta).to(runtime.device)
    inputs, _ = split.batch(torch.arange(8, device=runtime.device))
    dtypes = compute_dtypes(model, inputs, runtime)
    recurrent = {name: dtype for name, dtype in dtypes.items() if "rnn" in name}
    assert "bf16" in dtypes.values(), dtypes  # autocast is on for the rest
    if recurrent:
        assert recurrent == {"_cudnn_rnn": "fp32"}, dtypes  # what cuDNN was given
        assert precision_label("bf16", dtypes) == "bf16 (fp32: _cudnn_rnn)"
    else:
        assert set(dtypes.values()) == {"bf16"}, dtypes
    with runtime.autocast():
        logits = model(*inputs)
    assert logits.device.type == "cuda" and torch.isfinite(logits.float()).all()


def one_epoch_loss(project: TinyProject, family: str, device: str, precision: str) -> float:
    """Train loss of one epoch from the same initial weights and batch order (no dropout)."""
    params = project.with_train(family, epochs=1, model={"dropout": 0.0})
    runtime = make_runtime(device, precision)
    train, meta = tiny(project, family, "train")
    val, _ = tiny(project, family)
    seed_everything(params.seed, deterministic=False)
    model = family_model(family, params, meta)
    trainer = Trainer(model, train_config(params, family), runtime, params.seed)
    result = trainer.fit(train.to(runtime.device), val.to(runtime.device))
    return result.history[0]["train_loss"]


@pytest.mark.parametrize("family", MODELS)
def test_one_epoch_loss_on_cuda_matches_the_cpu(tiny_project: TinyProject, family: str) -> None:
    cpu = one_epoch_loss(tiny_project, family, "cpu", "fp32")
    assert one_epoch_loss(tiny_project, family, "cuda", "fp32") == pytest.approx(cpu, rel=0.02)
    assert one_epoch_loss(tiny_project, family, "cuda", "bf16") == pytest.approx(cpu, rel=0.1)


@pytest.mark.parametrize("family", MODELS)
def test_one_bf16_epoch_on_cuda_is_tracked_with_gpu_metrics(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    uri = tiny_project.tracking_uri
    params = tiny_project.with_train(family, device="cuda", precision="bf16", epochs=1)
    hook_after_epoch(monkeypatch, lambda row: wait_for_gpu_metrics(uri))

    summary = run_module.train(family, params)

    assert summary["device"] == torch.cuda.get_device_name()
    assert summary["precision"].startswith("bf16")  # "bf16 (fp32: _cudnn_rnn)" for the RNN
    assert summary["epochs"] == 1
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        assert math.isfinite(summary["final"][key]), (key, summary["final"])

    info = json.loads((tiny_project.root / "data/models" / family / "mlflow_run.json").read_text())
    client = MlflowClient(uri)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["precision"] == summary["precision"]
    assert run.data.metrics["peak_gpu_memory_mb"] > 0
    assert run.data.tags["device"] == torch.cuda.get_device_name()
    [loss] = client.get_metric_history(run.info.run_id, "train_loss")
    assert loss.step == 1 and math.isfinite(loss.value)
    gpu = sorted(k for k in run.data.metrics if k.startswith(GPU_PREFIX))
    assert gpu, sorted(run.data.metrics)
    assert any("memory" in k for k in gpu) and any("utilization" in k for k in gpu), gpu


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_the_train_stage_as_two_nccl_processes(tiny_project: TinyProject) -> None:
    tiny_project.write_params(tiny_project.with_train("cnn", device="cuda", nproc=2))
    code, output = finish(stage(tiny_project))
    assert code == 0, output[-3000:]
    info = json.loads((tiny_project.root / "data/models/cnn/mlflow_run.json").read_text())
    run = MlflowClient(tiny_project.tracking_uri).get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
