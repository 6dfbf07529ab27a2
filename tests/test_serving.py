"""Raw-input serving: image preprocessing, text batching, and the pyfunc round trip."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw
from support.servers import start_model_server, stop_process_group, wait_for_ping
from support.trained import SERVING_DATA_MAX_LEN, RegistryStore, TrainedFolders, mlflow_tracking

from dlpipe.data.text import TextSettings, train_tokenizer
from dlpipe.errors import DlpipeError
from dlpipe.inputs.images import decode, preprocess_digit, resized
from dlpipe.serving import Predictor, log_raw_input_model, pip_requirements

CENTRE = 28 * 0.5  # where MNIST's centre of mass lies: pixel (14, 14) of the 28x28 canvas
SHORT_REVIEW = "Great!"
LONG_REVIEW = " ".join(["The plot made no sense and the acting was dull, boring, slow."] * 30)


def draw_digit(mode: str = "L", background: Any = 255, ink: Any = 0) -> Image.Image:
    """A thick "7" drawn off-centre on a 100x80 canvas, far larger than MNIST's 28x28."""
    image = Image.new(mode, (100, 80), background)
    ImageDraw.Draw(image).line([(55, 12), (88, 12), (66, 70)], fill=ink, width=7)
    return image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def centre_of_mass(pixels: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(pixels.shape)
    total = pixels.sum()
    return float((rows * pixels).sum() / total), float((cols * pixels).sum() / total)


# --- images --------------------------------------------------------------------------------------


def test_a_drawn_digit_is_inverted_centred_and_scaled() -> None:
    pixels = np.asarray(draw_digit())
    out = preprocess_digit(pixels)

    assert out.shape == (28, 28) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.max() > 0.9  # the dark ink became bright
    assert np.all(out[[0, -1], :] == 0) and np.all(out[:, [0, -1]] == 0)  # dark background
    rows, cols = np.nonzero(out)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert max(height, width) == 20  # the longer side fills the 20x20 box
    assert abs(height / width - 58 / 40) < 0.25  # aspect ratio kept (the stroke is ~58x40)
    cy, cx = centre_of_mass(out)
    assert abs(cy - CENTRE) <= 0.75 and abs(cx - CENTRE) <= 0.75


def test_light_and_dark_backgrounds_give_the_same_digit() -> None:
    dark_on_light = preprocess_digit(np.asarray(draw_digit()))
    light_on_dark = preprocess_digit(np.asarray(draw_digit(background=0, ink=255)))
    np.testing.assert_allclose(dark_on_light, light_on_dark, atol=1e-6)


def test_png_bytes_base64_and_floats_give_the_same_result_as_the_array() -> None:
    image = draw_digit()
    expected = preprocess_digit(np.asarray(image))
    png = encode(image, "PNG")

    np.testing.assert_array_equal(preprocess_digit(png), expected)
    np.testing.assert_array_equal(preprocess_digit(base64.b64encode(png).decode()), expected)
    np.testing.assert_allclose(preprocess_digit(np.asarray(image) / 255.0), expected, atol=1e-5)
    np.testing.assert_allclose(preprocess_digit(np.asarray(image).tolist()), expected, atol=1e-6)
    # JPEG is lossy: close, not equal.
    assert np.abs(preprocess_digit(encode(image, "JPEG")) - expected).mean() < 0.02


def test_colour_and_transparent_pictures_are_laid_on_white() -> None:
    expected = preprocess_digit(np.asarray(draw_digit()))
    rgb = draw_digit("RGB", (250, 250, 245), (20, 30, 200))
    transparent = draw_digit("RGBA", (0, 0, 0, 0), (0, 0, 0, 255))  # black ink, clear paper
    for image in (rgb, transparent):
        assert np.abs(preprocess_digit(encode(image, "PNG")) - expected).mean() < 0.01
    assert np.abs(preprocess_digit(np.asarray(transparent)) - expected).mean() < 0.01


def test_an_mnist_style_digit_passes_through_unchanged() -> None:
    """Preprocessing its own output changes nothing: MNIST-shaped input stays as it is."""
    once = preprocess_digit(np.asarray(draw_digit()))
    twice = preprocess_digit(once)
    assert np.abs(twice - once).mean() < 0.01
    assert centre_of_mass(twice) == pytest.approx(centre_of_mass(once), abs=0.5)


def test_a_blank_picture_gives_an_empty_canvas() -> None:
    for blank in (np.full((30, 40), 255, np.uint8), np.zeros((5, 5)), np.ones((1, 1))):
        assert not preprocess_digit(blank).any()


@pytest.mark.parametrize(
    "bad",
    [
        b"hello, not a picture",
        "not base64 at all!",
        base64.b64encode(b"hello").decode(),
        np.zeros((2, 2, 2, 2)),
        np.array([[np.nan, 0.0]]),
        np.array([[300, 0]]),
        np.array([[-1, 0]]),
        np.array([["a", "b"]]),
        np.zeros((0, 0)),
        [[1, 2], [3]],
        None,
        3.5,
    ],
    ids=lambda value: type(value).__name__,
)
def test_what_is_not_an_image_is_one_clear_error(bad: Any) -> None:
    with pytest.raises(DlpipeError) as caught:
        preprocess_digit(bad, "upload.png")
    message = str(caught.value)
    assert message.startswith("upload.png: ") and "\n" not in message


def test_grayscale_weights_rgb_arrays() -> None:
    gray = decode(np.array([[[255, 0, 0], [0, 255, 0]]], dtype=np.uint8))
    np.testing.assert_allclose(gray, [[0.299 * 255, 0.587 * 255]])


def test_the_digit_canvas_takes_the_datasets_size() -> None:
    out = preprocess_digit(np.asarray(draw_digit()), canvas_size=56)
    assert out.shape == (56, 56)
    rows, cols = np.nonzero(out)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 == 40  # the box is 20/28 of the canvas
    cy, cx = centre_of_mass(out)
    assert abs(cy - 28.0) <= 1.0 and abs(cx - 28.0) <= 1.0


def colour_picture() -> np.ndarray:
    """uint8 [30, 40, 3]: red, green and blue bands, so a swapped channel order shows."""
    pixels = np.zeros((30, 40, 3), dtype=np.uint8)
    pixels[:10, :, 0] = 250
    pixels[10:20, :, 1] = 200
    pixels[20:, :, 2] = 150
    pixels[:, :5] = 60  # a grey stripe
    return pixels


def test_a_colour_png_decodes_to_three_channels() -> None:
    pixels = colour_picture()
    png = encode(Image.fromarray(pixels), "PNG")
    for value in (png, base64.b64encode(png).decode(), pixels, pixels / 255.0):
        rgb = decode(value, "pets.png", channels=3)
        assert rgb.shape == (30, 40, 3)
        np.testing.assert_allclose(rgb, pixels, atol=1e-6)
    gray = decode(png, "pets.png")  # the default: one channel
    np.testing.assert_allclose(gray, np.asarray(Image.fromarray(pixels).convert("L")))
    # a grayscale picture read as colour repeats its one channel
    np.testing.assert_allclose(decode(pixels[..., 0], channels=3), np.repeat(pixels[..., :1], 3, 2))


def test_a_transparent_colour_png_is_laid_on_white() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 2] = 255  # blue
    rgba[:2, ..., 3] = 255  # the top half opaque, the bottom half clear
    rgb = decode(encode(Image.fromarray(rgba, "RGBA"), "PNG"), channels=3)
    np.testing.assert_allclose(rgb[:2], np.broadcast_to([0, 0, 255], (2, 4, 3)))
    np.testing.assert_allclose(rgb[2:], 255.0)


def test_resized_gives_uint8_channels_first_at_the_datasets_size() -> None:
    pixels = colour_picture()
    png = encode(Image.fromarray(pixels), "PNG")
    out = resized(png, "pets.png", 3, 24, 32)
    assert out.shape == (3, 24, 32) and out.dtype == np.uint8
    expected = Image.fromarray(pixels).resize((32, 24), Image.Resampling.BILINEAR)
    np.testing.assert_array_equal(out, np.asarray(expected).transpose(2, 0, 1))
    assert out[0, 0, -1] == 250 and out[1, 12, -1] == 200 and out[2, -1, -1] == 150
    np.testing.assert_array_equal(resized(pixels, "pets", 3, 30, 40), pixels.transpose(2, 0, 1))
    gray = resized(png, "pets.png", 1, 24, 32)
    assert gray.shape == (1, 24, 32) and gray.dtype == np.uint8
    with pytest.raises(DlpipeError, match=r"^pets.png: not an image"):
        resized(b"not a picture", "pets.png", 3, 24, 32)


def test_the_cnn_sees_the_preprocessed_pixels(trained_folders: TrainedFolders) -> None:
    predictor = Predictor.from_folder(trained_folders.model_dir("cnn"))
    image = np.asarray(draw_digit())
    frame = predictor.predict([image, encode(draw_digit(), "PNG")])
    with torch.no_grad():
        logits = predictor.model(torch.from_numpy(preprocess_digit(image))[None, None])
    expected = torch.softmax(logits, dim=1)[0].numpy()
    np.testing.assert_allclose(frame["probabilities"][0], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(frame["probabilities"][1], expected, rtol=1e-5, atol=1e-6)
    assert list(frame.columns[:3]) == ["label", "label_name", "probabilities"]
    assert [f"prob_{d}" for d in range(10)] == list(frame.columns[3:])


# --- text ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer(trained_folders: TrainedFolders) -> Predictor:
    return Predictor.from_folder(trained_folders.model_dir("transformer"))


class Recorder(torch.nn.Module):
    """Stands in for a text model: remembers its inputs, returns fixed logits."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        self.calls.append((tokens, lengths))
        return torch.zeros(tokens.size(0), 2)


def test_texts_are_truncated_and_right_padded(transformer: Predictor) -> None:
    recorder = Recorder()
    predictor = Predictor(recorder, transformer.info, transformer.family, transformer.assets)
    predictor.predict([SHORT_REVIEW, LONG_REVIEW])

    [(tokens, lengths)] = recorder.calls
    assert tokens.dtype == torch.long and tokens.shape == (2, SERVING_DATA_MAX_LEN)
    short = int(lengths[0])
    assert 0 < short < SERVING_DATA_MAX_LEN and int(lengths[1]) == SERVING_DATA_MAX_LEN
    assert (tokens[0, short:] == 0).all() and (tokens[0, :short] != 0).all()


def test_a_batch_predicts_as_one_review_at_a_time(transformer: Predictor) -> None:
    together = transformer.probabilities([SHORT_REVIEW, LONG_REVIEW])
    alone = np.concatenate(
        [transformer.probabilities([SHORT_REVIEW]), transformer.probabilities([LONG_REVIEW])]
    )
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


def test_text_output_columns(trained_folders: TrainedFolders) -> None:
    rnn = Predictor.from_folder(trained_folders.model_dir("rnn"))
    frame = rnn.predict(["<br />Fine<br/>", "bad"])
    assert list(frame.columns) == [
        "label",
        "label_name",
        "probabilities",
        "prob_negative",
        "prob_positive",
    ]
    assert frame["label"].dtype == np.int64
    for _, row in frame.iterrows():
        assert row["label_name"] == ["negative", "positive"][row["label"]]
        assert sum(row["probabilities"]) == pytest.approx(1.0)
        assert row["prob_negative"] == pytest.approx(row["probabilities"][0])
    assert rnn.predict([]).empty


@pytest.mark.parametrize("text", ["", "   \n\t", None, 42])
def test_empty_or_missing_text_is_an_error(transformer: Predictor, text: Any) -> None:
    with pytest.raises(DlpipeError, match=r"^input 2: (empty text|expected text)"):
        transformer.predict(["fine", text])


def test_text_with_nothing_left_after_cleaning_is_an_error(transformer: Predictor) -> None:
    with pytest.raises(DlpipeError, match=r"^input 1: no words left after cleaning"):
        transformer.predict(["<br /><br/>"])


def test_a_text_model_needs_its_own_tokenizer(
    trained_folders: TrainedFolders, tmp_path: Path
) -> None:
    folder = tmp_path / "transformer"
    shutil.copytree(trained_folders.model_dir("transformer"), folder)
    (folder / "SHA256SUMS").unlink()  # a folder from before checksums: the tokenizer's own checks
    (folder / "tokenizer.json").unlink()
    with pytest.raises(DlpipeError, match="tokenizer.json: missing; run `dvc repro`"):
        Predictor.from_folder(folder)
    settings = TextSettings(format="table", path="-", vocab_size=100)
    other = train_tokenizer(["just a few other words"], settings)
    other.save(str(folder / "tokenizer.json"))
    with pytest.raises(DlpipeError, match="trained with"):
        Predictor.from_folder(folder)


def test_missing_weights_name_the_stage_to_run(
    trained_folders: TrainedFolders, tmp_path: Path
) -> None:
    (tmp_path / "config.json").write_bytes(
        (trained_folders.model_dir("rnn") / "config.json").read_bytes()
    )
    with pytest.raises(DlpipeError, match=r"model.pt: missing; run `dvc repro train@rnn`"):
        Predictor.from_folder(tmp_path)


# --- MLflow pyfunc -------------------------------------------------------------------------------


def test_text_pyfunc_round_trip_from_the_registry(
    registry_store: RegistryStore, transformer: Predictor
) -> None:
    import mlflow

    texts = [SHORT_REVIEW, LONG_REVIEW]
    with mlflow_tracking(registry_store.uri):
        model = mlflow.pyfunc.load_model("models:/dlpipe-transformer@champion")
        frame = model.predict(pd.DataFrame({"text": texts}))
    assert isinstance(frame, pd.DataFrame) and len(frame) == 2
    expected = transformer.predict(texts)
    assert frame["label_name"].tolist() == expected["label_name"].tolist()
    np.testing.assert_allclose(
        np.stack(frame["probabilities"]), np.stack(expected["probabilities"]), rtol=1e-5
    )


def test_image_pyfunc_round_trip_takes_base64_bytes_and_pixels(
    registry_store: RegistryStore,
) -> None:
    import mlflow

    image = draw_digit()
    png = encode(image, "PNG")
    inputs = [base64.b64encode(png).decode(), png, np.asarray(image).tolist()]
    with mlflow_tracking(registry_store.uri):
        model = mlflow.pyfunc.load_model("models:/dlpipe-cnn@champion")
        frame = model.predict(pd.DataFrame({"image": inputs}))
        with pytest.raises(DlpipeError, match="row 1: not an image") as caught:
            model.predict(pd.DataFrame({"image": [png, "aGVsbG8="]}))
        # what makes `mlflow models serve` answer 400 with this line (not 500, not a traceback)
        assert isinstance(caught.value, mlflow.exceptions.MlflowException)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
        with pytest.raises(mlflow.exceptions.MlflowException, match="missing inputs"):
            model.predict(pd.DataFrame({"text": ["a review"]}))
    local = Predictor.from_folder(registry_store.folders.model_dir("cnn")).predict([png])
    for row in frame["probabilities"]:
        np.testing.assert_allclose(row, local["probabilities"][0], rtol=1e-5)


def test_the_logged_model_pins_requirements_and_declares_its_input(
    registry_store: RegistryStore,
) -> None:
    import mlflow

    with mlflow_tracking(registry_store.uri):
        folder = Path(mlflow.artifacts.download_artifacts(registry_store.model_uris["transformer"]))
        info = mlflow.models.get_model_info(registry_store.model_uris["transformer"])
    requirements = (folder / "requirements.txt").read_text().split()
    assert set(pip_requirements()) <= set(requirements)
    assert all("==" in line for line in requirements)
    logged = folder / "artifacts" / "trained_model"
    assert sorted(p.name for p in logged.iterdir()) == [
        "SHA256SUMS",
        "config.json",
        "model.pt",
        "tokenizer.json",
    ]
    assert info.signature.inputs.input_names() == ["text"]
    example = json.loads((folder / "serving_input_example.json").read_text())
    assert "dataframe_split" in example or "dataframe_records" in example


def test_logging_needs_an_active_run(trained_folders: TrainedFolders) -> None:
    with pytest.raises(DlpipeError, match="active MLflow run"):
        log_raw_input_model(trained_folders.model_dir("cnn"))


# --- a real `mlflow models serve` ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_models_serve_answers_raw_text(
    registry_store: RegistryStore, tmp_path: Path
) -> None:
    """The registered champion behind a real scoring server: raw JSON text in, labels out."""
    import time

    import requests

    log_path = tmp_path / "serve.log"
    started = time.monotonic()
    server, url = start_model_server(
        "models:/dlpipe-transformer@champion", registry_store.uri, log_path
    )
    try:
        wait_for_ping(server, url, log_path, started)
        ready_s = time.monotonic() - started

        sent = time.monotonic()
        answer = requests.post(
            f"{url}/invocations",
            json={"dataframe_records": [{"text": "awful, boring film"}]},
            timeout=30,
        )
        answer_s = time.monotonic() - sent
        assert answer.status_code == 200, answer.text
        [prediction] = answer.json()["predictions"]
        folders = registry_store.folders
        local = Predictor.from_folder(folders.model_dir("transformer"))
        [expected] = local.predict(["awful, boring film"])["probabilities"]
        assert prediction["label"] == int(np.argmax(expected))
        assert prediction["label_name"] == ["negative", "positive"][prediction["label"]]
        assert prediction["probabilities"] == pytest.approx(expected, rel=1e-5)

        malformed = requests.post(
            f"{url}/invocations",
            data=b'{"dataframe_records": [{"text": ',
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        assert 400 <= malformed.status_code < 500, malformed.text
        wrong_column = requests.post(
            f"{url}/invocations", json={"dataframe_records": [{"image": "x"}]}, timeout=30
        )
        assert 400 <= wrong_column.status_code < 500, wrong_column.text
        empty = requests.post(
            f"{url}/invocations", json={"dataframe_records": [{"text": "  "}]}, timeout=30
        )
        assert 400 <= empty.status_code < 500 and "empty text" in empty.text, empty.text
        print(f"\nmlflow models serve: /ping after {ready_s:.1f}s, answer in {answer_s:.3f}s")
    finally:
        stop_process_group(server)
