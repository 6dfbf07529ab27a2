"""What a finished training leaves: the DVC outputs (data/models/<name>/, reports/models/<name>/)
and, in its MLflow run, the model and its figures."""

from __future__ import annotations

import csv
import shutil
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dlpipe import paths
from dlpipe.errors import redact
from dlpipe.integrity import seal
from dlpipe.io import atomic_path, write_json_atomic
from dlpipe.learning_curves import plot_history
from dlpipe.tracking.requirements import skip_module_scan
from dlpipe.training.trainer import FitResult

if TYPE_CHECKING:
    from pathlib import Path

    from pydantic import BaseModel

    from dlpipe.training.run import Model, Training

PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def write_outputs(
    training: Training, network: torch.nn.Module, result: FitResult, wall_time_s: float
) -> dict[str, Any]:
    """data/models/<name>/ (weights, config, what raw inputs need) and reports/models/<name>/;
    returns the summary (train.json)."""
    model, run = training.model, training.run
    write_model_folder(
        paths.MODELS_DIR / model.name,
        model,
        training.model_config,
        network,
        training.data.info,
        training.data.folder,
        {"run_id": run.run_id, "experiment_id": run.experiment_id, "tracking_uri": redact(run.uri)},
    )
    reports_dir = paths.MODEL_REPORTS_DIR / model.name
    reports_dir.mkdir(parents=True, exist_ok=True)
    summary = train_summary(training, network, result, wall_time_s)
    write_json_atomic(reports_dir / "train.json", summary)
    with atomic_path(reports_dir / "history.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(result.history[0]))
        writer.writeheader()
        writer.writerows(result.history)
    plot_history({model.name: result.history}, reports_dir / "learning_curves.png")
    return summary


def write_model_folder(
    folder: Path,
    model: Model,
    model_config: BaseModel,
    network: torch.nn.Module,
    data_info: dict[str, Any],
    prepared: Path,
    mlflow_run: dict[str, Any],
) -> None:
    """data/models/<name>/: the weights, config.json (what rebuilds the network, with the
    prepared meta.json `data_info`), the input kind's files bundled from the `prepared` folder
    (what reading raw inputs needs), mlflow_run.json; sealed with SHA256SUMS."""
    folder.mkdir(parents=True, exist_ok=True)
    # Saved through a handle: given a path, torch.save names the archive's folder inside the
    # file after it, and the temp file's random name would make every save's bytes differ.
    with atomic_path(folder / "model.pt") as tmp, open(tmp, "wb") as handle:
        torch.save(stored_weights(network, model.config.weights_dtype), handle)
    for name in model.family.inputs.bundled:
        with atomic_path(folder / name) as tmp:
            shutil.copyfile(prepared / name, tmp)
    write_json_atomic(
        folder / "config.json",
        {
            "model": model.name,
            "family": model.family.name,
            "dataset": model.dataset,
            "model_config": model_config.model_dump(),
            "data": data_info,
        },
    )
    write_json_atomic(folder / "mlflow_run.json", mlflow_run)
    # Last of the model files: the checksums load_trained (evaluate, predict, the pyfunc) checks,
    # so a model file changed from now on is an error instead of wrong answers.
    seal(folder)


def stored_weights(network: torch.nn.Module, dtype: str) -> dict[str, torch.Tensor]:
    """The network's state on the CPU, its floating tensors as `dtype` (train.<name>.weights_dtype):
    `load_state_dict` casts them back into the float32 network."""
    cast = getattr(torch, dtype)
    return {
        k: v.detach().cpu().to(cast) if v.is_floating_point() else v.cpu()
        for k, v in network.state_dict().items()
    }


def train_summary(
    training: Training, network: torch.nn.Module, result: FitResult, wall_time_s: float
) -> dict[str, Any]:
    last = result.history[-1]
    best = result.history[result.best_epoch - 1]
    return {
        "model": training.model.name,
        "dataset": training.model.dataset,
        "device": training.runtime.device_name,
        "precision": training.precision.label,
        "compute_dtypes": training.precision.dtypes,
        "world_size": training.world.size,
        "parameters": sum(p.numel() for p in network.parameters()),
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_time_s": round(result.train_time_s, 2),
        "wall_time_s": round(wall_time_s, 2),
        "samples_per_s": round(float(np.mean([r["samples_per_s"] for r in result.history])), 1),
        "final": {k: round(v, 6) for k, v in last.items() if k.startswith(("train_", "val_"))},
        "best": {k: round(v, 6) for k, v in best.items() if k.startswith(("train_", "val_"))},
    }


def portable_model(training: Training, trained: torch.nn.Module) -> torch.nn.Module:
    """The trained weights in a fresh CPU build of the family's network: what serving gets, since
    training may have swapped in modules that run on GPUs only (SyncBatchNorm). The weights pass
    through weights_dtype, so that it answers as model.pt, the model evaluated, does."""
    network = training.model.family.build(training.model_config, training.data.meta)
    network.load_state_dict(stored_weights(trained, training.model.config.weights_dtype))
    return network.eval()


def log_pytorch_model(training: Training, network: torch.nn.Module) -> None:
    """Log the model (pickle format: `pt2` would freeze the example's sequence length), taking
    the first batch tensor of two real validation rows as its input example."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    data = training.data
    kind = training.model.family.inputs
    module = kind.pytorch_model(network.cpu().float().eval(), data.meta.pad_id).eval()
    inputs, _ = data.val.batch(torch.arange(2, device=data.val.labels.device))
    example = inputs[0].contiguous().cpu().numpy()
    with torch.no_grad():
        output = module(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    schema = kind.tensor_schema()
    if schema is not None:
        signature.inputs = schema
    skip_module_scan()
    mlflow.pytorch.log_model(
        module,
        name="model",
        serialization_format="pickle",
        signature=signature,
        input_example=example,
        pip_requirements=PIP_REQUIREMENTS,
    )


def log_results(
    training: Training, trained: torch.nn.Module, result: FitResult, summary: dict[str, Any]
) -> None:
    """The run's last entries: best epoch, size, learning curves and the portable model."""
    run, name = training.run, training.model.name
    start = time.perf_counter()
    run.log_metrics({"best_epoch": result.best_epoch, "parameters": summary["parameters"]})
    run.log_artifact(paths.MODEL_REPORTS_DIR / name / "learning_curves.png")
    run.call("log model", log_pytorch_model, training, portable_model(training, trained))
    print(f"train@{name}: MLflow logging took {time.perf_counter() - start:.2f}s")
