"""The train@<model> stage: data -> resumable training -> DVC outputs + one MLflow run."""

from __future__ import annotations

import csv
import os
import signal
import time
from types import FrameType
from typing import Any

import numpy as np
import torch

from dlpipe import paths
from dlpipe.config import DATASET_OF_MODEL, Params, train_config
from dlpipe.data.tensors import Split, load_split
from dlpipe.io import atomic_path, read_json, write_json_atomic
from dlpipe.models import build_model, data_meta
from dlpipe.plots import plot_history
from dlpipe.tracking import TrainingRun, flatten, git_state, tracking_uri
from dlpipe.training.checkpoint import CheckpointStore, file_digest, training_key
from dlpipe.training.runtime import Runtime, make_runtime, seed_everything
from dlpipe.training.trainer import FitResult, Trainer

PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _tags(model: str, dataset: str, runtime: Runtime) -> dict[str, str]:
    tags = {
        "model_family": model,
        "dataset": dataset,
        "dvc_stage": f"train@{model}",
        "device": runtime.device_name,
        "precision": runtime.precision,
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        **git_state(),
    }
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        if os.environ.get(var):
            tags[var.lower()] = os.environ[var]
    return tags


def _params(model: str, params: Params) -> dict[str, Any]:
    """Flattened params with the same names for every family (train.lr, train.epochs, ...)."""
    config = train_config(params, model).model_dump()
    model_config = config.pop("model")
    dataset = DATASET_OF_MODEL[model]
    return {
        "seed": params.seed,
        "model.family": model,
        **flatten("train", config),
        **flatten("model", model_config),
        **flatten("data", {"name": dataset, **getattr(params.prepare, dataset).model_dump()}),
    }


def _input_example(model: str, split: Split) -> np.ndarray:
    """Two real validation rows, as the pytorch flavor's pyfunc receives them."""
    inputs, _ = split.batch(torch.arange(2))
    if model == "cnn":
        return inputs[0].contiguous().cpu().numpy()
    return inputs[0].cpu().numpy().astype(np.int64)


class TokensOnly(torch.nn.Module):
    """A text model callable with one int64 [B, T] tensor, as MLflow's pyfunc calls it: without
    `lengths`, each row's length is one past its last non-pad token (rows are padded on the
    right). Called with `(tokens, lengths)` it is the wrapped model."""

    def __init__(self, model: torch.nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            positions = torch.arange(1, tokens.size(1) + 1, device=tokens.device)
            lengths = ((tokens != self.pad_id) * positions).amax(dim=1).clamp(min=1)
        out: torch.Tensor = self.model(tokens, lengths)
        return out


def _log_model(name: str, model: torch.nn.Module, example: np.ndarray, pad_id: int) -> None:
    """Log the model in pickle format: `pt2` would freeze the example's sequence length."""
    import mlflow.pytorch
    from mlflow.models import infer_signature
    from mlflow.types import Schema, TensorSpec

    model = model.cpu().float().eval()
    if name != "cnn":
        model = TokensOnly(model, pad_id).eval()
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    if name != "cnn":  # any batch size and any sequence length
        signature.inputs = Schema([TensorSpec(np.dtype(np.int64), (-1, -1))])
    mlflow.pytorch.log_model(
        model,
        name="model",
        serialization_format="pickle",
        signature=signature,
        input_example=example,
        pip_requirements=PIP_REQUIREMENTS,
    )


def _write_outputs(
    name: str,
    model: torch.nn.Module,
    data_info: dict[str, Any],
    params: Params,
    result: FitResult,
    run: TrainingRun,
    runtime: Runtime,
    wall_time_s: float,
) -> dict[str, Any]:
    models_dir, reports_dir = paths.MODELS_DIR / name, paths.REPORTS_DIR / name
    models_dir.mkdir(parents=True, exist_ok=True)
    reports_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(models_dir / "model.pt") as tmp:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    config = train_config(params, name)
    write_json_atomic(
        models_dir / "config.json",
        {
            "model": name,
            "dataset": DATASET_OF_MODEL[name],
            "model_config": config.model.model_dump(),
            "data": data_info,
        },
    )
    write_json_atomic(
        models_dir / "mlflow_run.json",
        {"run_id": run.run_id, "experiment_id": run.experiment_id, "tracking_uri": run.uri},
    )
    last = result.history[-1]
    best = result.history[result.best_epoch - 1]
    summary = {
        "model": name,
        "device": runtime.device_name,
        "precision": runtime.precision,
        "parameters": sum(p.numel() for p in model.parameters()),
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_time_s": round(result.train_time_s, 2),
        "wall_time_s": round(wall_time_s, 2),
        "samples_per_s": round(float(np.mean([r["samples_per_s"] for r in result.history])), 1),
        "final": {k: round(v, 6) for k, v in last.items() if k.startswith(("train_", "val_"))},
        "best": {k: round(v, 6) for k, v in best.items() if k.startswith(("train_", "val_"))},
    }
    write_json_atomic(reports_dir / "train.json", summary)
    with atomic_path(reports_dir / "history.csv") as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(result.history[0]))
        writer.writeheader()
        writer.writerows(result.history)
    return summary


def train(name: str, params: Params) -> dict[str, Any]:
    """Train one model family end to end; resumes from a checkpoint of the same config."""
    config = train_config(params, name)
    dataset = DATASET_OF_MODEL[name]
    prepared = paths.PREPARED_DIR / dataset
    runtime = make_runtime(config.device, config.precision)
    channels_last = name == "cnn" and runtime.device.type != "mps"
    train_split = load_split(prepared, "train", channels_last).to(runtime.device)
    val_split = load_split(prepared, "val", channels_last).to(runtime.device)
    data_info = read_json(prepared / "meta.json")
    meta = data_meta(data_info)

    data_files = [prepared / "train.npz", prepared / "val.npz"]
    digest = file_digest(data_files)
    key = training_key(name, {"seed": params.seed, **config.model_dump()}, digest)
    store = CheckpointStore(paths.project_root() / ".dlpipe" / "checkpoints" / f"{name}-{key}")
    resume = store.load()
    # "" when the interrupted training ran without tracking: then this one starts a new run.
    resume_run_id = (resume["extra"].get("mlflow_run_id") if resume else None) or None

    run = TrainingRun(tracking_uri(), params.mlflow.require_tracking)
    git = git_state()["git_sha"][:7]
    exp_name = os.environ.get("DVC_EXP_NAME")
    run.start(
        params.mlflow.experiment,
        f"{name}-{git}" + (f"-{exp_name}" if exp_name else ""),
        resume_run_id,
        _tags(name, dataset, runtime),
        _params(name, params),
        params.mlflow.system_metrics_interval_s,
    )
    if not run.resumed:
        run.log_dataset(f"{dataset}-train", prepared / "train.npz", digest[:12], "training")

    seed_everything(params.seed, config.deterministic)
    model = build_model(name, config.model, meta)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if resume:
        print(f"train@{name}: resuming from epoch {resume['epoch']} ({store.path})")

    def log_epoch(row: dict[str, float]) -> None:
        run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    if resume:  # checkpointed epochs the run lacks: a new run, or one stopped while logging
        logged = run.logged_steps("val_accuracy") if run.resumed else set()
        for row in resume["history"]:
            if int(row["epoch"]) not in logged:
                log_epoch(row)

    trainer = Trainer(model, config, runtime, params.seed, store, log_epoch, label=name)
    start = time.perf_counter()
    try:
        previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM,)}
        try:
            result = trainer.fit(
                train_split, val_split, resume, extra={"mlflow_run_id": run.run_id or ""}
            )
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        summary = _write_outputs(
            name, model, data_info, params, result, run, runtime, time.perf_counter() - start
        )
        history_png = paths.REPORTS_DIR / name / "learning_curves.png"
        plot_history({name: result.history}, history_png)
        log_start = time.perf_counter()
        run.log_metrics({"best_epoch": result.best_epoch, "parameters": summary["parameters"]})
        run.log_artifact(history_png)
        example = _input_example(name, val_split)
        run.call("log model", _log_model, name, model, example, meta.pad_id)
        print(f"train@{name}: MLflow logging took {time.perf_counter() - log_start:.2f}s")
    except KeyboardInterrupt:
        print(f"train@{name}: interrupted; last finished epoch is checkpointed in {store.folder}")
        run.end("KILLED")
        raise
    except Exception:
        run.end("FAILED")
        raise
    run.end("FINISHED")
    store.clear()
    return summary
