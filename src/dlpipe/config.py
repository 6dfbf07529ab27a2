"""The schema of params.yaml, validated on load.

Every knob of the pipeline lives in params.yaml; this module says which keys exist, their types,
their ranges and their defaults. The defaults are this schema's: params.yaml states each global
one with the same value (tests/test_config.py keeps the two equal), and each built-in model's
section states its own recipe, where a user's new model gets the family's defaults for any knob
it leaves out. `load_params` turns any violation into one `DlpipeError` line naming the key path
and what is allowed, so a typo in `dvc exp run -S` fails fast and readably.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from dlpipe.errors import DlpipeError

# A model, family or dataset name is also a DVC stage key (train@<model>), a folder name and, for
# a family, its module's name (dlpipe.models.<family>).
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]*$")]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0.0)]
Probability = Annotated[float, Field(ge=0.0, lt=1.0)]


class Strict(BaseModel):
    """Base for every section: unknown keys are errors; values are checked against their ranges
    (and no float is inf or nan: `weight_decay: .inf` would pass a `ge=0` bound)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class FetchConfig(Strict):
    connect_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    read_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    retries: Annotated[int, Field(ge=0, le=10)] = 3


class DatasetEntry(BaseModel):
    """What every `datasets.<name>` entry has; the rest of the entry is its format's to check
    (`dlpipe.datasets.dataset_settings`), so this file never needs to know which formats exist."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format: Name  # src/dlpipe/datasets/<format>.py
    path: Annotated[str, Field(min_length=1)]  # where its raw files are (a DVC dep of prepare)


class TrainConfig(Strict):
    """A model: a family trained on a dataset, and what every family's training shares; MLflow
    logs these as `train.<key>` for all of them.

    `model` is the family's own section: `dlpipe.family.model_config` validates it against the
    schema its module declares, so this file never needs to know which families exist."""

    family: Name  # src/dlpipe/models/<family>.py
    dataset: Name  # a `datasets` entry: data/prepared/<dataset>
    epochs: Annotated[int, Field(ge=1, le=1000)] = 5
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 128
    eval_batch_size: Annotated[int, Field(ge=1, le=65536)] = 1024
    optimizer: Literal["adam", "adamw"] = "adam"
    fused_optimizer: bool = False  # PyTorch's one-kernel Adam(W) step (CPU, CUDA): see schedule.py
    lr: Annotated[float, Field(gt=0.0, le=10.0)] = 1e-3
    weight_decay: NonNegFloat = 0.0
    schedule: Literal["constant", "cosine", "onecycle"] = "constant"
    warmup_epochs: Annotated[float, Field(ge=0.0)] = 0.0
    grad_clip: NonNegFloat = 0.0
    label_smoothing: Probability = 0.0
    # > 0: each step also trains on embeddings moved this share of their norm against the model
    # (text families; training/adversarial.py). Costs a second pass a step.
    adversarial_eps: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    early_stopping_patience: Annotated[int, Field(ge=0)] = 0
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    device: Literal["auto", "cuda", "mps", "cpu"] = "auto"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    deterministic: bool = False
    max_steps_per_epoch: Annotated[int, Field(ge=0)] = 0
    # Processes the train stage starts on this machine (torchrun); batch_size stays the global
    # batch, split evenly among them. Under an outer torchrun (several machines) it is ignored.
    nproc: Annotated[int, Field(ge=1, le=256)] = 1
    # What model.pt stores floating tensors as. float16 halves the file (and the registry's,
    # and what `dvc push` uploads); training and its checkpoints stay float32, and a model is
    # evaluated with the weights it ships: loading upcasts them.
    weights_dtype: Literal["float32", "float16"] = "float32"
    model: dict[str, Any] = {}


class TfidfLogregConfig(Strict):
    """TF-IDF word n-grams + logistic regression, a linear model of every text dataset."""

    ngram_max: Annotated[int, Field(ge=1, le=3)] = 2
    min_df: Annotated[int, Field(ge=1)] = 2
    sublinear_tf: bool = True
    C: Annotated[float, Field(gt=0.0)] = 8.0
    max_iter: Annotated[int, Field(ge=10, le=100000)] = 1000


class NbsvmConfig(Strict):
    """NBSVM (naive-Bayes-scaled binary n-grams + logistic regression), a linear model of every
    text dataset."""

    ngram_max: Annotated[int, Field(ge=1, le=3)] = 3
    features: Annotated[int, Field(ge=2**10, le=2**26)] = 2**23  # hashed n-gram buckets
    alpha: Annotated[float, Field(gt=0.0)] = 1.0  # count smoothing
    C: Annotated[float, Field(gt=0.0)] = 0.3
    max_iter: Annotated[int, Field(ge=10, le=100000)] = 1000


class PixelsLogregConfig(Strict):
    """Logistic regression on the pixels, the linear model of every image dataset."""

    C: Annotated[float, Field(gt=0.0)] = 0.1
    max_iter: Annotated[int, Field(ge=10, le=100000)] = 200


class LinearConfig(Strict):
    """The linear models fit beside the deep ones on each dataset of their input kind."""

    tfidf_logreg: TfidfLogregConfig = TfidfLogregConfig()
    nbsvm: NbsvmConfig = NbsvmConfig()
    pixels_logreg: PixelsLogregConfig = PixelsLogregConfig()


class EvaluateConfig(Strict):
    calibration_bins: Annotated[int, Field(ge=2, le=100)] = 15
    latency_batch_sizes: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (1, 256)
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
    # A RUNNING run owned on another machine and silent this long is taken for a killed one's
    # (dlpipe.tracking.orphans). Not a dep of any stage: it changes no output.
    orphan_after_s: Annotated[float, Field(ge=60.0)] = 900.0
    # The MLflow run a training is nested under: `dlpipe sweep` sets it for each trial. Only a
    # tag, so no stage depends on it (the same training in or out of a sweep is the same).
    sweep_parent: Annotated[str, Field(pattern=r"^[0-9A-Za-z_-]*$", max_length=64)] = ""


GateMetric = Literal["test_accuracy", "test_macro_f1"]  # higher is better: a floor is a minimum
Floors = dict[Name, dict[GateMetric, Annotated[float, Field(ge=0.0, le=1.0)]]]


class GatesConfig(Strict):
    """What `dlpipe check` enforces on reports/<model>/eval.json: each metric at or above its
    floor (`smoke_floors` with `--smoke`: the tiny-slice CI run), and with `--baseline REV` no
    more than `max_drop` (absolute, 0.01 = one point of accuracy) below REV's value."""

    floors: Floors = {}
    smoke_floors: Floors = {}
    max_drop: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01


class Params(Strict):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    fetch: FetchConfig = FetchConfig()
    datasets: dict[Name, DatasetEntry] = {}
    train: dict[Name, TrainConfig] = {}
    linear: LinearConfig = LinearConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    mlflow: MlflowConfig = MlflowConfig()
    gates: GatesConfig = GatesConfig()
    _source: str = PrivateAttr("params.yaml")  # where it was read: named in error messages

    @model_validator(mode="after")
    def _names_resolve(self) -> Params:
        for model, config in self.train.items():
            if config.dataset not in self.datasets:
                known = ", ".join(self.datasets) or "none"
                raise ValueError(
                    f"train.{model}.dataset: no datasets.{config.dataset} entry (datasets: {known})"
                )
        for section in ("floors", "smoke_floors"):
            for name in getattr(self.gates, section):
                if name not in self.train:
                    raise ValueError(f"gates.{section}.{name}: no train.{name} section")
        return self

    @property
    def source(self) -> str:
        return self._source

    @property
    def models(self) -> tuple[str, ...]:
        """The models, in params.yaml's order: the keys of the `train` section."""
        return tuple(self.train)


def _key(part: object) -> str:
    """A key as written in a path; quoted when it is empty, padded or unprintable (one line)."""
    text = str(part)
    return text if text and text.isprintable() and text.strip() == text else repr(text)


def _describe(error: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    path = ".".join(_key(part) for part in (*prefix, *error["loc"]))
    kind = error["type"]
    if kind == "value_error" and not error["loc"]:  # a cross-field check of the section
        message = str(error["msg"]).removeprefix("Value error, ")
        return f"{path}: {message}" if path else message
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
    params = validate_section(Params, raw, (), source)
    params._source = source
    return params


SectionT = TypeVar("SectionT", bound=BaseModel)


def validate_section(
    schema: type[SectionT], raw: object, where: tuple[str, ...], source: str = "params.yaml"
) -> SectionT:
    """`raw` validated against `schema`; the first problem is one `DlpipeError` line naming the
    key path from the top of params.yaml (`where` is the section's own path)."""
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        errors = err.errors()
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise DlpipeError(f"{source}: {_describe(dict(errors[0]), where)}{more}") from None


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


def train_config(params: Params, model: str) -> TrainConfig:
    """The training section of one model."""
    if model not in params.train:
        choices = ", ".join(params.models) or "none"
        raise DlpipeError(f"unknown model {model!r}; params.yaml trains: {choices}")
    return params.train[model]


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Put `value` at the dotted `key` (`train.cnn.lr`) of a params mapping, making the sections
    on the way that it lacks."""
    *parents, leaf = key.split(".")
    for part in parents:
        raw = raw.setdefault(part, {})
    raw[leaf] = value


def flatten(prefix: str, mapping: dict[str, Any]) -> dict[str, Any]:
    """`{'model': {'d_model': 128}}` -> `{'<prefix>.model.d_model': 128}`."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat |= flatten(name, value)
        else:
            flat[name] = value
    return flat
