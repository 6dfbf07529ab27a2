"""Raw-input models: review text or digit pictures in, labels and probabilities out.

One `Predictor` serves `dlpipe predict`, the MLflow pyfunc (`RawInputModel`) and so
`mlflow.pyfunc.load_model(...).predict(...)` and `mlflow models serve`: they cannot drift apart.
How a raw input becomes a tensor is the family's input kind (`dlpipe.inputs`); this module only
batches, runs the model and names the labels.

A trained model's folder (`data/models/<name>`: weights, config.json, and what its input kind
needs, such as tokenizer.json) is all a Predictor reads, each file checked against the folder's
SHA256SUMS; the pyfunc logs those files with their checksums (and not mlflow_run.json, which
names the tracking store), so a served copy is checked as it loads too.
Loading a logged raw model needs the `dlpipe` package importable where it is served
(`pip install -e .` in this repo): the pyfunc pickles `RawInputModel` by reference. `code_paths`
is not used on purpose: MLflow would put the copy first on sys.path, so a fresh server would run
a snapshot of whatever working tree logged the model instead of the installed package.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext

from dlpipe.errors import DlpipeError
from dlpipe.family import load_trained, rerun_training
from dlpipe.integrity import file_sha256, read_manifest, write_manifest

if TYPE_CHECKING:
    from torch import nn

    from dlpipe.family import Family

ARTIFACT_NAME = "raw_model"
MODEL_FOLDER = "trained_model"  # the pyfunc artifact holding the model's folder
TRAINED_FILES = ("model.pt", "config.json")  # every trained model's; the input kind adds more


class Predictor:
    """A trained model plus what turns raw inputs into its tensors and its logits into labels."""

    def __init__(self, model: nn.Module, info: dict[str, Any], family: Family, assets: Any):
        self.model, self.info, self.family, self.assets = model, info, family, assets
        data = info["data"]
        names = data.get("label_names") or range(int(data["num_classes"]))
        self.label_names = [str(label) for label in names]

    @classmethod
    def from_folder(cls, model_dir: Path) -> Predictor:
        """From a train stage's output folder (`data/models/<name>`)."""
        model, info, family = load_trained(model_dir)
        return cls(model, info, family, family.inputs.load_assets(model_dir, info))

    @property
    def input_column(self) -> str:
        """The pyfunc's input column (`text`, `image`): the input kind's."""
        return self.family.inputs.column

    def probabilities(
        self, inputs: Sequence[Any], names: Sequence[str] | None = None
    ) -> np.ndarray:
        """Softmax over the classes, [N, C]; `names` label the inputs in error messages."""
        import torch

        labels = (
            list(names) if names is not None else [f"input {i + 1}" for i in range(len(inputs))]
        )
        if len(labels) != len(inputs):
            raise ValueError("names must match inputs one to one")
        kind = self.family.inputs
        chunks = []
        for start in range(0, len(inputs), kind.serve_batch):
            end = start + kind.serve_batch
            tensors = kind.encode(inputs[start:end], labels[start:end], self.info, self.assets)
            with torch.inference_mode():
                chunks.append(self.model(*tensors).float().numpy())
        if not chunks:
            return np.zeros((0, len(self.label_names)))
        logits = np.concatenate(chunks).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict(self, inputs: Sequence[Any], names: Sequence[str] | None = None) -> pd.DataFrame:
        """One row per input: label, label_name, probabilities, and prob_<label_name> columns."""
        probs = self.probabilities(inputs, names)
        labels = probs.argmax(axis=1).astype(np.int64)
        frame = pd.DataFrame(
            {
                "label": labels,
                "label_name": pd.Series([self.label_names[i] for i in labels], dtype=object),
                "probabilities": pd.Series([row.tolist() for row in probs], dtype=object),
            }
        )
        for column, name in enumerate(self.label_names):
            frame[f"prob_{name}"] = probs[:, column]
        return frame


# --- MLflow ------------------------------------------------------------------------------------


class InvalidInput(MlflowException, DlpipeError):
    """A bad input to the served model. As an MlflowException with INVALID_PARAMETER_VALUE,
    MLflow's scoring server answers it 400 with this line; any other exception it answers with a
    generic message and the model's traceback. Still a DlpipeError for in-process callers."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class RawInputModel(PythonModel):
    """The pyfunc: the input kind's column (`text`, `image`) in, `Predictor.predict` out."""

    predictor: Predictor | None = None

    def load_context(self, context: PythonModelContext) -> None:
        self.predictor = Predictor.from_folder(Path(context.artifacts[MODEL_FOLDER]))

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        if self.predictor is None:
            raise DlpipeError("RawInputModel used before load_context")
        column = self.predictor.input_column
        if not isinstance(model_input, pd.DataFrame) or column not in model_input.columns:
            got = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else None
            raise InvalidInput(f"the model needs a {column!r} column, got {got}")
        values = model_input[column].tolist()
        try:
            return self.predictor.predict(values, [f"row {i}" for i in range(len(values))])
        except DlpipeError as err:
            raise InvalidInput(str(err)) from None


def pip_requirements() -> list[str]:
    """Pinned to this environment: given explicitly, MLflow skips its slow inference of them."""
    from importlib.metadata import version

    packages = ("torch", "numpy", "pandas", "pillow", "tokenizers")
    return [f"{package}=={version(package).split('+')[0]}" for package in packages]


def log_raw_input_model(model_dir: Path) -> str:
    """Log model_dir (weights, config and what its inputs need) as the `raw_model` pyfunc of
    the active run. Returns the logged model's URI (`models:/m-...`), ready for registering."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array

    from dlpipe.tracking.requirements import skip_module_scan

    if mlflow.active_run() is None:
        raise DlpipeError("log_raw_input_model needs an active MLflow run")
    predictor = Predictor.from_folder(model_dir)
    outputs: list[ColSpec | TensorSpec] = [
        ColSpec(DataType.long, "label"),
        ColSpec(DataType.string, "label_name"),
        ColSpec(Array(DataType.double), "probabilities"),
        *(ColSpec(DataType.double, f"prob_{name}") for name in predictor.label_names),
    ]
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, predictor.input_column)]),
        outputs=Schema(outputs),
    )
    kind = predictor.family.inputs
    example = pd.DataFrame({predictor.input_column: kind.example(predictor.info)})
    # The copy's checksums are the source's (checked just now by from_folder): a copy that
    # differs from what was trained fails where it is loaded.
    source = read_manifest(model_dir, rerun_training(model_dir / "config.json")) or {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / MODEL_FOLDER
        folder.mkdir()
        names = (*TRAINED_FILES, *kind.bundled)
        for name in names:
            shutil.copyfile(model_dir / name, folder / name)
        write_manifest(
            folder, {name: source.get(name) or file_sha256(model_dir / name) for name in names}
        )
        skip_module_scan()
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT_NAME,
            python_model=RawInputModel(),
            artifacts={MODEL_FOLDER: str(folder)},
            signature=signature,
            input_example=example,
            pip_requirements=pip_requirements(),
        )
    return str(info.model_uri)
