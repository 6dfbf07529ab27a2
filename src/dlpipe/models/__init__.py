"""The model registry: `build_model(name, config, meta)` -> an `nn.Module` returning logits [B, C].

Each model lives in its own module with a `build(config, meta)` function, imported only when asked
for. That is on purpose: DVC's train@cnn stage depends on models/cnn.py alone, so nothing in
rnn.py or transformer.py may run when the CNN trains.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlpipe.config import MODEL_CONFIGS, MODEL_NAMES
from dlpipe.errors import DlpipeError
from dlpipe.io import read_json

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch import nn


@dataclass(frozen=True)
class DataMeta:
    """What a model needs to know about its data: the classes, and for text the vocabulary."""

    num_classes: int
    vocab_size: int = 0
    pad_id: int = 0


def data_meta(meta_json: dict[str, Any]) -> DataMeta:
    """The model-relevant part of a prepared dataset's meta.json."""
    return DataMeta(
        num_classes=int(meta_json["num_classes"]),
        vocab_size=int(meta_json.get("vocab_size", 0)),
        pad_id=int(meta_json.get("pad_id", 0)),
    )


def build_model(name: str, config: BaseModel, meta: DataMeta) -> nn.Module:
    """Import `dlpipe.models.<name>` and build its model from its params.yaml section."""
    if name not in MODEL_NAMES:
        raise DlpipeError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    module = importlib.import_module(f"dlpipe.models.{name}")
    model: nn.Module = module.build(config, meta)
    return model


def load_trained(model_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model (eval mode, CPU) and its config.json, from a train stage's output folder."""
    import torch

    info: dict[str, Any] = read_json(model_dir / "config.json")
    name = info.get("model")
    if name not in MODEL_CONFIGS:
        raise DlpipeError(f"{model_dir}/config.json: unknown model {name!r}")
    config = MODEL_CONFIGS[name].model_validate(info["model_config"])
    model = build_model(name, config, data_meta(info["data"]))
    weights = model_dir / "model.pt"
    if not weights.exists():
        raise DlpipeError(f"{weights}: missing; run `dvc repro train@{name}` first")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), info
