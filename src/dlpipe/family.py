"""A model family: everything the pipeline knows about one kind of model, declared once.

Each family is one module, `dlpipe/models/<name>.py`, that ends in `FAMILY = Family(...)`: its
name, its input kind (images or token sequences: how batches are made, how raw inputs become
model inputs, what the evaluation shows), the schema of a model's `train.<model>.model` section in
params.yaml, the function that builds the network, and its small settings for `make smoke`. A
model is a family trained on a dataset: `train.<model>` names both. The trainer, evaluation,
registry, serving, the CLI, the smoke run and the report go through this object and the dataset's
meta.json, and never name a family or a dataset.

Family modules are imported only when asked for, so DVC's train@cnn runs (and depends on) the
CNN's module alone.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from dlpipe.config import Params, train_config, validate_section
from dlpipe.errors import DlpipeError
from dlpipe.integrity import read_verified
from dlpipe.plugins import declaration

if TYPE_CHECKING:
    from torch import nn

    from dlpipe.inputs import InputKind

NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class DataMeta:
    """What a model needs to know about its data: the classes; for images their channels, size
    and per-channel mean and std; for text the vocabulary and the longest kept text."""

    num_classes: int
    dataset: str = ""
    channels: int = 0
    height: int = 0
    width: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    vocab_size: int = 0
    pad_id: int = 0
    max_len: int = 0

    @classmethod
    def from_json(cls, meta: Mapping[str, Any]) -> DataMeta:
        """The model-relevant part of a prepared dataset's meta.json."""
        image = meta.get("image") or {}
        return cls(
            num_classes=int(meta["num_classes"]),
            dataset=str(meta.get("dataset", "")),
            channels=int(image.get("channels", 0)),
            height=int(image.get("height", 0)),
            width=int(image.get("width", 0)),
            mean=tuple(float(v) for v in image.get("mean", ())),
            std=tuple(float(v) for v in image.get("std", ())),
            vocab_size=int(meta.get("vocab_size", 0)),
            pad_id=int(meta.get("pad_id", 0)),
            max_len=int(meta.get("max_len", 0)),
        )


@dataclass(frozen=True)
class Family:
    """One model family. `build(config, meta)` returns an `nn.Module` mapping a batch's inputs
    (as `inputs` makes them) to logits [B, classes]."""

    name: str
    inputs: InputKind
    config: type[BaseModel]  # the schema of train.<model>.model
    # The network for a model section and its data; a section that does not fit the data (an
    # image too small for the layers, say) is one DlpipeError line.
    build: Callable[[Any, DataMeta], nn.Module]
    smoke: Mapping[str, Any] = field(default_factory=dict)  # train.<model> overrides, make smoke
    # precision auto on a CPU with native bf16: autocast to bf16 (True) or stay in fp32 (False,
    # where measured slower: small matmuls, whose casts cost more than the bf16 kernels save).
    cpu_bf16: bool = True

    def model_config(self, params: Params, model: str) -> BaseModel:
        """train.<model>.model from params.yaml, validated against this family's schema."""
        raw = train_config(params, model).model
        return validate_section(self.config, raw, ("train", model, "model"), params.source)


def model_family(params: Params, model: str) -> Family:
    """The family that `train.<model>` names; an unknown one is one line naming the key."""
    try:
        return get_family(train_config(params, model).family)
    except DlpipeError as err:
        raise DlpipeError(f"{params.source}: train.{model}.family: {err}") from None


def get_family(name: str) -> Family:
    """The family declared by `dlpipe.models.<name>`; an unknown name is one DlpipeError line."""
    if not NAME.fullmatch(name):
        raise DlpipeError(f"unknown model family {name!r} (names are lower_snake_case)")
    return declaration("dlpipe.models", name, "FAMILY", Family, "model family")


def load_trained(model_dir: Path) -> tuple[nn.Module, dict[str, Any], Family]:
    """A trained model (eval mode, CPU), its config.json and its family, from a train stage's
    output folder (`data/models/<name>`, or the same files logged with the pyfunc).

    Every file read (config.json, model.pt, the input kind's bundled files) is checked against
    the folder's SHA256SUMS when it has one (folders logged before checksums have none): a
    flipped byte is one DlpipeError line naming the file, never a model that answers wrongly."""
    import torch

    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise DlpipeError(f"{config_path}: missing; run the earlier stages first (dvc repro)")
    rerun = rerun_training(config_path)
    try:
        info: Any = json.loads(read_verified(config_path, rerun, required=False))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DlpipeError(f"{config_path}: not valid JSON ({err})") from None
    if (
        not isinstance(info, dict)
        or not isinstance(info.get("model"), str)
        or not isinstance(info.get("family"), str)
        or not isinstance(info.get("data"), dict)
    ):
        raise DlpipeError(f"{config_path}: not a trained model's config.json")
    family = get_family(info["family"])
    config = validate_section(
        family.config, info.get("model_config"), ("model_config",), str(config_path)
    )
    model = family.build(config, DataMeta.from_json(info["data"]))
    weights = model_dir / "model.pt"
    if not weights.is_file():
        raise DlpipeError(f"{weights}: missing; run `{rerun}` first")
    for name in family.inputs.bundled:  # read next by the input kind's load_assets
        if (model_dir / name).is_file():
            read_verified(model_dir / name, rerun, required=False)
    data = read_verified(weights, rerun, required=False)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, pickle errors, EOFError, ...
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DlpipeError(
            f"{weights}: not a readable model.pt ({first}); rerun `{rerun}`"
        ) from None
    model.load_state_dict(state)
    return model.eval(), info, family


def rerun_training(config_path: Path) -> str:
    """The command that rewrites a trained model's folder, for error messages: the family named
    in its config.json (read before it is checked, only for this), else the folder's name under
    data/models."""
    try:
        name = json.loads(config_path.read_bytes()).get("model")
    except (OSError, ValueError, AttributeError):
        name = None
    folder = config_path.parent
    if not isinstance(name, str) and folder.parent.name == "models":
        name = folder.name
    known = isinstance(name, str) and NAME.fullmatch(name)
    return f"dvc repro train@{name if known else '<model>'}"


def validate_models(params: Params) -> dict[str, BaseModel]:
    """Every model's section, validated (a stage validates only its own model's, so that it
    runs no other family's code); for checks of the whole params.yaml."""
    return {name: model_family(params, name).model_config(params, name) for name in params.models}
