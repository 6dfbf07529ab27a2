"""The schema of params.yaml, validated on load.

Every knob of the pipeline lives in params.yaml; this module says which keys exist, their types
and their ranges. `load_params` turns any violation into one `DlpipeError` line naming the key path
and what is allowed, so a typo in `dvc exp run -S` fails fast and readably.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dlpipe.errors import DlpipeError

ModelName = Literal["cnn", "rnn", "transformer"]
MODEL_NAMES: tuple[ModelName, ...] = ("cnn", "rnn", "transformer")
DATASET_OF_MODEL: dict[str, str] = {"cnn": "mnist", "rnn": "imdb", "transformer": "imdb"}

PositiveInt = Annotated[int, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]


class Strict(BaseModel):
    """Base for every section: unknown keys are errors; values are checked against their ranges."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FetchConfig(Strict):
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3


SubsetSize = Annotated[int, Field(ge=0)]


class PrepareMnistConfig(Strict):
    val_size: Annotated[int, Field(ge=10, le=30000)] = 5000
    max_train: SubsetSize = 0  # 0 = all 60,000 (val is split from these); >0: a stratified sample
    max_test: SubsetSize = 0  # 0 = all 10,000


class PrepareImdbConfig(Strict):
    val_size: Annotated[int, Field(ge=10, le=12500)] = 5000
    max_train: SubsetSize = 0  # 0 = all 25,000 (val is split from these); >0: a stratified sample
    max_test: SubsetSize = 0  # 0 = all 25,000
    tokenizer: Literal["bpe", "wordpiece"] = "bpe"
    vocab_size: Annotated[int, Field(ge=100, le=65536)] = 16000
    min_frequency: Annotated[int, Field(ge=1)] = 2
    lowercase: bool = True
    train_on_unsup: bool = False
    max_len: Annotated[int, Field(ge=8, le=4096)] = 512
    truncation: Literal["head", "tail", "head+tail"] = "head+tail"


class PrepareConfig(Strict):
    mnist: PrepareMnistConfig = PrepareMnistConfig()
    imdb: PrepareImdbConfig = PrepareImdbConfig()


class CNNConfig(Strict):
    width: Annotated[int, Field(ge=1, le=8)] = 1
    batch_norm: bool = False
    dropout: Probability = 0.0


class RNNConfig(Strict):
    cell: Literal["lstm", "gru"] = "gru"
    embed_dim: PositiveInt = 128
    hidden_size: PositiveInt = 128
    num_layers: Annotated[int, Field(ge=1, le=8)] = 1
    bidirectional: bool = True
    dropout: Probability = 0.2
    pooling: Literal["last", "mean", "max"] = "max"


class TransformerConfig(Strict):
    d_model: PositiveInt = 128
    heads: PositiveInt = 4
    layers: Annotated[int, Field(ge=1, le=24)] = 2
    ff_dim: PositiveInt = 256
    dropout: Probability = 0.1
    positional: Literal["sinusoidal", "learned"] = "sinusoidal"
    pooling: Literal["mean", "cls"] = "mean"
    max_len: Annotated[int, Field(ge=8, le=8192)] = 512


class TrainConfig(Strict):
    """What every model's training shares; MLflow logs these as `train.<key>` for all three."""

    epochs: Annotated[int, Field(ge=1, le=1000)] = 5
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 128
    eval_batch_size: Annotated[int, Field(ge=1, le=65536)] = 1024
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    weight_decay: NonNegFloat = 0.0
    schedule: Literal["constant", "cosine", "onecycle"] = "constant"
    warmup_epochs: Annotated[float, Field(ge=0.0)] = 0.0
    grad_clip: NonNegFloat = 0.0
    label_smoothing: Probability = 0.0
    early_stopping_patience: Annotated[int, Field(ge=0)] = 0
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    deterministic: bool = False
    max_steps_per_epoch: Annotated[int, Field(ge=0)] = 0


class TrainCNN(TrainConfig):
    model: CNNConfig = CNNConfig()


class TrainRNN(TrainConfig):
    model: RNNConfig = RNNConfig()


class TrainTransformer(TrainConfig):
    model: TransformerConfig = TransformerConfig()


class TrainSection(Strict):
    cnn: TrainCNN = TrainCNN()
    rnn: TrainRNN = TrainRNN()
    transformer: TrainTransformer = TrainTransformer()


class EvaluateConfig(Strict):
    calibration_bins: Annotated[int, Field(ge=2, le=100)] = 15
    latency_batch_sizes: tuple[PositiveInt, ...] = (1, 256)
    latency_repeats: Annotated[int, Field(ge=1, le=1000)] = 20
    mistakes_shown: Annotated[int, Field(ge=1, le=100)] = 10


class RegistryConfig(Strict):
    """Model registry: each evaluated model becomes a new version with alias `candidate`;
    `champion` moves to it only when `metric` beats the champion's by more than `min_delta`."""

    enabled: bool = True
    metric: Literal["test_accuracy", "test_macro_f1", "test_log_loss"] = "test_accuracy"
    min_delta: NonNegFloat = 0.0
    name_prefix: Annotated[str, Field(min_length=1)] = "dlpipe-"


class MlflowConfig(Strict):
    experiment: Annotated[str, Field(min_length=1)] = "dlpipe"
    require_tracking: bool = True
    system_metrics_interval_s: Annotated[float, Field(ge=1.0)] = 5.0


GateMetric = Literal["test_accuracy", "test_macro_f1"]  # higher is better: a floor is a minimum
Floors = dict[ModelName, dict[GateMetric, Annotated[float, Field(ge=0.0, le=1.0)]]]


class GatesConfig(Strict):
    """What `dlpipe check` enforces on reports/<model>/eval.json: each metric at or above its
    floor (`smoke_floors` with `--smoke`: the tiny-slice CI run), and with `--baseline REV` no
    more than `max_drop` (absolute, 0.01 = one point of accuracy) below REV's value."""

    floors: Floors = {
        "cnn": {"test_accuracy": 0.985},
        "rnn": {"test_accuracy": 0.85},
        "transformer": {"test_accuracy": 0.85},
    }
    smoke_floors: Floors = {
        "cnn": {"test_accuracy": 0.9},
        "rnn": {"test_accuracy": 0.68},
        "transformer": {"test_accuracy": 0.7},
    }
    max_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01


class Params(Strict):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    fetch: FetchConfig = FetchConfig()
    prepare: PrepareConfig = PrepareConfig()
    train: TrainSection = TrainSection()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    mlflow: MlflowConfig = MlflowConfig()
    gates: GatesConfig = GatesConfig()


MODEL_CONFIGS: dict[str, type[BaseModel]] = {
    "cnn": CNNConfig,
    "rnn": RNNConfig,
    "transformer": TransformerConfig,
}


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key (check the spelling against params.yaml)"
    if kind == "missing":
        return f"{path}: required key is missing"
    return f"{path}: {error['msg']} (got {error.get('input')!r})"


def parse_params(raw: object, source: str = "params.yaml") -> Params:
    """Validate an already-loaded mapping; raise one `DlpipeError` line per first problem."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise DlpipeError(f"{source}: top level must be a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        errors = err.errors()
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DlpipeError(f"{source}: {_describe(dict(errors[0]))}{more}") from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DlpipeError(f"{path}: not found (run from the project root)") from None
    except UnicodeDecodeError as err:
        raise DlpipeError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise DlpipeError(f"{path}: cannot read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise DlpipeError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_params(raw, str(path))


def train_config(params: Params, model: str) -> TrainCNN | TrainRNN | TrainTransformer:
    """The training section of one model family."""
    if model not in MODEL_NAMES:
        raise DlpipeError(f"unknown model {model!r}; choose one of {', '.join(MODEL_NAMES)}")
    config: TrainCNN | TrainRNN | TrainTransformer = getattr(params.train, model)
    return config
