"""Each DVC stage's `deps` name exactly the code it runs: every dlpipe module a stage imports is
a dependency (so editing it reruns the stage), and every source file it lists is imported (so
editing another family's module reruns nothing of this one). A folder dep (src/dlpipe/inputs,
src/dlpipe/linear, ...) covers every module under it, imported or not.

train@<model> and evaluate@<model> run the family that params.yaml's train.<model>.family names;
linear@<dataset> runs the linear models of the dataset's input kind (dlpipe.linear.<name>)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from support.families import MODELS

from dlpipe.config import load_params
from dlpipe.datasets import get_format

ROOT = Path(__file__).resolve().parents[2]
PARAMS = load_params(ROOT / "params.yaml")
DATASETS = tuple(PARAMS.datasets)

# What a stage script imports at the top, plus what it imports inside functions on its way.
STAGE_IMPORTS = {
    "train": ["dlpipe.training.run"],
    "evaluate": [
        "dlpipe.evaluation.run",
        "dlpipe.serving",
        "dlpipe.registry",
        "dlpipe.evaluation.figures",
        "dlpipe.tracking.run",
        "dlpipe.tracking.spool",
    ],
    "linear": ["dlpipe.linear", "dlpipe.tracking.run", "dlpipe.lineage"],
}


def family_of(model: str) -> str:
    """The family model `model` trains (params.yaml's train.<model>.family)."""
    return PARAMS.train[model].family


def inputs_of(dataset: str) -> str:
    """The input kind of a dataset's format ("images", "tokens"): which linear models it gets."""
    return get_format(PARAMS.datasets[dataset].format).inputs.name


def stage_modules(stage: str, item: str) -> list[str]:
    """The modules stage@item runs: the stage's own, plus the family or the linear models."""
    if stage == "linear":
        from dlpipe.linear import models_for

        return [*STAGE_IMPORTS[stage], *(m.__name__ for m in models_for(inputs_of(item)))]
    return [*STAGE_IMPORTS[stage], f"dlpipe.models.{family_of(item)}"]


def imported_files(stage: str, item: str) -> set[str]:
    """Repo-relative source files of the dlpipe modules `stage`@`item` imports, measured in a
    fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {stage_modules(stage, item)!r}: importlib.import_module(name)\n"
        + "files = [m.__file__ for n, m in list(sys.modules.items())\n"
        "         if n.startswith('dlpipe') and getattr(m, '__file__', None)]\n"
        "print(json.dumps(files))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    return {str(Path(f).resolve().relative_to(ROOT / "src")) for f in json.loads(out)}


def declared_code(stage: str) -> list[str]:
    """The stage's deps under src/ (files, and folders ending in /)."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        [found] = [s for s in repo.index.stages if s.addressing == stage]
        deps = [str(d.def_path) for d in found.deps if str(d.def_path).startswith("src/")]
    return [d.removeprefix("src/") + ("/" if (ROOT / d).is_dir() else "") for d in deps]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or (d.endswith("/") and path.startswith(d)) for d in deps)


def has_code(path: str) -> bool:
    """False for a package __init__ that holds only its docstring (nothing to depend on)."""
    body = ast.parse((ROOT / "src" / path).read_text(encoding="utf-8")).body
    return not (len(body) <= 1 and all(isinstance(node, ast.Expr) for node in body))


@pytest.mark.parametrize(
    ("stage", "item"),
    [
        *((s, m) for s in ("train", "evaluate") for m in MODELS),
        *(("linear", d) for d in DATASETS),
    ],
)
def test_stage_deps_are_exactly_the_code_it_imports(stage: str, item: str) -> None:
    deps = declared_code(f"{stage}@{item}")
    imported = {f for f in imported_files(stage, item) if has_code(f)}
    imported.discard("dlpipe/__init__.py")  # the package's version string: no behaviour
    missing = sorted(f for f in imported if not covered(f, deps))
    assert not missing, f"{stage}@{item} imports {missing} but does not depend on them"
    unused = sorted(d for d in deps if not d.endswith("/") and d not in imported)
    assert not unused, f"{stage}@{item} depends on {unused} but never imports them"


def test_each_model_s_stages_depend_on_its_own_family_only() -> None:
    """Editing one family's module reruns the stages of the models of that family alone."""
    for model in MODELS:
        for stage in ("train", "evaluate"):
            families = [
                d for d in declared_code(f"{stage}@{model}") if d.startswith("dlpipe/models")
            ]
            assert families == [f"dlpipe/models/{family_of(model)}.py"], (stage, model)


def train_params(dvc_yaml: str) -> dict[str, list[str]]:
    """Each train stage's params deps (plain keys, or the keys of `{file: [keys]}` entries)."""
    stages = yaml.safe_load(dvc_yaml)["stages"]
    found: dict[str, list[str]] = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        if name.split("@")[0] == "train":
            entries = body.get("params", [])
            found[name] = [e for e in entries if isinstance(e, str)] + [
                key for e in entries if isinstance(e, dict) for keys in e.values() for key in keys
            ]
    return found


def test_no_train_stage_depends_on_the_system_metrics_interval() -> None:
    """Changing how often system metrics are sampled must not retrain every model (#10)."""
    found = train_params((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    assert found, "no train stage in dvc.yaml"
    for name, keys in found.items():
        assert "mlflow" not in keys, f"{name} depends on the whole mlflow section"
        assert "mlflow.system_metrics_interval_s" not in keys, name
