"""Hostile raw inputs at the serving edges, fuzzed: `dlpipe predict`, `Predictor` and the pyfunc.

Random bytes as images, truncated and odd-sized or odd-mode pictures, arrays of any shape and
dtype, empty, huge, binary and unpaired-surrogate texts, review files that are not UTF-8: every
case ends in a prediction per input or in one DlpipeError line (exit code 2 from the CLI), never
another exception. About 1,300 cases in all, derandomized so that CI is repeatable.
"""

from __future__ import annotations

import base64
import io
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from support.families import REPO_ROOT
from support.trained import TrainedFolders

from dlpipe.cli import main
from dlpipe.errors import DlpipeError
from dlpipe.serving import Predictor, RawInputModel

FUZZ = settings(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PNG_SIGNATURE, JPEG_SOI = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"


@pytest.fixture(scope="module")
def predictors(trained_folders: TrainedFolders) -> dict[str, Predictor]:
    return {
        name: Predictor.from_folder(trained_folders.model_dir(name))
        for name in ("cnn", "rnn", "transformer")
    }


def assert_predicts_or_one_line(predict: Callable[[], pd.DataFrame], count: int) -> None:
    """`predict()` gives one row of finite probabilities per input, or one DlpipeError line."""
    try:
        frame = predict()
    except DlpipeError as err:
        assert "\n" not in str(err) and str(err), repr(str(err))
        return
    assert len(frame) == count
    probabilities = np.array(frame["probabilities"].tolist())
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)


# --- images ---------------------------------------------------------------------------------------

MODES = {  # mode -> formats that can hold it
    "1": ("PNG", "BMP", "TIFF"),
    "L": ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"),
    "LA": ("PNG", "TIFF"),
    "P": ("PNG", "GIF", "BMP", "TIFF"),
    "RGB": ("PNG", "JPEG", "BMP", "TIFF", "WEBP"),
    "RGBA": ("PNG", "TIFF", "WEBP"),
    "CMYK": ("JPEG", "TIFF"),
    "I": ("TIFF",),
    "I;16": ("PNG", "TIFF"),
    "F": ("TIFF",),
}


@st.composite
def pictures(draw: st.DrawFn) -> bytes:
    """An encoded picture of any mode, size (1 to 300 pixels a side, very thin ones included)
    and content, possibly cut short."""
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    width, height = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, bands), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if bands == 1 else pixels, "L" if bands == 1 else None)
    image = image.convert(mode) if image.mode != mode else image
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    data = buffer.getvalue()
    cut = draw(st.one_of(st.none(), st.integers(0, len(data))))
    return data if cut is None else data[:cut]


IMAGE_VALUES = st.one_of(
    st.binary(max_size=512),
    st.binary(max_size=256).map(lambda b: PNG_SIGNATURE + b),
    st.binary(max_size=256).map(lambda b: JPEG_SOI + b),
    pictures(),
    pictures().map(lambda b: base64.b64encode(b).decode()),
    st.text(max_size=64),
    hnp.arrays(
        st.sampled_from([np.uint8, np.int16, np.int64, np.float32, np.float64, np.bool_]),
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=40),
    ),
    st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.integers(-3, 300), max_size=5)),
)


@settings(FUZZ, max_examples=400)
@given(st.lists(IMAGE_VALUES, min_size=1, max_size=3))
@example([b""])
@example([np.full((28, 28), np.nan)])
@example([np.zeros((0, 28))])
@example([np.array([[1 + 2j]])])
@example(["iVBORw0KGgo="])  # base64 of a bare PNG signature
def test_the_cnn_predictor_takes_any_image_value(
    predictors: dict[str, Predictor], values: list[Any]
) -> None:
    assert_predicts_or_one_line(lambda: predictors["cnn"].predict(values), len(values))


# --- texts ----------------------------------------------------------------------------------------

TEXTS = st.one_of(
    st.text(max_size=200),
    st.text(st.characters(codec=None, categories=["Cs", "Cc", "Zs", "Mn", "So"]), max_size=50),
    st.tuples(st.text(min_size=1, max_size=8), st.integers(1000, 40000)).map(lambda t: t[0] * t[1]),
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
    st.one_of(st.none(), st.integers(), st.floats(), st.lists(st.text(max_size=5), max_size=2)),
)


@settings(FUZZ, max_examples=400)
@given(st.sampled_from(["rnn", "transformer"]), st.lists(TEXTS, min_size=1, max_size=4))
@example("transformer", ["<br /><br />"])
@example("rnn", ["\ud800 lone surrogate"])
@example("transformer", [float("nan")])
@example("rnn", ["\x00" * 10])
def test_the_text_predictors_take_any_text_value(
    predictors: dict[str, Predictor], family: str, values: list[Any]
) -> None:
    assert_predicts_or_one_line(lambda: predictors[family].predict(values), len(values))


# --- the pyfunc -----------------------------------------------------------------------------------


@settings(FUZZ, max_examples=200)
@given(
    st.sampled_from(["cnn", "transformer"]),
    st.lists(st.one_of(IMAGE_VALUES, TEXTS), min_size=1, max_size=3),
    st.sampled_from(["image", "text", "other"]),
)
def test_the_pyfunc_takes_any_frame(
    predictors: dict[str, Predictor], family: str, values: list[Any], column: str
) -> None:
    model = RawInputModel()
    model.predictor = predictors[family]
    frame = pd.DataFrame({column: pd.Series(values, dtype=object)})
    assert_predicts_or_one_line(lambda: model.predict(None, frame), len(values))  # type: ignore[arg-type]


# --- dlpipe predict -------------------------------------------------------------------------------


@pytest.fixture
def in_project(
    trained_folders: TrainedFolders, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """cwd = a project: the repo's params.yaml (where `dlpipe predict` finds each model's family)
    beside the trained folders' data/ (read-only, so linked)."""
    shutil.copyfile(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data").symlink_to(trained_folders.root / "data", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    level = logging.getLogger("mlflow").level
    yield
    logging.getLogger("mlflow").setLevel(level)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_prints_or_one_error(code: int, out: str, err: str, count: int | None) -> None:
    """Exit 0 with `count` lines out (None: any output, e.g. --help or --json), or exit 2 with
    one error line and nothing out."""
    assert "Traceback" not in err, err
    if code == 0:
        assert out and (count is None or len(out.splitlines()) == count), out
    else:
        assert code == 2, (code, err)
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0] == err.rstrip("\n"), err
        assert out == "", out


def test_dlpipe_predict_answers_valid_inputs(
    in_project: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The fuzzed cases below may all fail cleanly; valid ones must be answered."""
    picture = tmp_path / "digit.png"
    Image.new("L", (40, 30), 255).save(picture, format="PNG")
    for family, inputs in (
        ("rnn", ["a fine film", "dull"]),
        ("transformer", ["a fine film", "dull"]),
        ("cnn", [str(picture)]),
    ):
        code, out, err = run_cli(["predict", family, *inputs], capsys)
        assert code == 0, err
        assert_prints_or_one_error(code, out, err, len(inputs))


CLI_TEXTS = st.one_of(
    st.text(max_size=80).filter(lambda t: "\x00" not in t and t != "--"),  # "--": end of options
    st.sampled_from(["--json", "-x", "--file", "-", "--model-dir", "--help=1", "-1"]),
)


@settings(FUZZ, max_examples=150)
@given(st.sampled_from(["rnn", "transformer"]), st.lists(CLI_TEXTS, min_size=0, max_size=3))
@example("rnn", ["caf\udce9"])  # a latin-1 byte on the command line, as Python decodes argv
def test_dlpipe_predict_takes_any_review_arguments(
    in_project: None, capsys: pytest.CaptureFixture[str], family: str, texts: list[str]
) -> None:
    code, out, err = run_cli(["predict", family, *texts], capsys)
    options = any(text.startswith("-") for text in texts)  # -h, --js (--json), ...
    assert_prints_or_one_error(code, out, err, None if options else len(texts))


@settings(FUZZ, max_examples=150)
@given(
    st.sampled_from(["rnn", "transformer", "cnn"]),
    st.one_of(st.binary(max_size=300), pictures(), st.text(max_size=200).map(str.encode)),
)
@example("rnn", b"\xff\xfe not utf-8 \xc3\x28")
@example("transformer", b"\n\n  \n")
@example("cnn", b"")
def test_dlpipe_predict_takes_any_file(
    in_project: None, capsys: pytest.CaptureFixture[str], family: str, data: bytes
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "input"
        path.write_bytes(data)
        argv = [str(path)] if family == "cnn" else ["--file", str(path)]
        code, out, err = run_cli(["predict", family, *argv], capsys)
    count = 0
    if code == 0:
        text = data.decode("utf-8-sig") if family != "cnn" else ""
        count = 1 if family == "cnn" else len([x for x in text.splitlines() if x.strip()])
    assert_prints_or_one_error(code, out, err, count)
