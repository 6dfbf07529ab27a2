"""The train@<model> stage: data -> resumable training -> DVC outputs + one MLflow run.

`train` reads top to bottom as its steps: load the data, find a checkpoint to resume, build the
model and measure the precision it computes in, start (or continue) the MLflow run, fit, write the
outputs, log the artifacts. Once the run has started, any failure ends it as FAILED (KILLED on
Ctrl-C or SIGTERM), never FINISHED.

A model is a family trained on a dataset (`train.<model>` names both); the family's network is
built for what the dataset's meta.json says (classes, channels and size, or vocabulary).

With `train.<model>.nproc` > 1, `launch` re-runs the stage under torchrun. Every process then
loads the data and trains its slice of each batch; rank 0 alone reads the checkpoint (and hands
it to the others), writes the outputs and checkpoints, and keeps the one MLflow run.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from dlpipe import lineage, paths
from dlpipe.config import Params, TrainConfig, flatten, train_config
from dlpipe.data.tensors import Split
from dlpipe.errors import DlpipeError
from dlpipe.family import DataMeta, Family, model_family
from dlpipe.integrity import listed_digest
from dlpipe.io import read_json
from dlpipe.lineage import git_state
from dlpipe.tracking.run import StageRun
from dlpipe.tracking.store import tracking_uri
from dlpipe.training.checkpoint import CheckpointStore, code_digest, training_key
from dlpipe.training.distributed import (
    World,
    check_batch_size,
    process_group,
    relaunch_under_torchrun,
    under_launcher,
)
from dlpipe.training.outputs import log_results, write_outputs
from dlpipe.training.pruning import PRUNED_AT, TrialReport, in_search, trial_from_env
from dlpipe.training.runtime import (
    Runtime,
    compute_dtypes,
    determinism_label,
    make_runtime,
    precision_label,
    seed_everything,
    select_device,
    watch_nondeterminism,
)
from dlpipe.training.signals import signals_deferred, signals_ignored, sigterm_as_interrupt
from dlpipe.training.trainer import Trainer


@dataclass(frozen=True)
class TrainingData:
    """A family's prepared train/val splits on the training device, and what describes them."""

    train: Split
    val: Split
    info: dict[str, Any]  # the prepared meta.json
    digest: str  # of the train and val files' sha256s: the data's identity in checkpoints
    folder: Path  # the prepared data's folder

    @property
    def meta(self) -> DataMeta:
        return DataMeta.from_json(self.info)


@dataclass(frozen=True)
class Model:
    """What one train stage trains: `train.<name>`, a family on a dataset."""

    name: str
    family: Family
    dataset: str
    config: TrainConfig

    @classmethod
    def from_params(cls, params: Params, name: str) -> Model:
        config = train_config(params, name)
        return cls(name, model_family(params, name), config.dataset, config)


def load_data(model: Model, runtime: Runtime) -> TrainingData:
    prepared = paths.PREPARED_DIR / model.dataset
    info = read_json(prepared / "meta.json")
    kind = model.family.inputs
    if info.get("inputs") != kind.name:
        raise DlpipeError(
            f"train.{model.name}: the {model.family.name} family reads {kind.name}, but "
            f"dataset {model.dataset} holds {info.get('inputs')}; pick a family for it"
        )
    train = kind.load_split(prepared, "train", runtime.device)
    val = kind.load_split(prepared, "val", runtime.device)
    starts = [name for name in kind.start_files if (prepared / name).exists()]
    rerun = f"dvc repro prepare@{model.dataset}"
    digest = listed_digest(prepared, ["train.npz", "val.npz", *starts], rerun)
    return TrainingData(train, val, info, digest, prepared)


@dataclass(frozen=True)
class MeasuredPrecision:
    """What the model really computes in: the runtime's precision and any kernel that differs."""

    label: str  # e.g. "bf16", or "bf16 (fp32: _cudnn_rnn)"
    dtypes: dict[str, str]  # kernel -> dtype it was given

    @property
    def tag(self) -> str:
        return ",".join(f"{name}={dtype}" for name, dtype in self.dtypes.items())


def measure_precision(
    model: torch.nn.Module, data: TrainingData, runtime: Runtime
) -> MeasuredPrecision:
    """One forward pass on two training rows, watching which dtypes the kernels receive."""
    inputs, _ = data.train.batch(torch.arange(2, device=data.train.labels.device))
    dtypes = compute_dtypes(model, inputs, runtime)
    return MeasuredPrecision(precision_label(runtime.precision, dtypes), dtypes)


def checkpoints(model: Model, params: Params, data: TrainingData) -> CheckpointStore:
    """The checkpoint folder of this exact training (params, seed, data and code) in this DVC
    experiment, if any: queued trials that train alike each have their own, so none resumes or
    clears another's, and a rerun of the same experiment (same name) resumes its own. The number
    of processes is not part of it: they train the same recipe, and a rerun with another number
    resumes."""
    settings = {"seed": params.seed, **train_config(params, model.name).model_dump()}
    settings.pop("nproc")
    key = training_key(model.name, settings, data.digest, code_digest(model.family))
    experiment = lineage.experiment_name()
    name = f"{model.name}-{key}" + (f"-{lineage.folder_safe(experiment)}" if experiment else "")
    return CheckpointStore(paths.project_root() / ".dlpipe" / "checkpoints" / name)


def run_params(model: Model, params: Params, world: World) -> dict[str, Any]:
    """Flattened params with the same names for every family (train.lr, train.epochs, ...)."""
    config = train_config(params, model.name).model_dump()
    model_config = model.family.model_config(params, model.name).model_dump()
    config.pop("model")
    data = params.datasets[model.dataset].model_dump()
    return {
        "seed": params.seed,
        "model.name": model.name,
        "model.family": model.family.name,
        "world_size": world.size,
        **flatten("train", config),
        **flatten("model", model_config),
        **flatten("data", {"name": model.dataset, **data}),
    }


def run_tags(
    model: Model, runtime: Runtime, precision: MeasuredPrecision, deterministic: bool
) -> dict[str, str]:
    tags = {
        "model": model.name,
        "model_family": model.family.name,
        "dataset": model.dataset,
        "dvc_stage": f"train@{model.name}",
        "device": runtime.device_name,
        "precision": precision.label,
        "compute_dtypes": precision.tag,
        # as asked; fit_and_record makes it best-effort (...) if a kernel had no such variant
        "deterministic": determinism_label(deterministic, []),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        **git_state(),
    }
    for var in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        if os.environ.get(var):
            tags[var.lower()] = os.environ[var]
    return tags


def start_run(
    model: Model,
    params: Params,
    runtime: Runtime,
    data: TrainingData,
    resume: Any,
    precision: MeasuredPrecision,
    world: World,
) -> StageRun:
    """A new MLflow run, or the interrupted training's run when its checkpoint names one."""
    # "" when the interrupted training ran without tracking: then this one starts a new run.
    resume_run_id = (resume["extra"].get("mlflow_run_id") if resume else None) or None
    run = StageRun(
        tracking_uri(), params.mlflow.require_tracking, orphan_after_s=params.mlflow.orphan_after_s
    )
    exp_name = lineage.experiment_name()
    deterministic = train_config(params, model.name).deterministic
    tags = {
        **run_tags(model, runtime, precision, deterministic),
        **lineage.data_tags(model.dataset),
    }
    if params.mlflow.sweep_parent:  # MLflow shows the run nested under its sweep's run
        tags["mlflow.parentRunId"] = params.mlflow.sweep_parent
    run_name = f"{model.name}-{git_state()['git_sha'][:7]}" + (f"-{exp_name}" if exp_name else "")
    run.start(
        params.mlflow.experiment,
        run_name,
        resume_run_id,
        tags,
        run_params(model, params, world),
        params.mlflow.system_metrics_interval_s,
    )
    if not run.resumed:
        source = data.folder / "train.npz"
        run.log_dataset(f"{model.dataset}-train", source, data.digest[:12], "training")
    return run


def end_run(run: StageRun, status: str) -> None:
    """Record how the run ended, uninterruptibly: when one process of a data-parallel training
    fails, torchrun sends the others SIGTERM, and one landing while rank 0 records FAILED would
    leave the run RUNNING."""
    with signals_ignored():
        run.end(status)


@dataclass(frozen=True)
class Training:
    """What rank 0's steps share once its MLflow run has started: the model, its settings, the
    data, where it trains, and the run it logs to."""

    model: Model
    model_config: Any  # the family's validated `model` section
    params: Params
    runtime: Runtime
    world: World
    data: TrainingData
    precision: MeasuredPrecision
    store: CheckpointStore
    run: StageRun
    trial: TrialReport | None  # when a search's worker runs this training as one of its trials


def launch(name: str, params: Params, argv: list[str]) -> None:
    """Re-run the stage (`argv`) as `train.<name>.nproc` torchrun processes when that is above
    1 and no launcher started this one. What would stop every process stops here first, in one
    line: a bad model section, a batch that does not divide, too few GPUs."""
    config = train_config(params, name)
    if config.nproc <= 1 or under_launcher():
        return
    model_family(params, name).model_config(params, name)
    check_batch_size(config.batch_size, config.nproc, name)
    device = select_device(config.device)
    if device.type == "mps":
        raise DlpipeError(f"train.{name}.nproc {config.nproc}: data-parallel needs CUDA or the CPU")
    gpus = torch.cuda.device_count() if device.type == "cuda" else config.nproc
    if gpus < config.nproc:
        raise DlpipeError(
            f"train.{name}.nproc {config.nproc}: {gpus} GPU(s) visible, one per process needed"
        )
    relaunch_under_torchrun(config.nproc, argv)


def build_model(
    model: Model,
    model_config: Any,
    config: TrainConfig,
    seed: int,
    data: TrainingData,
    runtime: Runtime,
) -> torch.nn.Module:
    """The family's network, seeded, on the training device (the same on every process)."""
    seed_everything(seed, config.deterministic)
    network = model.family.build(model_config, data.meta)
    model.family.inputs.initialize(network, data.folder)
    return model.family.inputs.place(network, runtime.device)


def train(name: str, params: Params) -> dict[str, Any] | None:
    """Train one model end to end; resumes from a checkpoint of the same config. Under
    torchrun every process calls it: rank 0 returns train.json's summary and `tracking` (what
    MLflow could not take, '' if nothing), the others None."""
    model = Model.from_params(params, name)
    config = model.config
    model_config = model.family.model_config(params, name)  # a bad section fails before any work
    world = World.from_env()
    check_batch_size(config.batch_size, world.size, name)
    runtime = make_runtime(
        config.device,
        config.precision,
        world.local_rank,
        config.deterministic,
        model.family.cpu_bf16,
    )
    with process_group(world, runtime.device):
        data = load_data(model, runtime)
        store = checkpoints(model, params, data)
        resume = world.broadcast(store.load() if world.is_main else None)
        network = build_model(model, model_config, config, params.seed, data, runtime)
        if not world.is_main:  # in a search, rank 0's pruner decides for every process
            follow = (lambda epoch, value: False) if in_search() else None
            trainer = Trainer(
                network, config, runtime, params.seed, label=name, world=world, stop=follow
            )
            trainer.fit(data.train, data.val, resume)
            return None
        precision = measure_precision(network, data, runtime)
        trial = trial_from_env()
        with sigterm_as_interrupt():
            run = start_run(model, params, runtime, data, resume, precision, world)
            run.call(
                "tag the checkpoint folder", mlflow.set_tag, "checkpoint_dir", store.folder.name
            )
            if trial is not None:
                run.call("tag the search trial", mlflow.set_tags, trial.tags)
            training = Training(
                model, model_config, params, runtime, world, data, precision, store, run, trial
            )
            try:
                summary = fit_and_record(training, network, resume)
            except BaseException as err:
                interrupted = isinstance(err, KeyboardInterrupt)
                if interrupted:
                    print(
                        f"train@{name}: interrupted; last finished epoch is checkpointed in "
                        f"{store.folder}"
                    )
                end_run(run, "KILLED" if interrupted else "FAILED")
                raise
            end_run(run, "FINISHED")
    store.clear()
    return {**summary, "tracking": run.outcome()}  # not in train.json: MLflow is not an output


def fit_and_record(
    training: Training, network: torch.nn.Module, resume: dict[str, Any] | None
) -> dict[str, Any]:
    """Rank 0's training inside its MLflow run: every epoch logged, then the outputs written
    and the model logged; the summary (train.json)."""
    name, config, run, store = (
        training.model.name,
        training.model.config,
        training.run,
        training.store,
    )

    def log_epoch(row: dict[str, float]) -> None:
        metrics = {k: v for k, v in row.items() if k != "epoch"}
        run.log_metrics(metrics, step=int(row["epoch"]))

    if resume:  # checkpointed epochs the run lacks: a new run, or one stopped while logging
        print(f"train@{name}: resuming from epoch {resume['epoch']} ({store.path})")
        logged = run.logged_steps("val_accuracy") if run.resumed else set()
        for row in resume["history"]:
            if int(row["epoch"]) not in logged:
                log_epoch(row)
    seed = training.params.seed
    trainer = Trainer(
        network,
        config,
        training.runtime,
        seed,
        store,
        log_epoch,
        label=name,
        world=training.world,
        stop=training.trial,
    )
    start = time.perf_counter()
    extra = {"mlflow_run_id": run.run_id or ""}
    with watch_nondeterminism() as kernels:
        result = trainer.fit(training.data.train, training.data.val, resume, extra=extra)
    wall = time.perf_counter() - start
    if kernels:  # deterministic asked for, but these kernels have no deterministic variant
        label = determinism_label(config.deterministic, kernels)
        print(f"train@{name}: deterministic: {label}")
        run.call("tag determinism", mlflow.set_tag, "deterministic", label)
    if training.trial is not None and training.trial.pruned_at:
        run.call("tag the pruned trial", mlflow.set_tag, PRUNED_AT, training.trial.pruned_at)
    with signals_deferred():
        summary = write_outputs(training, trainer.model, result, wall)
    log_results(training, trainer.model, result, summary)
    return summary
