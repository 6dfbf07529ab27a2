"""Format `table`: a table of labelled texts, no code needed.

    datasets:
      tickets: {format: table, path: data/own/tickets.csv, text: body, label: category}

CSV, TSV, JSONL or Parquet (optionally gzip-compressed), with a text column and a label column;
labels may be strings or integers, any number of classes (sorted: numbers by value, strings
alphabetically). Rows with no label are unlabeled texts: with `unlabeled` (another table with the
same text column) they feed the tokenizer and the word vectors, never the classifier. A `test`
table is the test split; without one, `test_size` rows are held out, seeded and stratified, and
`val_size` rows of the rest. Then the texts are prepared as every text format's are
(dlpipe.data.text).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from dlpipe.data.columns import batches, check_table
from dlpipe.data.splits import stratified_split, stratified_subset
from dlpipe.data.text import LabelledTexts, TextColumn, TextSettings, prepare_texts
from dlpipe.datasets import DatasetFormat, SplitSize
from dlpipe.errors import DlpipeError
from dlpipe.inputs.tokens import TOKENS

Column = Annotated[str, Field(min_length=1)]


class TableSettings(TextSettings):
    """datasets.<name> for format table."""

    format: Literal["table"]
    text: Column = "text"  # the column holding the texts
    label: Column = "label"  # the column holding their classes (empty: unlabeled)
    id: str = ""  # a column naming each row (default: file:row)
    test: str = ""  # a table of the test rows (same columns); default: held out of `path`
    test_size: SplitSize = 0.2
    unlabeled: str = ""  # a table of more texts (the `text` column) for the vocabulary
    on_empty_text: Literal["fail", "skip"] = "fail"  # skip: leave the row out, counted in the card


def _rows(
    path: Path, settings: TableSettings, name: str, labelled: bool = True
) -> tuple[pd.DataFrame, TextColumn, int]:
    """(labelled rows: row_id, raw label, a hash of the text and the row's position in the
    file; the unlabeled texts; the rows skipped for an empty text), from one pass over the
    table a batch at a time: its texts stay in the file until they are prepared."""
    check_table(path)
    keys = {settings.text: f"datasets.{name}.text"}
    if labelled:
        keys[settings.label] = f"datasets.{name}.label"
    if settings.id:
        keys[settings.id] = f"datasets.{name}.id"
    parts = []
    for batch in batches(path, list(keys), keys):
        texts = batch[settings.text]
        strings = texts.astype(str)
        parts.append(
            pd.DataFrame(
                {
                    "empty": (texts.isna() | strings.str.strip().eq("")).to_numpy(),
                    "hash": pd.util.hash_pandas_object(strings, index=False).to_numpy(),
                    "label": batch[settings.label] if labelled else None,
                    "row_id": batch[settings.id].astype(str) if settings.id else None,
                }
            )
        )
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if rows.empty:
        raise DlpipeError(f"{path}: no rows")
    rows["pos"] = np.arange(len(rows))
    if not settings.id:
        rows["row_id"] = [f"{path.name}:{i + 1}" for i in range(len(rows))]
    empty = rows["empty"].to_numpy()
    if empty.any() and settings.on_empty_text == "fail":
        raise DlpipeError(
            f"{path}: {int(empty.sum())} row(s) have an empty {settings.text!r}, the first is "
            f"row {int(np.flatnonzero(empty)[0]) + 1}; remove them or set on_empty_text: skip"
        )
    missing = (
        rows["label"].isna() | rows["label"].astype(str).str.strip().eq("")
        if labelled
        else pd.Series(True, index=rows.index)
    ).to_numpy()
    unlabeled = TextColumn.in_table(path, settings.text, np.flatnonzero(~empty & missing))
    labelled_rows = rows[~empty & ~missing].drop(columns="empty")
    labelled_rows["label"] = _typed(labelled_rows["label"])
    return labelled_rows, unlabeled, int(empty.sum())


def _typed(labels: pd.Series) -> pd.Series:
    """A label column's values, decided once over the whole column: numbers (integers where
    every one is whole) when every label is one, else strings."""
    numbers = pd.to_numeric(labels, errors="coerce")
    if len(labels) and numbers.notna().all():
        return numbers.astype(np.int64) if (numbers % 1 == 0).all() else numbers
    return labels.astype(str)


def _class_names(labels: pd.Series) -> list[Any]:
    values = labels.unique().tolist()
    numeric = all(isinstance(v, int | float | np.integer | np.floating) for v in values)
    return sorted(values) if numeric else sorted(values, key=str)


def _split(rows: pd.DataFrame, path: Path, settings: TableSettings) -> LabelledTexts:
    return LabelledTexts(
        rows["row_id"].to_numpy(dtype=str),
        rows["label"].to_numpy(dtype=np.int64),
        TextColumn.in_table(path, settings.text, rows["pos"].to_numpy()),
    )


def prepare(settings: TableSettings, raw_dir: Path, out_dir: Path, seed: int) -> dict[str, Any]:
    """Read the table(s), split, prepare the texts; return the data card."""
    name = out_dir.name
    rows, unlabeled_rows, skipped = _rows(raw_dir, settings, name)
    unlabeled = [unlabeled_rows]
    if rows.empty:
        raise DlpipeError(f"{raw_dir}: no labelled rows (column {settings.label!r} is empty)")
    classes = _class_names(rows["label"])
    if len(classes) < 2:
        raise DlpipeError(
            f"{raw_dir}: every row has label {classes[0]!r}; a classifier needs two or more classes"
        )
    label_names = [str(value) for value in classes]
    rows["label"] = rows["label"].map({value: i for i, value in enumerate(classes)})
    test_path = Path(settings.test) if settings.test else raw_dir
    if settings.test:
        test, more, dropped = _rows(test_path, settings, name)
        unlabeled.append(more)
        skipped += dropped
        unseen = sorted({str(v) for v in test["label"].unique()} - set(label_names))
        if unseen:
            raise DlpipeError(
                f"{test_path}: labels {unseen} never occur in {raw_dir}: no model can learn them"
            )
        lookup = {label: i for i, label in enumerate(label_names)}
        test["label"] = test["label"].astype(str).map(lookup)
    else:
        labels = rows["label"].to_numpy()
        keep, held = stratified_split(
            labels, settings.test_size, seed, label_names, f"datasets.{name}.test_size"
        )
        rows, test = rows.iloc[keep], rows.iloc[held]
    if settings.unlabeled:
        _, more, dropped = _rows(Path(settings.unlabeled), settings, name, labelled=False)
        unlabeled.append(more)
        skipped += dropped
    rows = rows.iloc[stratified_subset(rows["label"].to_numpy(), settings.max_train, seed)]
    test = test.iloc[stratified_subset(test["label"].to_numpy(), settings.max_test, seed)]
    keep, val = stratified_split(
        rows["label"].to_numpy(), settings.val_size, seed, label_names, f"datasets.{name}.val_size"
    )
    leaked = int(np.isin(test["hash"].to_numpy(), rows.iloc[keep]["hash"].to_numpy()).sum())
    if leaked:
        print(
            f"prepare: warning: {leaked} test text(s) also occur in the training split: "
            "the test score overstates accuracy",
            file=sys.stderr,
        )
    if skipped:
        print(f"prepare: warning: skipped {skipped} row(s) with an empty text", file=sys.stderr)
    splits = {
        "train": _split(rows.iloc[keep], raw_dir, settings),
        "val": _split(rows.iloc[val], raw_dir, settings),
        "test": _split(test, test_path, settings),
    }
    card = prepare_texts(splits, unlabeled, label_names, settings, out_dir, seed)
    return {**card, "skipped_rows": skipped, "test_texts_also_in_train": leaked}


FORMAT = DatasetFormat(
    name="table",
    settings=TableSettings,
    inputs=TOKENS,
    prepare=prepare,
    smoke={
        "max_train": 8000,
        "max_test": 2000,
        "max_unlabeled": 8000,
        "vocab_size": 2000,
        "max_len": 128,
    },
)
