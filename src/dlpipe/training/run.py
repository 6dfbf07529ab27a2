"""The train@<family> stage: data -> resumable training -> DVC outputs + one MLflow run.

`train` reads top to bottom as its steps: load the data, find a checkpoint to resume, start (or
continue) the MLflow run, build the model, fit, write the outputs, log the artifacts. Once the
run has started, any failure ends it as FAILED (KILLED on Ctrl-C or SIGTERM), never FINISHED.
"""

from __future__ import annotations

import csv
import os
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import mlflow
import numpy as np
import torch

from dlpipe import lineage, paths
from dlpipe.config import Params, train_config
from dlpipe.data.tensors import Split
from dlpipe.family import DataMeta, Family, get_family
from dlpipe.io import atomic_path, read_json, write_json_atomic
from dlpipe.plots import plot_history
from dlpipe.tracking import TrainingRun, flatten, git_state, tracking_uri
from dlpipe.training.checkpoint import CheckpointStore, file_digest, training_key
from dlpipe.training.runtime import Runtime, make_runtime, seed_everything
from dlpipe.training.trainer import FitResult, Trainer

PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]


@dataclass(frozen=True)
class TrainingData:
    """A family's prepared train/val splits on the training device, and what describes them."""

    train: Split
    val: Split
    info: dict[str, Any]  # the prepared meta.json
    digest: str  # sha256 of the train and val files: the data's identity in checkpoints

    @property
    def meta(self) -> DataMeta:
        return DataMeta.from_json(self.info)


def load_data(family: Family, runtime: Runtime) -> TrainingData:
    prepared = paths.PREPARED_DIR / family.dataset
    train = family.inputs.load_split(prepared, "train", runtime.device)
    val = family.inputs.load_split(prepared, "val", runtime.device)
    digest = file_digest([prepared / "train.npz", prepared / "val.npz"])
    return TrainingData(train, val, read_json(prepared / "meta.json"), digest)


def checkpoints(family: Family, params: Params, data: TrainingData) -> CheckpointStore:
    """The checkpoint folder of this exact training (params, seed and data) in this DVC
    experiment, if any: queued trials that train alike each have their own, so none resumes
    or clears another's, and a rerun of the same experiment (same name) resumes its own."""
    settings = {"seed": params.seed, **train_config(params, family.name).model_dump()}
    key = training_key(family.name, settings, data.digest)
    experiment = lineage.experiment_name()
    name = f"{family.name}-{key}" + (f"-{lineage.folder_safe(experiment)}" if experiment else "")
    return CheckpointStore(paths.project_root() / ".dlpipe" / "checkpoints" / name)


def run_params(family: Family, params: Params) -> dict[str, Any]:
    """Flattened params with the same names for every family (train.lr, train.epochs, ...)."""
    config = train_config(params, family.name).model_dump()
    model_config = family.model_config(params).model_dump()
    config.pop("model")
    prepare = getattr(params.prepare, family.dataset, None)
    data = prepare.model_dump() if prepare is not None else {}
    return {
        "seed": params.seed,
        "model.family": family.name,
        **flatten("train", config),
        **flatten("model", model_config),
        **flatten("data", {"name": family.dataset, **data}),
    }


def run_tags(family: Family, runtime: Runtime) -> dict[str, str]:
    tags = {
        "model_family": family.name,
        "dataset": family.dataset,
        "dvc_stage": f"train@{family.name}",
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


def start_run(
    family: Family, params: Params, runtime: Runtime, data: TrainingData, resume: Any
) -> TrainingRun:
    """A new MLflow run, or the interrupted training's run when its checkpoint names one."""
    # "" when the interrupted training ran without tracking: then this one starts a new run.
    resume_run_id = (resume["extra"].get("mlflow_run_id") if resume else None) or None
    run = TrainingRun(tracking_uri(), params.mlflow.require_tracking)
    exp_name = lineage.experiment_name()
    tags = {**run_tags(family, runtime), **lineage.data_tags(family.dataset)}
    if params.mlflow.sweep_parent:  # MLflow shows the run nested under its sweep's run
        tags["mlflow.parentRunId"] = params.mlflow.sweep_parent
    run_name = f"{family.name}-{git_state()['git_sha'][:7]}" + (f"-{exp_name}" if exp_name else "")
    run.start(
        params.mlflow.experiment,
        run_name,
        resume_run_id,
        tags,
        run_params(family, params),
        params.mlflow.system_metrics_interval_s,
    )
    if not run.resumed:
        source = paths.PREPARED_DIR / family.dataset / "train.npz"
        run.log_dataset(f"{family.dataset}-train", source, data.digest[:12], "training")
    return run


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """`kill` (SIGTERM) stops the training like Ctrl-C: checkpoint kept, run marked KILLED."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_outputs(
    family: Family,
    model: torch.nn.Module,
    params: Params,
    data: TrainingData,
    result: FitResult,
    run: TrainingRun,
    runtime: Runtime,
    wall_time_s: float,
) -> dict[str, Any]:
    """data/models/<name>/ (weights, config, what raw inputs need) and reports/models/<name>/."""
    models_dir = paths.MODELS_DIR / family.name
    reports_dir = paths.MODEL_REPORTS_DIR / family.name
    models_dir.mkdir(parents=True, exist_ok=True)
    reports_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(models_dir / "model.pt") as tmp:
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, tmp)
    for name in family.inputs.bundled:
        with atomic_path(models_dir / name) as tmp:
            shutil.copyfile(paths.PREPARED_DIR / family.dataset / name, tmp)
    write_json_atomic(
        models_dir / "config.json",
        {
            "model": family.name,
            "dataset": family.dataset,
            "model_config": family.model_config(params).model_dump(),
            "data": data.info,
        },
    )
    write_json_atomic(
        models_dir / "mlflow_run.json",
        {"run_id": run.run_id, "experiment_id": run.experiment_id, "tracking_uri": run.uri},
    )
    last = result.history[-1]
    best = result.history[result.best_epoch - 1]
    summary = {
        "model": family.name,
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
    plot_history({family.name: result.history}, reports_dir / "learning_curves.png")
    return summary


def log_pytorch_model(family: Family, model: torch.nn.Module, data: TrainingData) -> None:
    """Log the model (pickle format: `pt2` would freeze the example's sequence length), taking
    the first batch tensor of two real validation rows as its input example."""
    import mlflow.pytorch
    from mlflow.models import infer_signature

    module = family.inputs.pytorch_model(model.cpu().float().eval(), data.meta.pad_id).eval()
    inputs, _ = data.val.batch(torch.arange(2, device=data.val.labels.device))
    example = inputs[0].contiguous().cpu().numpy()
    with torch.no_grad():
        output = module(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    schema = family.inputs.tensor_schema()
    if schema is not None:
        signature.inputs = schema
    mlflow.pytorch.log_model(
        module,
        name="model",
        serialization_format="pickle",
        signature=signature,
        input_example=example,
        pip_requirements=PIP_REQUIREMENTS,
    )


def log_results(
    family: Family,
    run: TrainingRun,
    model: torch.nn.Module,
    data: TrainingData,
    result: FitResult,
    summary: dict[str, Any],
) -> None:
    start = time.perf_counter()
    run.log_metrics({"best_epoch": result.best_epoch, "parameters": summary["parameters"]})
    run.log_artifact(paths.MODEL_REPORTS_DIR / family.name / "learning_curves.png")
    run.call("log model", log_pytorch_model, family, model, data)
    print(f"train@{family.name}: MLflow logging took {time.perf_counter() - start:.2f}s")


def train(name: str, params: Params) -> dict[str, Any]:
    """Train one model family end to end; resumes from a checkpoint of the same config."""
    family = get_family(name)
    config = train_config(params, name)
    model_config = family.model_config(params)  # a bad section fails before any work
    runtime = make_runtime(config.device, config.precision)
    data = load_data(family, runtime)
    store = checkpoints(family, params, data)
    resume = store.load()
    run = start_run(family, params, runtime, data, resume)
    run.call("tag the checkpoint folder", mlflow.set_tag, "checkpoint_dir", store.folder.name)
    try:
        seed_everything(params.seed, config.deterministic)
        model = family.inputs.place(family.build(model_config, data.meta), runtime.device)

        def log_epoch(row: dict[str, float]) -> None:
            metrics = {k: v for k, v in row.items() if k != "epoch"}
            run.log_metrics(metrics, step=int(row["epoch"]))

        if resume:  # checkpointed epochs the run lacks: a new run, or one stopped while logging
            print(f"train@{name}: resuming from epoch {resume['epoch']} ({store.path})")
            logged = run.logged_steps("val_accuracy") if run.resumed else set()
            for row in resume["history"]:
                if int(row["epoch"]) not in logged:
                    log_epoch(row)
        trainer = Trainer(model, config, runtime, params.seed, store, log_epoch, label=name)
        start = time.perf_counter()
        with sigterm_as_interrupt():
            result = trainer.fit(
                data.train, data.val, resume, extra={"mlflow_run_id": run.run_id or ""}
            )
        wall = time.perf_counter() - start
        summary = write_outputs(family, model, params, data, result, run, runtime, wall)
        log_results(family, run, model, data, result, summary)
    except KeyboardInterrupt:
        print(f"train@{name}: interrupted; last finished epoch is checkpointed in {store.folder}")
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
    store.clear()
    return summary
