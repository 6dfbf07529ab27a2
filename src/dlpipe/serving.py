"""Raw-input models: review text or digit pictures in, labels and probabilities out.

One `Predictor` serves both `dlpipe predict` and the MLflow pyfunc (`RawInputModel`), so the CLI,
`mlflow.pyfunc.load_model(...).predict(...)` and `mlflow models serve` cannot drift apart.

Text: the saved tokenizer.json (whose normaliser cleans raw text exactly as in training) encodes
each review, `truncate` keeps the model's `max_len` tokens by the trained policy, and the batch is
padded on the right with `pad_id`. Empty or whitespace-only text is an error, not a guess.

Images (what turns any picture of a digit into what the MNIST model saw):
  1. decode: a 2-D array (uint8 0-255; floats are read as 0-1 when none exceeds 1, else as 0-255),
     an RGB(A) array, or PNG/JPEG bytes (or their base64 text, for JSON); transparent pixels are
     laid on white, then everything is converted to grayscale;
  2. if the background is light (mean of the 1-pixel border > 127), invert, so the digit is
     bright on dark as in MNIST;
  3. stretch the contrast so the background (border median) is 0 and the brightest pixel 255,
     then zero every pixel at or below 10% (25/255): paper grain and JPEG noise vanish;
  4. crop to the bounding box of the remaining pixels and scale it, keeping the aspect ratio, to
     fit 20x20 (Lanczos, so large photos are antialiased);
  5. paste it into a black 28x28 canvas so that its centre of mass lands on pixel (14, 14), where
     MNIST's lies, shifted back inside the canvas if the digit would be cut;
  6. divide by 255: float32 [28, 28] in [0, 1], as the CNN takes it. A picture with no stroke
     gives an empty canvas.
An MNIST digit passes through almost unchanged (pixel correlation 0.996 on the test set, same
accuracy), so the rule matches what the model was trained on.

Loading a logged raw model needs the `dlpipe` package importable where it is served
(`pip install -e .` in this repo): the pyfunc pickles `RawInputModel` by reference. `code_paths`
is not used on purpose: MLflow would put the copy first on sys.path, so a fresh server would run
a snapshot of whatever working tree logged the model instead of the installed package.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from dlpipe.config import MODEL_CONFIGS
from dlpipe.errors import DlpipeError
from dlpipe.io import read_json

if TYPE_CHECKING:
    from PIL import Image
    from tokenizers import Tokenizer
    from torch import nn

CANVAS, BOX = 28, 20
CENTRE = 14.0  # MNIST's mean centre of mass is at pixel (13.99, 14.01): (14, 14), not 13.5
THRESHOLD = 25.0  # of 255: pixels at or below are background after the contrast stretch
TEXT_BATCH, IMAGE_BATCH = 64, 256
ARTIFACT_NAME = "raw_model"


# --- images --------------------------------------------------------------------------------------


def _decode_bytes(data: bytes, name: str) -> np.ndarray:
    """PNG/JPEG (any format Pillow reads) -> grayscale float 0-255, transparency laid on white."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            image: Image.Image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        kind = "too large" if isinstance(err, Image.DecompressionBombError) else "not an image"
        raise DlpipeError(f"{name}: {kind} (expected PNG or JPEG data)") from None
    if image.mode.startswith("I"):  # 16/32-bit grayscale: scale to 0-255
        pixels = np.asarray(image, dtype=np.float64)
        return pixels / 257.0 if pixels.max(initial=0) > 255 else pixels
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return np.asarray(image.convert("L"), dtype=np.float64)


def _from_array(pixels: np.ndarray, name: str) -> np.ndarray:
    """An array of pixels -> grayscale float 0-255 (see the module docstring for the scales)."""
    if pixels.dtype == bool:
        pixels = pixels.astype(np.uint8) * 255
    if pixels.dtype.kind not in "uif":
        raise DlpipeError(f"{name}: not an image (array of {pixels.dtype})")
    if pixels.ndim == 3 and pixels.shape[-1] == 1:  # [H, W, 1]
        pixels = pixels[..., 0]
    elif pixels.ndim == 3 and pixels.shape[0] == 1 and pixels.shape[-1] not in (3, 4):
        pixels = pixels[0]  # [1, H, W], as the CNN's own inputs
    values = pixels.astype(np.float64)
    if values.size == 0 or not np.isfinite(values).all() or values.min() < 0:
        raise DlpipeError(f"{name}: not an image (empty, or negative or non-finite values)")
    if pixels.dtype.kind == "f" and values.max() <= 1.0:
        values = values * 255.0
    if values.max() > 255.0:
        raise DlpipeError(f"{name}: pixel values above 255 (send uint8 0-255 or floats 0-1)")
    if values.ndim == 3 and values.shape[-1] in (3, 4):
        gray = values[..., :3] @ np.array([0.299, 0.587, 0.114])
        if values.shape[-1] == 4:  # lay transparent pixels on white, as for PNG bytes
            alpha = values[..., 3] / 255.0
            gray = gray * alpha + 255.0 * (1.0 - alpha)
        values = gray
    if values.ndim != 2:
        raise DlpipeError(f"{name}: not an image (array of shape {tuple(pixels.shape)})")
    return values


def to_grayscale(image: Any, name: str = "image") -> np.ndarray:
    """Any accepted image input -> a 2-D float array 0-255; anything else -> DlpipeError."""
    if isinstance(image, str):
        try:
            image = base64.b64decode(image.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise DlpipeError(f"{name}: not an image (text that is not base64)") from None
    if isinstance(image, bytearray | memoryview):
        image = bytes(image)
    if isinstance(image, bytes):
        return _decode_bytes(image, name)
    if isinstance(image, np.ndarray | list | tuple):
        try:
            array = np.asarray(image)
        except ValueError:
            raise DlpipeError(f"{name}: not an image (ragged rows of pixels)") from None
        if array.dtype == object:  # nested lists of equal-length arrays, as from a DataFrame
            try:
                array = np.stack([np.asarray(row) for row in array])
            except ValueError:
                raise DlpipeError(f"{name}: not an image (ragged rows of pixels)") from None
        return _from_array(array, name)
    raise DlpipeError(f"{name}: not an image ({type(image).__name__})")


def _fit_box(digit: np.ndarray) -> np.ndarray:
    """Scale a cropped digit, keeping its aspect ratio, so its longer side is BOX pixels."""
    from PIL import Image

    height, width = digit.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(digit.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, 255.0)


def preprocess_image(image: Any, name: str = "image") -> np.ndarray:
    """Any accepted image -> float32 [28, 28] in [0, 1], MNIST-style (rule in module docstring)."""
    gray = to_grayscale(image, name)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 127:
        gray, border = 255.0 - gray, 255.0 - border
    background, peak = float(np.median(border)), float(gray.max())
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.float32)
    if peak <= background:
        return canvas
    gray = np.clip((gray - background) * (255.0 / (peak - background)), 0.0, 255.0)
    gray[gray <= THRESHOLD] = 0.0
    rows, cols = np.nonzero(gray)
    if rows.size == 0:
        return canvas
    digit = _fit_box(gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])
    height, width = digit.shape
    total = digit.sum()
    if total > 0:
        cy = float((digit.sum(axis=1) * np.arange(height)).sum() / total)
        cx = float((digit.sum(axis=0) * np.arange(width)).sum() / total)
    else:
        cy, cx = (height - 1) / 2, (width - 1) / 2
    top = min(max(round(CENTRE - cy), 0), CANVAS - height)
    left = min(max(round(CENTRE - cx), 0), CANVAS - width)
    canvas[top : top + height, left : left + width] = digit / 255.0
    return canvas


# --- text ----------------------------------------------------------------------------------------


def load_tokenizer(path: Path) -> Tokenizer:
    """The prepare stage's tokenizer.json; missing or broken is a user-level error."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise DlpipeError(f"{path}: missing; run `dvc repro prepare@imdb` first")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises plain Exception
        raise DlpipeError(f"{path}: not a tokenizer file ({str(err).splitlines()[0]})") from None


def check_text(text: Any, name: str = "text") -> str:
    """The text itself; None, non-text, empty or whitespace-only -> DlpipeError."""
    if not isinstance(text, str):
        raise DlpipeError(f"{name}: expected text, got {type(text).__name__}")
    if not text.strip():
        raise DlpipeError(f"{name}: empty text")
    return text


# --- the predictor -------------------------------------------------------------------------------


def load_model_files(weights: Path, config: Path) -> tuple[nn.Module, dict[str, Any]]:
    """A trained model (eval mode, CPU) from its model.pt and config.json, wherever they are."""
    import torch

    from dlpipe.models import build_model, data_meta

    info: dict[str, Any] = read_json(config)
    name = info.get("model")
    if name not in MODEL_CONFIGS or not isinstance(info.get("data"), dict):
        raise DlpipeError(f"{config}: not a dlpipe model config (model {name!r})")
    config_model = MODEL_CONFIGS[name].model_validate(info["model_config"])
    model = build_model(name, config_model, data_meta(info["data"]))
    if not weights.is_file():
        raise DlpipeError(f"{weights}: missing; run `dvc repro train@{name}` first")
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval(), info


class Predictor:
    """A trained model plus what turns raw inputs into its tensors and its logits into labels."""

    def __init__(
        self, model: nn.Module, info: dict[str, Any], tokenizer: Tokenizer | None = None
    ) -> None:
        self.model, self.info, self.tokenizer = model, info, tokenizer
        self.family: str = info["model"]
        data = info["data"]
        names = data.get("label_names") or range(int(data["num_classes"]))
        self.label_names = [str(label) for label in names]
        if self.is_text:
            if tokenizer is None:
                raise DlpipeError(f"the {self.family} model needs its tokenizer.json")
            if tokenizer.get_vocab_size() != int(data["vocab_size"]):
                raise DlpipeError(
                    f"tokenizer has {tokenizer.get_vocab_size()} tokens but the {self.family} "
                    f"model was trained with {data['vocab_size']}; rerun `dvc repro`"
                )

    @classmethod
    def from_files(cls, weights: Path, config: Path, tokenizer: Path | None = None) -> Predictor:
        model, info = load_model_files(weights, config)
        vocabulary = load_tokenizer(tokenizer) if tokenizer and info["model"] != "cnn" else None
        return cls(model, info, vocabulary)

    @classmethod
    def from_folder(cls, model_dir: Path, tokenizer: Path | None = None) -> Predictor:
        """From a train stage's output folder (`data/models/<name>`)."""
        return cls.from_files(model_dir / "model.pt", model_dir / "config.json", tokenizer)

    @property
    def is_text(self) -> bool:
        return self.family != "cnn"

    @property
    def input_column(self) -> str:
        """The pyfunc's input column: `text` for the text models, `image` for the CNN."""
        return "text" if self.is_text else "image"

    def _text_logits(self, texts: list[str], names: list[str]) -> np.ndarray:
        import torch

        from dlpipe.data.imdb import truncate

        assert self.tokenizer is not None
        data = self.info["data"]
        max_len, policy, pad_id = int(data["max_len"]), str(data["truncation"]), data["pad_id"]
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        kept = [truncate(list(e.ids), max_len, policy) for e in encodings]
        for ids, name in zip(kept, names, strict=True):
            if not ids:  # e.g. only "<br />": the normaliser leaves nothing to read
                raise DlpipeError(f"{name}: no words left after cleaning (only markup?)")
        lengths = torch.tensor([max(1, len(ids)) for ids in kept])
        tokens = torch.full((len(kept), int(lengths.max())), int(pad_id), dtype=torch.long)
        for row, ids in enumerate(kept):
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        with torch.inference_mode():
            logits: np.ndarray = self.model(tokens, lengths).float().numpy()
        return logits

    def _image_logits(self, images: list[np.ndarray]) -> np.ndarray:
        import torch

        batch = torch.from_numpy(np.stack(images)).unsqueeze(1)
        with torch.inference_mode():
            logits: np.ndarray = self.model(batch).float().numpy()
        return logits

    def probabilities(
        self, inputs: Sequence[Any], names: Sequence[str] | None = None
    ) -> np.ndarray:
        """Softmax over the classes, [N, C]; `names` label the inputs in error messages."""
        labels = (
            list(names) if names is not None else [f"input {i + 1}" for i in range(len(inputs))]
        )
        if len(labels) != len(inputs):
            raise ValueError("names must match inputs one to one")
        step = TEXT_BATCH if self.is_text else IMAGE_BATCH
        chunks = []
        for start in range(0, len(inputs), step):
            part, part_names = inputs[start : start + step], labels[start : start + step]
            if self.is_text:
                texts = [check_text(t, n) for t, n in zip(part, part_names, strict=True)]
                chunks.append(self._text_logits(texts, part_names))
            else:
                pixels = [preprocess_image(x, n) for x, n in zip(part, part_names, strict=True)]
                chunks.append(self._image_logits(pixels))
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


class RawInputModel(PythonModel):
    """The pyfunc: a `text` (text models) or `image` (CNN) column in, `Predictor.predict` out."""

    predictor: Predictor | None = None

    def load_context(self, context: PythonModelContext) -> None:
        artifacts = context.artifacts
        tokenizer = artifacts.get("tokenizer")
        self.predictor = Predictor.from_files(
            Path(artifacts["weights"]),
            Path(artifacts["config"]),
            Path(tokenizer) if tokenizer else None,
        )

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
            raise DlpipeError(
                f"the {self.predictor.family} model needs a {column!r} column, got {got}"
            )
        values = model_input[column].tolist()
        return self.predictor.predict(values, [f"row {i}" for i in range(len(values))])


def pip_requirements() -> list[str]:
    """Pinned to this environment: given explicitly, MLflow skips its ~10 s inference."""
    from importlib.metadata import version

    packages = ("torch", "numpy", "pandas", "pillow", "tokenizers")
    return [f"{package}=={version(package).split('+')[0]}" for package in packages]


def example_image() -> bytes:
    """A small PNG of a dark "7" on white: the logged input example of the CNN."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (40, 48), 255)
    ImageDraw.Draw(image).line([(8, 8), (32, 8), (18, 42)], fill=0, width=5)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def input_example(predictor: Predictor) -> pd.DataFrame:
    if predictor.is_text:
        return pd.DataFrame(
            {"text": ["A moving, beautifully acted film.", "Dull and far too long."]}
        )
    return pd.DataFrame({"image": [base64.b64encode(example_image()).decode("ascii")]})


def log_raw_input_model(model_dir: Path, tokenizer: Path | None) -> str:
    """Log model_dir (+ tokenizer for text) as the `raw_model` pyfunc of the active run.

    Returns the logged model's URI (`models:/m-...`), ready for `register_and_promote`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array

    if mlflow.active_run() is None:
        raise DlpipeError("log_raw_input_model needs an active MLflow run")
    predictor = Predictor.from_folder(model_dir, tokenizer)
    example = input_example(predictor)
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
    artifacts = {"weights": str(model_dir / "model.pt"), "config": str(model_dir / "config.json")}
    if predictor.is_text and tokenizer is not None:
        artifacts["tokenizer"] = str(tokenizer)
    info = mlflow.pyfunc.log_model(
        name=ARTIFACT_NAME,
        python_model=RawInputModel(),
        artifacts=artifacts,
        signature=signature,
        input_example=example,
        pip_requirements=pip_requirements(),
    )
    return str(info.model_uri)
