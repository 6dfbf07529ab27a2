"""The one way dlpipe finds a plug-in: model families (`dlpipe.models.<name>`) and dataset formats
(`dlpipe.datasets.<name>`) are modules found by name, each declaring one object."""

from __future__ import annotations

import importlib
from typing import TypeVar

from dlpipe.errors import DlpipeError

Declared = TypeVar("Declared")


def declaration(
    package: str, name: str, attribute: str, kind: type[Declared], what: str, hint: str = ""
) -> Declared:
    """`<package>.<name>.<attribute>`, which must be a `kind` named `name`; a missing module or
    declaration is one DlpipeError line (`what`: e.g. "model family"; `hint` ends an unknown
    name's line)."""
    module_name = f"{package}.{name}"
    path = f"src/{module_name.replace('.', '/')}.py"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise DlpipeError(f"unknown {what} {name!r}: there is no {path}{hint}") from None
    found = getattr(module, attribute, None)
    if not isinstance(found, kind) or getattr(found, "name", None) != name:
        raise DlpipeError(f"{path} declares no {attribute} named {name!r}")
    return found
