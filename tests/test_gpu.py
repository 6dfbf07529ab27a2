"""On CUDA: every model family trains an epoch under bf16 autocast with a finite loss, and MLflow's
system metrics include the GPU's (`system/gpu_*`).

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
from conftest import FAMILIES, TinyProject, dataset_of, family_model, hook_after_epoch
from mlflow.tracking import MlflowClient

from dlpipe.data.tensors import load_split
from dlpipe.family import DataMeta
from dlpipe.training import run as run_module
from dlpipe.training.runtime import make_runtime

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


@pytest.mark.parametrize("family", FAMILIES)
def test_autocast_computes_in_bf16_on_cuda(tiny_project: TinyProject, family: str) -> None:
    runtime = make_runtime("cuda", "bf16")
    assert runtime.device.type == "cuda" and runtime.precision == "bf16"
    params = tiny_project.with_train(family, device="cuda", precision="bf16")
    prepared = tiny_project.root / "data" / "prepared" / dataset_of(family)
    split = load_split(prepared, "val", channels_last=False).to(runtime.device)
    meta = DataMeta.from_json(json.loads((prepared / "meta.json").read_text()))
    model = family_model(family, params, meta).to(runtime.device)
    inputs, _ = split.batch(torch.arange(8, device=runtime.device))
    with runtime.autocast():
        logits = model(*inputs)
    assert logits.device.type == "cuda"
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_one_bf16_epoch_on_cuda_is_tracked_with_gpu_metrics(
    tiny_project: TinyProject, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    uri = tiny_project.tracking_uri
    params = tiny_project.with_train(family, device="cuda", precision="bf16", epochs=1)
    hook_after_epoch(monkeypatch, lambda row: wait_for_gpu_metrics(uri))

    summary = run_module.train(family, params)

    assert summary["device"] == torch.cuda.get_device_name()
    assert summary["precision"] == "bf16"
    assert summary["epochs"] == 1
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        assert math.isfinite(summary["final"][key]), (key, summary["final"])

    info = json.loads((tiny_project.root / "data/models" / family / "mlflow_run.json").read_text())
    client = MlflowClient(uri)
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["precision"] == "bf16"
    assert run.data.tags["device"] == torch.cuda.get_device_name()
    [loss] = client.get_metric_history(run.info.run_id, "train_loss")
    assert loss.step == 1 and math.isfinite(loss.value)
    gpu = sorted(k for k in run.data.metrics if k.startswith(GPU_PREFIX))
    assert gpu, sorted(run.data.metrics)
    assert any("memory" in k for k in gpu) and any("utilization" in k for k in gpu), gpu
