"""Malformed params.yaml edits: each is exit code 2 (or one DlpipeError line) naming its key.

A table of edits to the project's real params.yaml, each checked through `load_params`,
`validate_datasets` and `validate_models` (what every stage runs first: a prepare stage its own
dataset's section, a train stage its own model's), a few through the real train stage script; the
check that needs the prepared data (a dataset longer than the Transformer keeps) when the network
is built; then property-based tests: any mapping either validates or is one DlpipeError line, and
a random value put at any key of the real file is either valid or an error naming that key.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlpipe.config import Params, load_params, parse_params, set_dotted
from dlpipe.datasets import validate_datasets
from dlpipe.errors import USER_ERROR_EXIT, DlpipeError
from dlpipe.family import DataMeta, model_family, validate_models
from dlpipe.integrity import seal

ROOT = Path(__file__).resolve().parents[2]
REAL = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))

# (dotted key, the value put there, the key the error must name)
EDITS: list[tuple[str, Any, str]] = [
    ("sede", 1, "sede"),
    ("train.cnn.lr_rate", 0.1, "train.cnn.lr_rate"),
    ("train.transformer.model.head", 8, "train.transformer.model.head"),
    ("datasets.imdb.vocab", 100, "datasets.imdb.vocab"),
    ("train.cnn.epochs", "five", "train.cnn.epochs"),
    ("train.rnn.batch_size", [64], "train.rnn.batch_size"),
    ("train.cnn.deterministic", "maybe", "train.cnn.deterministic"),
    ("train.rnn.epochs", 2.5, "train.rnn.epochs"),
    ("seed", "abc", "seed"),
    ("mlflow.require_tracking", "sometimes", "mlflow.require_tracking"),
    ("train.cnn.model", [1, 2], "train.cnn.model"),
    ("train.cnn", None, "train.cnn"),
    ("datasets", [], "datasets"),
    ("datasets.mnist", None, "datasets.mnist"),
    ("datasets.mnist.format", "Mnist", "datasets.mnist.format"),
    ("datasets.mnist.path", "", "datasets.mnist.path"),
    ("train.cnn.family", "Conv-Net", "train.cnn.family"),
    ("train.cnn.dataset", "cifar", "train.cnn.dataset"),
    ("train.rnn.dataset", None, "train.rnn.dataset"),
    ("train.cnn.epochs", 0, "train.cnn.epochs"),
    ("train.cnn.batch_size", -32, "train.cnn.batch_size"),
    ("train.transformer.eval_batch_size", 0, "train.transformer.eval_batch_size"),
    ("train.rnn.lr", -0.001, "train.rnn.lr"),
    ("train.cnn.lr", 0, "train.cnn.lr"),
    ("train.rnn.weight_decay", -0.1, "train.rnn.weight_decay"),
    ("train.rnn.weight_decay", math.inf, "train.rnn.weight_decay"),
    ("train.cnn.grad_clip", math.nan, "train.cnn.grad_clip"),
    ("train.rnn.early_stopping_patience", -1, "train.rnn.early_stopping_patience"),
    ("train.cnn.max_steps_per_epoch", -5, "train.cnn.max_steps_per_epoch"),
    ("train.cnn.label_smoothing", 1.0, "train.cnn.label_smoothing"),
    ("seed", -1, "seed"),
    ("datasets.mnist.val_size", 0, "datasets.mnist.val_size"),
    ("datasets.mnist.max_train", -1, "datasets.mnist.max_train"),
    ("datasets.imdb.vocab_size", 10, "datasets.imdb.vocab_size"),
    ("fetch.connect_timeout_s", 0, "fetch.connect_timeout_s"),
    ("fetch.retries", 11, "fetch.retries"),
    ("evaluate.calibration_bins", 1, "evaluate.calibration_bins"),
    ("evaluate.latency_batch_sizes", [], "evaluate.latency_batch_sizes"),
    ("evaluate.latency_batch_sizes", [0, 1], "evaluate.latency_batch_sizes"),
    ("registry.min_delta", -0.1, "registry.min_delta"),
    ("registry.name_prefix", "", "registry.name_prefix"),
    ("mlflow.system_metrics_interval_s", 0, "mlflow.system_metrics_interval_s"),
    ("mlflow.experiment", "", "mlflow.experiment"),
    ("gates.max_drop", -0.01, "gates.max_drop"),
    ("gates.floors.cnn.test_accuracy", 1.5, "gates.floors.cnn.test_accuracy"),
    ("gates.floors.mlp", {"test_accuracy": 0.5}, "gates.floors.mlp"),
    ("train.transformer.model.layers", 0, "train.transformer.model.layers"),
    ("train.rnn.model.hidden_size", 0, "train.rnn.model.hidden_size"),
    ("train.cnn.model.width", 0, "train.cnn.model.width"),
    ("train.transformer.model.dropout", 1.0, "train.transformer.model.dropout"),
    ("train.cnn.device", "tpu", "train.cnn.device"),
    ("train.rnn.precision", "fp8", "train.rnn.precision"),
    ("train.cnn.nproc", 0, "train.cnn.nproc"),
    ("train.cnn.optimizer", "sgd", "train.cnn.optimizer"),
    ("train.rnn.schedule", "linear", "train.rnn.schedule"),
    ("train.cnn.monitor", "val_f1", "train.cnn.monitor"),
    ("datasets.imdb.truncation", "middle", "datasets.imdb.truncation"),
    ("datasets.imdb.tokenizer", "sentencepiece", "datasets.imdb.tokenizer"),
    ("registry.metric", "test_recall", "registry.metric"),
    ("train.rnn.model.cell", "rnn", "train.rnn.model.cell"),
    ("train.transformer.model.positional", "rotary", "train.transformer.model.positional"),
    # a cross-key check of the section: it names both keys
    ("train.transformer.model.heads", 3, "train.transformer.model: heads 3"),
    ("train.transformer.model.d_model", 66, "train.transformer.model: heads 4"),
    ("datasets.imdb.max_len", 5000, "datasets.imdb.max_len"),
    ("train.transformer.model.max_len", 4, "train.transformer.model.max_len"),
]
# Edits also run through `python stages/train.py <model>`: a schema error, a choice, and the
# family-level check that only the family's own module knows.
STAGE_EDITS = {
    ("train.cnn.lr_rate", "cnn"),
    ("train.cnn.device", "cnn"),
    ("train.rnn.precision", "rnn"),
    ("train.transformer.model.heads", "transformer"),
}
# Valid params whose prepared text is longer than the Transformer keeps: it would silently cut
# the end (often the verdict) off every longer text. Only the prepared data's meta.json says how
# long its texts are, so the network refuses it when it is built for that data.
TOO_LONG_EDITS = [("datasets.imdb.max_len", 1024), ("train.transformer.model.max_len", 256)]


def edited(path: str, value: Any) -> dict[str, Any]:
    """The real params.yaml with `value` put at the dotted `path`."""
    raw = copy.deepcopy(REAL)
    set_dotted(raw, path, value)
    return raw


def check_error(message: str, source: str, key: str) -> None:
    assert "\n" not in message, message
    assert message.startswith(f"{source}: {key}"), message


def test_the_table_is_big_and_every_edit_differs() -> None:
    assert len(EDITS) >= 30
    assert len({(path, repr(value)) for path, value, _ in EDITS}) == len(EDITS)
    assert {path for path, _ in STAGE_EDITS} <= {path for path, _, _ in EDITS}


@pytest.mark.parametrize(("path", "value", "key"), EDITS, ids=[f"{p}={v!r}" for p, v, _ in EDITS])
def test_a_malformed_edit_is_one_line_naming_its_key(
    tmp_path: Path, path: str, value: Any, key: str
) -> None:
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(edited(path, value)), encoding="utf-8")
    with pytest.raises(DlpipeError) as err:
        validate(load_params(params_file))
    check_error(str(err.value), str(params_file), key)


def run_train_stage(project: Path, model: str) -> subprocess.CompletedProcess[str]:
    """`python stages/train.py <model>` in `project`, importing this checkout's dlpipe."""
    return subprocess.run(
        [sys.executable, str(ROOT / "stages" / "train.py"), model],
        cwd=project,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(("path", "family"), sorted(STAGE_EDITS))
def test_the_train_stage_exits_2_with_one_line(tmp_path: Path, path: str, family: str) -> None:
    value, key = next((v, k) for p, v, k in EDITS if p == path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited(path, value)), encoding="utf-8")
    done = run_train_stage(tmp_path, family)
    assert done.returncode == USER_ERROR_EXIT, done.stderr
    [line] = done.stderr.splitlines()
    check_error(line.removeprefix("error: "), "params.yaml", key)
    assert line.startswith("error: ") and done.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def prepared_meta(params: Params) -> DataMeta:
    """The meta.json prepare@imdb writes for these params (the vocabulary's size aside)."""
    settings = params.datasets["imdb"].model_dump()
    return DataMeta(num_classes=2, dataset="imdb", vocab_size=100, max_len=settings["max_len"])


def check_too_long(message: str) -> None:
    assert "\n" not in message, message
    assert message.startswith("datasets.imdb.max_len "), message
    assert "transformer's model.max_len" in message, message


@pytest.mark.parametrize(("path", "value"), TOO_LONG_EDITS)
def test_a_dataset_longer_than_the_transformer_keeps_fails_when_built(
    path: str, value: Any
) -> None:
    params = parse_params(edited(path, value), "edited")
    validate(params)  # each section is valid on its own
    family = model_family(params, "transformer")
    config = family.model_config(params, "transformer")
    with pytest.raises(DlpipeError) as err:
        family.build(config, prepared_meta(params))
    check_too_long(str(err.value))
    kept = config.model_dump()["max_len"]
    meta = DataMeta(num_classes=2, dataset="imdb", vocab_size=100, max_len=kept)
    family.build(config, meta)  # no longer than the model keeps: fine


def write_prepared_text(folder: Path, max_len: int) -> None:
    """A tiny prepared text dataset (two splits, meta.json, SHA256SUMS), as prepare writes it."""
    folder.mkdir(parents=True)
    rows = 8
    tokens = np.full((rows, max_len), 2, dtype=np.int32)
    arrays: dict[str, Any] = {
        "tokens": tokens,
        "lengths": np.full(rows, max_len),
        "labels": np.arange(rows) % 2,
    }
    for split in ("train", "val"):
        np.savez(folder / f"{split}.npz", **arrays)
    meta = {
        "inputs": "tokens",
        "dataset": folder.name,
        "num_classes": 2,
        "label_names": ["negative", "positive"],
        "vocab_size": 100,
        "pad_id": 0,
        "max_len": max_len,
        "truncation": "head+tail",
    }
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    seal(folder)


def test_the_train_stage_refuses_data_longer_than_the_transformer_keeps(tmp_path: Path) -> None:
    """Exit code 2 and one line naming the dataset's max_len; nothing written."""
    path, value = TOO_LONG_EDITS[1]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited(path, value)), encoding="utf-8")
    prepared = tmp_path / "data" / "prepared" / "imdb"
    write_prepared_text(prepared, max_len=REAL["datasets"]["imdb"]["max_len"])
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    done = run_train_stage(tmp_path, "transformer")
    assert done.returncode == USER_ERROR_EXIT, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("error: ") and done.stdout == ""
    check_too_long(line.removeprefix("error: "))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --- properties ---------------------------------------------------------------------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# Real section and key names, so that random mappings reach deep into the schema.
NAMES = sorted(
    {"train", "model", "cnn", "rnn", "transformer", "mlp", "floors", "datasets", "cifar"}
    | set(REAL)
    | {k for section in REAL.values() if isinstance(section, dict) for k in section}
    | {k for cfg in REAL["datasets"].values() for k in cfg}
    | {k for cfg in REAL["train"].values() for k in cfg}
    | {k for cfg in REAL["train"].values() for k in cfg["model"]}
)
TREES = st.recursive(
    SCALARS,
    lambda inner: st.dictionaries(
        st.one_of(st.sampled_from(NAMES), st.text(max_size=6)), inner, max_size=5
    ),
    max_leaves=20,
)


def leaves(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of every value of `tree` that is not itself a non-empty mapping."""
    found = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        found += leaves(value, f"{path}.") if isinstance(value, dict) and value else [path]
    return found


LEAVES = leaves(REAL)


def validate(params: Params) -> None:
    """What the stages check of params.yaml: every dataset's and every model's section."""
    validate_datasets(params)
    validate_models(params)


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(TREES)
def test_any_mapping_validates_or_is_one_error_line(raw: object) -> None:
    try:
        validate(parse_params(raw, "fuzzed"))
    except DlpipeError as err:
        check_error(str(err), "fuzzed", "")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(LEAVES), VALUES)
def test_a_random_value_at_any_key_is_valid_or_named(path: str, value: Any) -> None:
    """The real file is valid, so an error can only come from the edited key: it names it (a
    cross-key check names its other key too, e.g. heads for d_model)."""
    try:
        validate(parse_params(edited(path, value), "fuzzed"))
    except DlpipeError as err:
        message = str(err)
        check_error(message, "fuzzed", "")
        assert path.rsplit(".", 1)[-1] in message, (path, message)
