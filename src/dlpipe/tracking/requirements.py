"""Logging a model with pinned requirements, without MLflow's slow scan of installed modules."""

from __future__ import annotations


def skip_module_scan() -> None:
    """Spare MLflow's scan of every installed file when it checks a logged model's pins.

    Before checking each pin against `importlib.metadata.version`, MLflow maps every module of
    every installed distribution (`packages_distributions()`: a stat of every installed file), a
    map it only reads for a package that has no metadata. Our pins are read from installed
    distributions' metadata, so that fallback never runs, and an empty map gives the same check:
    a pin that this environment does not satisfy still warns."""
    from mlflow.utils import requirements_utils

    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", {}) is None:  # not built yet
        requirements_utils._MODULES_TO_PACKAGES = {}  # type: ignore[assignment]
