"""The model registry: `build_model(name, config, meta)` -> an `nn.Module` returning logits [B, C].

Each model lives in its own module with a `build(config, meta)` function, imported only when asked
for. That is on purpose: DVC's train@cnn stage depends on models/cnn.py alone, so nothing in
rnn.py or transformer.py may run when the CNN trains.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dlpipe.config import MODEL_NAMES
from dlpipe.errors import DlpipeError

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch import nn


@dataclass(frozen=True)
class DataMeta:
    """What a model needs to know about its data: the classes, and for text the vocabulary."""

    num_classes: int
    vocab_size: int = 0
    pad_id: int = 0


def build_model(name: str, config: BaseModel, meta: DataMeta) -> nn.Module:
    """Import `dlpipe.models.<name>` and build its model from its params.yaml section."""
    if name not in MODEL_NAMES:
        raise DlpipeError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    module = importlib.import_module(f"dlpipe.models.{name}")
    model: nn.Module = module.build(config, meta)
    return model
