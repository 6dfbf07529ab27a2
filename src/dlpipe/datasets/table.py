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

import gzip
import io
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from dlpipe.data.splits import stratified_split, stratified_subset
from dlpipe.data.text import TextSettings, prepare_texts
from dlpipe.datasets import DatasetFormat, SplitSize
from dlpipe.errors import DlpipeError
from dlpipe.inputs.tokens import TOKENS

READERS = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")
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


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind not in READERS:
        raise DlpipeError(
            f"{path}: unknown table type {kind or '(none)'!r}; use {', '.join(READERS)}"
        )
    return kind


def _utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DlpipeError(
            f"{path}: line {line} is not UTF-8 text ({err.reason} at byte {err.start}); "
            "save the file as UTF-8"
        ) from None


def read_table(path: Path) -> pd.DataFrame:
    """A table file as a frame of strings and numbers; unreadable is one DlpipeError line."""
    if not path.is_file():
        raise DlpipeError(f"{path}: {'a folder' if path.exists() else 'no such file'}")
    kind = _kind(path)
    try:
        data = path.read_bytes()
        if path.suffix.lower() == ".gz":
            data = gzip.decompress(data)
        if kind == ".parquet":
            return pd.read_parquet(io.BytesIO(data))
        text = _utf8(data, path)
        if kind in (".jsonl", ".ndjson"):
            return pd.read_json(io.StringIO(text), lines=True, dtype=False)
        sep = "\t" if kind == ".tsv" else ","
        return pd.read_csv(io.StringIO(text), sep=sep, keep_default_na=False, na_values=[""])
    except DlpipeError:
        raise
    except Exception as err:  # pandas and pyarrow raise many kinds
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DlpipeError(f"{path}: cannot read as a {kind[1:]} table ({first})") from None


def _column(frame: pd.DataFrame, name: str, key: str, path: Path) -> pd.Series:
    if name not in frame.columns:
        columns = ", ".join(map(str, frame.columns)) or "none"
        raise DlpipeError(f"{path}: no column {name!r} (set {key}); its columns: {columns}")
    return frame[name]


def _rows(
    path: Path, settings: TableSettings, name: str, labelled: bool = True
) -> tuple[pd.DataFrame, list[str], int]:
    """(labelled rows: row_id, text, label; unlabeled texts; rows skipped for empty text)."""
    frame = read_table(path)
    if frame.empty:
        raise DlpipeError(f"{path}: no rows")
    texts = _column(frame, settings.text, f"datasets.{name}.text", path)
    empty = texts.isna() | texts.astype(str).str.strip().eq("")
    if empty.any() and settings.on_empty_text == "fail":
        first = int(np.flatnonzero(empty.to_numpy())[0]) + 1
        raise DlpipeError(
            f"{path}: {int(empty.sum())} row(s) have an empty {settings.text!r}, the first is "
            f"row {first}; remove them or set on_empty_text: skip"
        )
    ids = (
        _column(frame, settings.id, f"datasets.{name}.id", path).astype(str)
        if settings.id
        else pd.Series([f"{path.name}:{i + 1}" for i in range(len(frame))], index=frame.index)
    )
    if not labelled:
        return pd.DataFrame(), texts[~empty].astype(str).tolist(), int(empty.sum())
    labels = _column(frame, settings.label, f"datasets.{name}.label", path)
    missing = labels.isna() | labels.astype(str).str.strip().eq("")
    rows = pd.DataFrame(
        {"row_id": ids, "text": texts.astype(str), "label": labels}, index=frame.index
    )[~empty & ~missing]
    unlabeled = texts[~empty & missing].astype(str).tolist()
    return rows, unlabeled, int(empty.sum())


def _class_names(labels: pd.Series) -> list[Any]:
    values = labels.unique().tolist()
    numeric = all(isinstance(v, int | float | np.integer | np.floating) for v in values)
    return sorted(values) if numeric else sorted(values, key=str)


def prepare(settings: TableSettings, raw_dir: Path, out_dir: Path, seed: int) -> dict[str, Any]:
    """Read the table(s), split, prepare the texts; return the data card."""
    name = out_dir.name
    rows, unlabeled, skipped = _rows(raw_dir, settings, name)
    if rows.empty:
        raise DlpipeError(f"{raw_dir}: no labelled rows (column {settings.label!r} is empty)")
    if pd.api.types.is_float_dtype(rows["label"]) and (rows["label"] % 1 == 0).all():
        rows["label"] = rows["label"].astype(np.int64)  # integers, read as floats beside blanks
    classes = _class_names(rows["label"])
    if len(classes) < 2:
        raise DlpipeError(
            f"{raw_dir}: every row has label {classes[0]!r}; a classifier needs two or more classes"
        )
    index = {value: i for i, value in enumerate(classes)}
    label_names = [str(value) for value in classes]
    rows["label"] = rows["label"].map(index).astype(np.int64)
    if settings.test:
        test_path = Path(settings.test)
        test, more, dropped = _rows(test_path, settings, name)
        skipped += dropped
        unseen = sorted({str(v) for v in test["label"].unique()} - set(label_names))
        if unseen:
            raise DlpipeError(
                f"{test_path}: labels {unseen} never occur in {raw_dir}: no model can learn them"
            )
        lookup = {str(value): i for i, value in enumerate(classes)}
        test["label"] = test["label"].astype(str).map(lookup).astype(np.int64)
    else:
        labels = rows["label"].to_numpy()
        keep, held = stratified_split(
            labels, settings.test_size, seed, label_names, f"datasets.{name}.test_size"
        )
        rows, test = rows.iloc[keep], rows.iloc[held]
    if settings.unlabeled:
        _, more, dropped = _rows(Path(settings.unlabeled), settings, name, labelled=False)
        unlabeled += more
        skipped += dropped
    rows = rows.iloc[stratified_subset(rows["label"].to_numpy(), settings.max_train, seed)]
    test = test.iloc[stratified_subset(test["label"].to_numpy(), settings.max_test, seed)]
    keep, val = stratified_split(
        rows["label"].to_numpy(), settings.val_size, seed, label_names, f"datasets.{name}.val_size"
    )
    splits = {"train": rows.iloc[keep], "val": rows.iloc[val], "test": test}
    leaked = int(test["text"].isin(set(splits["train"]["text"])).sum())
    if leaked:
        print(
            f"prepare: warning: {leaked} test text(s) also occur in the training split: "
            "the test score overstates accuracy",
            file=sys.stderr,
        )
    if skipped:
        print(f"prepare: warning: skipped {skipped} row(s) with an empty text", file=sys.stderr)
    card = prepare_texts(splits, unlabeled, label_names, settings, out_dir, seed)
    return {**card, "skipped_rows": skipped, "test_texts_also_in_train": leaked}


FORMAT = DatasetFormat(
    name="table",
    settings=TableSettings,
    inputs=TOKENS,
    prepare=prepare,
    smoke={"max_train": 8000, "max_test": 2000, "vocab_size": 2000, "max_len": 128},
)
