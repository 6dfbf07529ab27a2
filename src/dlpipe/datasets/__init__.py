"""Datasets: each `datasets.<name>` entry of params.yaml names a format and its settings.

A format is one module, `dlpipe/datasets/<format>.py`, ending in `FORMAT = DatasetFormat(...)`:
the schema of its settings, its input kind (images or token sequences), how its raw files are
fetched (the built-ins, MNIST and IMDB, download from canonical URLs with pinned sha256s; a
user's files are read where `path` says), and how they are prepared into `data/prepared/<name>`:
split arrays plus a `meta.json` holding everything a model and the serving path need (the class
names in order, the image size and channels or the vocabulary). `images` (a folder of labelled
pictures) and `table` (a CSV/TSV/JSONL/Parquet file of labelled texts) need no code at all.
Nothing outside a format's module names a dataset; the trainer reads only meta.json.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from dlpipe.config import Name, Params, Strict, validate_section
from dlpipe.errors import DlpipeError
from dlpipe.plugins import declaration

if TYPE_CHECKING:
    from dlpipe.config import FetchConfig
    from dlpipe.inputs import InputKind

# A split's size: a number of rows, or a share (0 < share < 1) of the rows it is taken from.
SplitSize = Annotated[int, Field(ge=1)] | Annotated[float, Field(gt=0.0, lt=1.0)]


class DatasetSettings(Strict):
    """What every format's settings share: where the raw files are, and the split sizes."""

    format: Name
    path: Annotated[str, Field(min_length=1)]
    val_size: SplitSize = 0.1  # held out of the training rows, stratified by class
    max_train: Annotated[int, Field(ge=0)] = 0  # 0 = all; >0 = a stratified sample (smoke)
    max_test: Annotated[int, Field(ge=0)] = 0


@dataclass(frozen=True)
class FetchContext:
    """What a format's `fetch` needs: the fetch settings, the data mirror and download cache,
    and (for tests) replacement sources by format name."""

    config: FetchConfig
    mirror: str | None
    cache_dir: Path
    sources: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetFormat:
    """One way of turning raw files into prepared splits. `prepare(settings, raw, out, seed)`
    writes `out/{train,val,test}.npz` and `out/meta.json` and returns the data card; `fetch`
    (built-ins only) writes the raw files into a folder and returns what it fetched."""

    name: str
    settings: type[DatasetSettings]
    inputs: InputKind
    prepare: Callable[[Any, Path, Path, int], dict[str, Any]]
    fetch: Callable[[Path, FetchContext], dict[str, Any]] | None = None
    smoke: Mapping[str, Any] = field(default_factory=dict)  # datasets.<name> overrides, smoke


def get_format(name: str) -> DatasetFormat:
    """The format declared by `dlpipe.datasets.<name>`; an unknown one is one DlpipeError line."""
    hint = " (use images or table for your own data)"
    return declaration("dlpipe.datasets", name, "FORMAT", DatasetFormat, "dataset format", hint)


def dataset_settings(params: Params, name: str) -> tuple[DatasetFormat, Any]:
    """`datasets.<name>`'s format and its settings, validated against the format's schema."""
    if name not in params.datasets:
        known = ", ".join(params.datasets) or "none"
        raise DlpipeError(f"unknown dataset {name!r}; params.yaml declares: {known}")
    entry = params.datasets[name]
    try:
        found = get_format(entry.format)
    except DlpipeError as err:
        raise DlpipeError(f"{params.source}: datasets.{name}.format: {err}") from None
    raw = entry.model_dump()
    settings = validate_section(found.settings, raw, ("datasets", name), params.source)
    return found, settings


def validate_datasets(params: Params) -> dict[str, Any]:
    """Every dataset's settings, validated (a stage validates only its own dataset's)."""
    return {name: dataset_settings(params, name)[1] for name in params.datasets}
