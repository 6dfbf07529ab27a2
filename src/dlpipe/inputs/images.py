"""Pictures: uint8 [C, H, W] in training; any picture (bytes, base64 text or an array) when served.

A prepared image dataset's meta.json says how a raw picture becomes what its models saw
(`image`: channels, height, width, per-channel mean and std, and `raw`):
- `resize` (every image folder): decoded, transparency laid on white, converted to grayscale or
  RGB, resized to the dataset's size (bilinear, antialiased) exactly as prepare did;
- `digit` (for MNIST-style digits): the rule below, which turns any picture of a digit into what
  an MNIST model saw:
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
accuracy), so the rule matches what the model was trained on. The canvas is the dataset's size
(28 for MNIST) and the box 20/28 of it.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dlpipe.errors import DlpipeError
from dlpipe.inputs import InputKind
from dlpipe.io import read_user_file

if TYPE_CHECKING:
    import torch

    from dlpipe.data.tensors import Split

BOX_SHARE = 20 / 28  # MNIST centres each digit's 20x20 box in its 28x28 image
CENTRE_SHARE = 0.5  # MNIST's mean centre of mass is at pixel (13.99, 14.01): (14, 14), not 13.5
THRESHOLD = 25.0  # of 255: pixels at or below are background after the contrast stretch
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")  # what an image folder may hold


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(images - mean) / std per channel; with one channel, Python scalars (the kernels models
    have always used there)."""
    if len(mean) == 1:
        return (images - mean[0]) / std[0]
    shape = (1, len(mean), 1, 1)
    return (images - images.new_tensor(mean).view(shape)) / images.new_tensor(std).view(shape)


def _decode_bytes(data: bytes, name: str, channels: int = 1) -> np.ndarray:
    """PNG/JPEG/BMP/WebP (any format Pillow reads) -> float 0-255, [H, W] grayscale or [H, W, 3]
    RGB, transparency laid on white."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": pixels still count
            with Image.open(io.BytesIO(data)) as opened:
                image: Image.Image = ImageOps.exif_transpose(opened)
                image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as err:
        kind = "too large" if isinstance(err, Image.DecompressionBombError) else "not an image"
        raise DlpipeError(f"{name}: {kind} (expected PNG, JPEG, BMP or WebP data)") from None
    if image.mode.startswith("I"):  # 16/32-bit grayscale: scale to 0-255
        pixels = np.asarray(image, dtype=np.float64)
        gray = pixels / 257.0 if pixels.max(initial=0) > 255 else pixels
        return gray if channels == 1 else np.repeat(gray[..., None], 3, axis=-1)
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float64)


def _from_array(pixels: np.ndarray, name: str, channels: int = 1) -> np.ndarray:
    """An array of pixels -> float 0-255, [H, W] grayscale or [H, W, 3] RGB (floats are read as
    0-1 when none exceeds 1, else as 0-255)."""
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
        colour = values[..., :3]
        if values.shape[-1] == 4:  # lay transparent pixels on white, as for PNG bytes
            alpha = values[..., 3:] / 255.0
            colour = colour * alpha + 255.0 * (1.0 - alpha)
        values = colour @ np.array([0.299, 0.587, 0.114]) if channels == 1 else colour
    elif values.ndim == 2 and channels == 3:
        values = np.repeat(values[..., None], 3, axis=-1)
    if values.ndim != (2 if channels == 1 else 3):
        raise DlpipeError(f"{name}: not an image (array of shape {tuple(pixels.shape)})")
    return values


def decode(image: Any, name: str = "image", channels: int = 1) -> np.ndarray:
    """Any accepted image input -> float 0-255, [H, W] for 1 channel or [H, W, 3] for 3;
    anything else -> DlpipeError."""
    if isinstance(image, str):
        try:
            image = base64.b64decode(image.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise DlpipeError(f"{name}: not an image (text that is not base64)") from None
    if isinstance(image, bytearray | memoryview):
        image = bytes(image)
    if isinstance(image, bytes):
        return _decode_bytes(image, name, channels)
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
        return _from_array(array, name, channels)
    raise DlpipeError(f"{name}: not an image ({type(image).__name__})")


def resized(image: Any, name: str, channels: int, height: int, width: int) -> np.ndarray:
    """Any accepted image -> uint8 [channels, height, width]: how an image folder is prepared
    and how its models' raw inputs are read."""
    from PIL import Image

    pixels = np.clip(np.rint(decode(image, name, channels)), 0, 255).astype(np.uint8)
    picture = Image.fromarray(pixels, "L" if channels == 1 else "RGB")
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(picture, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _fit_box(digit: np.ndarray, box: int) -> np.ndarray:
    """Scale a cropped digit, keeping its aspect ratio, so its longer side is `box` pixels."""
    from PIL import Image

    height, width = digit.shape
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(digit.astype(np.float32)).resize(size, Image.Resampling.LANCZOS)
    return np.clip(np.asarray(resized, dtype=np.float64), 0.0, 255.0)


def preprocess_digit(image: Any, name: str = "image", canvas_size: int = 28) -> np.ndarray:
    """Any accepted image -> float32 [size, size] in [0, 1], MNIST-style (rule in the module's
    docstring)."""
    canvas_size, box = int(canvas_size), round(canvas_size * BOX_SHARE)
    centre = canvas_size * CENTRE_SHARE
    gray = decode(image, name)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 127:
        gray, border = 255.0 - gray, 255.0 - border
    background, peak = float(np.median(border)), float(gray.max())
    canvas = np.zeros((canvas_size, canvas_size), dtype=np.float32)
    if peak <= background:
        return canvas
    gray = np.clip((gray - background) * (255.0 / (peak - background)), 0.0, 255.0)
    gray[gray <= THRESHOLD] = 0.0
    rows, cols = np.nonzero(gray)
    if rows.size == 0:
        return canvas
    digit = _fit_box(gray[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1], box)
    height, width = digit.shape
    total = digit.sum()
    if total > 0:
        cy = float((digit.sum(axis=1) * np.arange(height)).sum() / total)
        cx = float((digit.sum(axis=0) * np.arange(width)).sum() / total)
    else:
        cy, cx = (height - 1) / 2, (width - 1) / 2
    top = min(max(round(centre - cy), 0), canvas_size - height)
    left = min(max(round(centre - cx), 0), canvas_size - width)
    canvas[top : top + height, left : left + width] = digit / 255.0
    return canvas


def example_image(mode: str = "L") -> bytes:
    """A small PNG of a dark "7" on white: the logged input example of image models."""
    from PIL import Image, ImageDraw

    image = Image.new(mode, (40, 48), "white")
    ImageDraw.Draw(image).line([(8, 8), (32, 8), (18, 42)], fill="black", width=5)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_meta(info: dict[str, Any]) -> dict[str, Any]:
    """The `image` part of a model's data meta: channels, height, width, mean, std, raw."""
    image: dict[str, Any] = info["data"]["image"]
    return image


class ImageInputs(InputKind):
    """Pictures: PNG/JPEG/BMP/WebP bytes (base64 text in JSON) or pixel arrays, one per input."""

    name = "images"
    column = "image"
    serve_batch = 256
    mistakes_file = "mistakes.png"
    row_ids = ("images",)  # pictures carry no ids: their pixels are their identity

    def channels_last(self, device: torch.device) -> bool:
        return device.type != "mps"  # faster convolutions on CPU and CUDA; MPS lacks kernels

    def load_assets(self, model_dir: Path, info: dict[str, Any]) -> None:
        return None

    def check(self, value: Any, name: str) -> np.ndarray:
        return decode(value, name)

    def encode(
        self, values: Sequence[Any], names: Sequence[str], info: dict[str, Any], assets: Any
    ) -> tuple[torch.Tensor, ...]:
        import torch

        image = image_meta(info)
        channels, height, width = int(image["channels"]), int(image["height"]), int(image["width"])
        if image["raw"] == "digit":
            pixels = [
                preprocess_digit(v, n, height)[None] for v, n in zip(values, names, strict=True)
            ]
        else:
            pixels = [
                resized(v, n, channels, height, width).astype(np.float32) / 255.0
                for v, n in zip(values, names, strict=True)
            ]
        return (torch.from_numpy(np.stack(pixels)),)

    def read_cli_inputs(
        self, arguments: Sequence[str], file: str | None
    ) -> tuple[list[Any], list[str], list[str]]:
        if file is not None:
            raise DlpipeError("--file is for text models; give the image paths as arguments")
        if not arguments:
            raise DlpipeError("give at least one image path (PNG, JPEG, BMP or WebP)")
        images = []
        for name in arguments:
            data = read_user_file(Path(name))
            decode(data, name)  # fail here, naming the file, not later as "row 3"
            images.append(data)
        return images, list(arguments), list(arguments)

    def example(self, info: dict[str, Any]) -> list[Any]:
        mode = "L" if int(image_meta(info)["channels"]) == 1 else "RGB"
        return [base64.b64encode(example_image(mode)).decode("ascii")]

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
        import torch

        from dlpipe.evaluation.figures import plot_misclassified

        images = split.features["images"][torch.from_numpy(rows)].cpu().numpy()
        plot_misclassified(images, actual, predicted, confidence, dest)


IMAGES = ImageInputs()
