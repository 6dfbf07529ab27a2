"""Input kinds: how one kind of model input travels, from raw values to tensors and back.

A family names its input kind (`dlpipe.inputs.images.IMAGES` or `dlpipe.inputs.tokens.TOKENS`);
everything that differs between a picture of a digit and a review goes through that object: how
prepared splits become batches, what a trained model needs beside its weights, how raw inputs
(PNG bytes, text) become model inputs, what the logged PyTorch model takes, and how the evaluate
stage shows the most confident mistakes. Code outside an input kind never asks which one it has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np
    import torch
    from mlflow.types import Schema
    from torch import nn

    from dlpipe.data.tensors import Split


class InputKind(ABC):
    """One kind of model input; subclasses fill in the raw side (serving, CLI, mistakes)."""

    name: ClassVar[str]  # what meta.json's `inputs` says: a dataset of this kind
    column: ClassVar[str]  # the pyfunc's input column, and what the CLI calls its inputs
    serve_batch: ClassVar[int]  # raw inputs encoded per forward pass when serving
    mistakes_file: ClassVar[str]  # evaluate writes it in reports/models/<name>/mistakes/
    # Prepared files a trained model needs to read raw inputs: copied beside its weights.
    bundled: ClassVar[tuple[str, ...]] = ()
    # Arrays of a prepared split that say which rows it holds, whatever their encoding: with
    # `labels`, the identity of the test split a model is scored on (the registry's comparisons).
    row_ids: ClassVar[tuple[str, ...]]
    # Prepared files `initialize` may read: with the train and val splits, the training's data.
    start_files: ClassVar[tuple[str, ...]] = ()

    # --- training ---

    def channels_last(self, device: torch.device) -> bool:
        """Whether batches (and the model) use channels-last memory on `device`."""
        return False

    def load_split(self, prepared_dir: Path, split: str, device: torch.device) -> Split:
        """A prepared split, whole, on `device`."""
        from dlpipe.data.tensors import load_split

        return load_split(prepared_dir, split, self.channels_last(device)).to(device)

    def place(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model on `device`, in the memory format its batches use."""
        import torch

        model = model.to(device)
        if self.channels_last(device):
            model = model.to(memory_format=torch.channels_last)
        return model

    def initialize(self, model: nn.Module, prepared_dir: Path) -> None:
        """Start a freshly built model from what the prepare stage learned without labels (the
        text kind's word vectors); nothing for most kinds."""
        return None

    def pytorch_model(self, model: nn.Module, pad_id: int) -> nn.Module:
        """What MLflow's pytorch flavor logs: a module taking the first batch tensor alone."""
        return model

    def tensor_schema(self) -> Schema | None:
        """The logged PyTorch model's input schema when inferring it from an example is too
        narrow (None: infer it)."""
        return None

    # --- raw inputs ---

    @abstractmethod
    def load_assets(self, model_dir: Path, info: dict[str, Any]) -> Any:
        """What `encode` needs from a trained model's folder (a tokenizer, or nothing)."""

    @abstractmethod
    def check(self, value: Any, name: str) -> Any:
        """One raw input, checked (and decoded where that is cheap); DlpipeError names `name`."""

    @abstractmethod
    def encode(
        self, values: Sequence[Any], names: Sequence[str], info: dict[str, Any], assets: Any
    ) -> tuple[torch.Tensor, ...]:
        """Raw inputs -> the model's input tensors (CPU)."""

    @abstractmethod
    def read_cli_inputs(
        self, arguments: Sequence[str], file: str | None
    ) -> tuple[list[Any], list[str], list[str]]:
        """`dlpipe predict` arguments -> (raw inputs, names for errors, what to print)."""

    @abstractmethod
    def example(self, info: dict[str, Any]) -> list[Any]:
        """Raw inputs logged as the pyfunc's input example (`info`: the model's config.json)."""

    @abstractmethod
    def write_mistakes(
        self,
        dest: Path,
        split: Split,
        rows: np.ndarray,
        actual: list[str],
        predicted: list[str],
        confidence: np.ndarray,
        prepared_dir: Path,
    ) -> None:
        """Show the test split's `rows` (most confident mistakes first) in `dest`."""
