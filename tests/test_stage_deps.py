"""Each DVC stage's `deps` name exactly the code it runs: every dlpipe module a stage imports is
a dependency (so editing it reruns the stage), and every source file it lists is imported (so
editing another family's module reruns nothing of this one)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import FAMILIES

ROOT = Path(__file__).resolve().parents[1]

# What a stage script imports at the top, plus what it imports inside functions on its way.
STAGE_IMPORTS = {
    "train": ["dlpipe.training.run"],
    "evaluate": [
        "dlpipe.evaluation.run",
        "dlpipe.serving",
        "dlpipe.registry",
        "dlpipe.evaluation.figures",
        "dlpipe.tracking",
    ],
    "baseline": ["dlpipe.baseline", "dlpipe.tracking"],
}


def imported_files(stage: str, family: str | None) -> set[str]:
    """Repo-relative source files of the dlpipe modules `stage`@`family` imports, measured in a
    fresh interpreter."""
    load_family = f"from dlpipe.family import get_family; get_family({family!r})\n"
    code = (
        "import importlib, json, sys\n"
        f"for name in {STAGE_IMPORTS[stage]!r}: importlib.import_module(name)\n"
        + (load_family if family else "")
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
    ("stage", "family"),
    [*((s, f) for s in ("train", "evaluate") for f in FAMILIES), ("baseline", None)],
)
def test_stage_deps_are_exactly_the_code_it_imports(stage: str, family: str | None) -> None:
    deps = declared_code(f"{stage}@{family}" if family else stage)
    imported = {f for f in imported_files(stage, family) if has_code(f)}
    imported.discard("dlpipe/__init__.py")  # the package's version string: no behaviour
    missing = sorted(f for f in imported if not covered(f, deps))
    assert not missing, f"{stage}@{family} imports {missing} but does not depend on them"
    unused = sorted(d for d in deps if not d.endswith("/") and d not in imported)
    assert not unused, f"{stage}@{family} depends on {unused} but never imports them"


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
