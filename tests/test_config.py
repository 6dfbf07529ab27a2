"""params.yaml: the real file loads, defaults fill gaps, each mistake is one line naming its key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dlpipe.config import (
    Params,
    TrainConfig,
    load_params,
    parse_params,
    train_config,
)
from dlpipe.datasets import dataset_settings, get_format, validate_datasets
from dlpipe.datasets.imdb import ImdbSettings
from dlpipe.datasets.mnist import MnistSettings
from dlpipe.errors import USER_ERROR_EXIT, DlpipeError
from dlpipe.family import get_family, model_family, validate_models

ROOT = Path(__file__).resolve().parents[1]
# The two built-in datasets, declared as briefly as a params.yaml may: what `train.<model>`
# sections name (`dataset:`) must be declared.
DATASETS = "datasets:\n  mnist: {format: mnist, path: x}\n  imdb: {format: imdb, path: x}\n"
DATASETS_RAW = {"mnist": {"format": "mnist", "path": "x"}, "imdb": {"format": "imdb", "path": "x"}}


def write_params(folder: Path, text: str) -> Path:
    path = folder / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def load_error(folder: Path, text: str) -> str:
    """The message `load_params` raises for a params.yaml holding `text`; checks it is one line."""
    path = write_params(folder, text)
    with pytest.raises(DlpipeError) as info:
        params = load_params(path)
        validate_datasets(params)
        validate_models(params)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: "), message
    return message


# --- the real file and the defaults ----------------------------------------------------------


def test_the_projects_params_yaml_loads() -> None:
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    # Values written in the file arrive unchanged in the validated model.
    assert params.seed == raw["seed"]
    datasets = validate_datasets(params)
    assert datasets["imdb"].vocab_size == raw["datasets"]["imdb"]["vocab_size"]
    assert isinstance(datasets["mnist"], MnistSettings)
    assert isinstance(datasets["imdb"], ImdbSettings)
    models = validate_models(params)
    assert models["transformer"].heads == raw["train"]["transformer"]["model"]["heads"]  # type: ignore[attr-defined]
    assert params.mlflow.experiment == raw["mlflow"]["experiment"]
    assert params.models == ("cnn", "rnn", "transformer")
    for name in params.models:
        assert train_config(params, name) is params.train[name]
        assert model_family(params, name).name == raw["train"][name]["family"]
        assert params.train[name].dataset == raw["train"][name]["dataset"]


def test_the_projects_params_yaml_sets_every_key() -> None:
    """params.yaml documents every knob: no schema key is left to a silent default."""

    def keys(tree: object, prefix: str = "") -> set[str]:
        if not isinstance(tree, dict):
            return {prefix}
        return {k for key, sub in tree.items() for k in keys(sub, f"{prefix}{key}.")}

    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    defaults = Params().model_dump()
    defaults["gates"] = parse_params(raw).gates.model_dump()  # floors: one per model
    defaults["datasets"] = {
        name: get_format(entry["format"]).settings(**entry).model_dump()
        for name, entry in raw["datasets"].items()
    }
    defaults["train"] = {
        name: {
            **TrainConfig(family=section["family"], dataset=section["dataset"]).model_dump(),
            "model": get_family(section["family"]).config().model_dump(),
        }
        for name, section in raw["train"].items()
    }
    assert keys(raw) == keys(defaults)


def test_params_yaml_states_the_schemas_defaults() -> None:
    """One source of defaults: every value params.yaml gives outside the models' recipes (and
    the gates' floors, one per model) is the schema's default, dataset entries included."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    defaults = Params().model_dump(mode="json")
    for section, stated in raw.items():
        if section == "gates":
            stated = {k: v for k, v in stated.items() if not k.endswith("floors")}
            assert stated.items() <= defaults["gates"].items()
        elif section not in ("train", "datasets"):
            assert stated == defaults[section], section
    for entry in raw["datasets"].values():
        settings = get_format(entry["format"]).settings(format=entry["format"], path=entry["path"])
        assert entry == settings.model_dump(mode="json")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_file_gives_all_defaults(tmp_path: Path, text: str) -> None:
    assert load_params(write_params(tmp_path, text)).model_dump() == Params().model_dump()


def test_partial_sections_keep_the_other_defaults() -> None:
    params = parse_params(
        {
            "seed": 7,
            "datasets": DATASETS_RAW,
            "train": {
                "rnn": {"family": "rnn", "dataset": "imdb", "model": {"cell": "lstm"}},
                "cnn": {"family": "cnn", "dataset": "mnist"},
            },
        }
    )
    assert params.seed == 7
    rnn = model_family(params, "rnn")
    model = rnn.model_config(params, "rnn")
    assert model == rnn.config(cell="lstm")
    assert params.train["rnn"].epochs == TrainConfig(family="rnn", dataset="imdb").epochs
    assert params.train["cnn"] == TrainConfig(family="cnn", dataset="mnist")
    _, imdb = dataset_settings(params, "imdb")
    assert imdb == ImdbSettings(format="imdb", path="x")
    assert imdb.truncation == "head+tail"
    _, mnist = dataset_settings(params, "mnist")
    assert mnist == MnistSettings(format="mnist", path="x")


def test_params_are_frozen() -> None:
    params = parse_params({})
    with pytest.raises(ValueError):
        params.seed = 1


def test_unknown_model_name() -> None:
    params = parse_params(
        {
            "datasets": DATASETS_RAW,
            "train": {
                "cnn": {"family": "cnn", "dataset": "mnist"},
                "rnn": {"family": "rnn", "dataset": "imdb"},
            },
        }
    )
    with pytest.raises(DlpipeError, match=r"unknown model 'mlp'; params.yaml trains: cnn, rnn"):
        train_config(params, "mlp")
    with pytest.raises(DlpipeError, match=r"no src/dlpipe/models/mlp.py"):
        get_family("mlp")
    with pytest.raises(DlpipeError, match=r"unknown dataset 'cifar'; params.yaml declares: mnist"):
        dataset_settings(params, "cifar")


def test_a_model_name_must_be_a_module_name(tmp_path: Path) -> None:
    message = load_error(tmp_path, "train:\n  My-Model: {family: cnn, dataset: mnist}\n")
    assert ": train.My-Model" in message


def test_a_dataset_name_must_be_a_module_name(tmp_path: Path) -> None:
    message = load_error(tmp_path, "datasets:\n  My-Data: {format: mnist, path: x}\n")
    assert ": datasets.My-Data" in message


@pytest.mark.parametrize(
    ("section", "key"), [("{dataset: mnist}", "family"), ("{family: cnn}", "dataset")]
)
def test_a_model_section_names_its_family_and_dataset(
    tmp_path: Path, section: str, key: str
) -> None:
    message = load_error(tmp_path, DATASETS + f"train:\n  cnn: {section}\n")
    assert message.endswith(f": train.cnn.{key}: required key is missing")


def test_a_model_trains_on_a_declared_dataset(tmp_path: Path) -> None:
    message = load_error(tmp_path, DATASETS + "train:\n  cnn: {family: cnn, dataset: cifar}\n")
    assert message.endswith(": train.cnn.dataset: no datasets.cifar entry (datasets: mnist, imdb)")


def test_a_dataset_names_its_format_and_path(tmp_path: Path) -> None:
    message = load_error(tmp_path, "datasets:\n  mnist: {path: x}\n")
    assert message.endswith(": datasets.mnist.format: required key is missing")
    message = load_error(tmp_path, "datasets:\n  mnist: {format: mnist}\n")
    assert message.endswith(": datasets.mnist.path: required key is missing")


def test_an_unknown_format_or_family_is_one_line(tmp_path: Path) -> None:
    path = write_params(tmp_path, "datasets:\n  pets: {format: pictures, path: x}\n")
    with pytest.raises(DlpipeError, match=r"unknown dataset format 'pictures': there is no src/"):
        validate_datasets(load_params(path))
    path = write_params(tmp_path, DATASETS + "train:\n  cnn: {family: convnet, dataset: mnist}\n")
    with pytest.raises(
        DlpipeError, match=r"unknown model family 'convnet': there is no src/"
    ) as info:
        validate_models(load_params(path))
    assert "\n" not in str(info.value)


def test_heads_that_do_not_divide_d_model_name_the_key(tmp_path: Path) -> None:
    message = load_error(
        tmp_path,
        DATASETS + "train:\n  transformer:\n    family: transformer\n    dataset: imdb\n"
        "    model:\n      d_model: 64\n      heads: 5\n",
    )
    assert message.endswith(": train.transformer.model: heads 5 does not divide d_model 64")


def test_gates_must_name_trained_models(tmp_path: Path) -> None:
    message = load_error(
        tmp_path,
        DATASETS + "train:\n  cnn: {family: cnn, dataset: mnist}\ngates:\n  floors:\n    rnn: {}\n",
    )
    assert message.endswith(": gates.floors.rnn: no train.rnn section")


# --- one-line errors naming the key path -------------------------------------------------------

# Sections to append keys to (four spaces deep), each declaring what it needs.
MNIST = "datasets:\n  mnist:\n    format: mnist\n    path: data/raw/mnist\n"
IMDB = "datasets:\n  imdb:\n    format: imdb\n    path: data/raw/imdb\n"
CNN = DATASETS + "train:\n  cnn:\n    family: cnn\n    dataset: mnist\n"
RNN = DATASETS + "train:\n  rnn:\n    family: rnn\n    dataset: imdb\n"


def test_unknown_top_level_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, "seed: 1\nsede: 2\n")
    assert message.endswith(": sede: unknown key (check the spelling against params.yaml)")


def test_unknown_nested_key(tmp_path: Path) -> None:
    message = load_error(tmp_path, CNN + "    modle:\n      width: 2\n")
    assert ": train.cnn.modle: unknown key" in message


def test_unknown_key_deep_in_a_model_section(tmp_path: Path) -> None:
    message = load_error(
        tmp_path,
        DATASETS + "train:\n  transformer:\n    family: transformer\n    dataset: imdb\n"
        "    model:\n      head: 8\n",
    )
    assert ": train.transformer.model.head: unknown key" in message


def test_wrong_type(tmp_path: Path) -> None:
    message = load_error(tmp_path, CNN + "    epochs: five\n")
    assert ": train.cnn.epochs: " in message
    assert "valid integer" in message
    assert "(got 'five')" in message


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    message = load_error(tmp_path, "datasets:\n  imdb: 5\n")
    assert ": datasets.imdb: " in message
    assert "(got 5)" in message


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        (RNN + "    lr: -1\n", "train.rnn.lr", "greater than 0 (got -1)"),
        (IMDB + "    truncation: middle\n", "datasets.imdb.truncation", "'middle'"),
        (IMDB + "    vocab_size: 50\n", "datasets.imdb.vocab_size", "(got 50)"),
        (MNIST + "    val_size: 0\n", "datasets.mnist.val_size", "(got 0)"),
        (CNN + "    model:\n      dropout: 1.0\n", "train.cnn.model.dropout", "less than"),
        (CNN + "    epochs: 2.5\n", "train.cnn.epochs", "(got 2.5)"),
        ("seed: -3\n", "seed", "(got -3)"),
        ("mlflow:\n  experiment: ''\n", "mlflow.experiment", "at least 1 character"),
    ],
)
def test_out_of_range_or_not_allowed(tmp_path: Path, text: str, key: str, detail: str) -> None:
    message = load_error(tmp_path, text)
    assert f": {key}: " in message
    assert detail in message


def test_allowed_choices_are_listed(tmp_path: Path) -> None:
    message = load_error(tmp_path, IMDB + "    truncation: middle\n")
    assert "'head', 'tail' or 'head+tail'" in message


def test_only_the_first_error_is_described_with_a_count_of_the_rest(tmp_path: Path) -> None:
    message = load_error(tmp_path, "seed: x\n" + CNN + "    lr: 0\n    epochs: 0\n")
    assert ": seed: " in message
    assert "train.cnn" not in message
    assert message.endswith("(+2 more)")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    message = load_error(tmp_path, text)
    assert message.endswith(": top level must be a mapping of sections")


def test_parse_params_names_its_source() -> None:
    with pytest.raises(DlpipeError, match=r"^-S overrides: top level must be a mapping"):
        parse_params(["seed"], source="-S overrides")


def test_invalid_yaml(tmp_path: Path) -> None:
    message = load_error(tmp_path, "train:\n  cnn: [1, 2\n")
    assert ": not valid YAML: " in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    with pytest.raises(DlpipeError) as info:
        load_params(path)
    assert str(info.value) == f"{path}: not found (run from the project root)"


def test_unreadable_text_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: 1\nmlflow:\n  experiment: caf\xe9\n")  # latin-1, not UTF-8
    with pytest.raises(DlpipeError, match=r"params\.yaml: .*UTF-8"):
        load_params(path)


def test_a_folder_in_place_of_the_file_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").mkdir()
    with pytest.raises(DlpipeError, match=r"params\.yaml: cannot read: Is a directory"):
        load_params(tmp_path / "params.yaml")


# --- a stage run with bad params: exit code 2 and one line, no traceback -----------------------


def test_stage_with_a_bad_key_exits_2_with_one_line(tmp_path: Path) -> None:
    write_params(tmp_path, MNIST + "    val_sise: 100\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "stages" / "prepare.py"), "mnist"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == USER_ERROR_EXIT, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: params.yaml: datasets.mnist.val_sise: unknown key")
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()
    assert not (tmp_path / "reports").exists()
