"""Table files (CSV, TSV, JSONL, Parquet; optionally gzip-compressed) read a record batch at a
time, so that a prepare stage holds one batch of a table, never the whole of it.

Every column comes as strings (JSONL: as its JSON values), so that a batch's types never depend
on which rows it holds; a reader decides once, over a whole column, what its values are.
"""

from __future__ import annotations

import codecs
import gzip
import io
from collections.abc import Generator, Iterator, Mapping, Sequence
from contextlib import closing
from pathlib import Path

import pandas as pd

from dlpipe.errors import DlpipeError

KINDS = (".csv", ".tsv", ".jsonl", ".ndjson", ".parquet")
BATCH_ROWS = 4096


def kind_of(path: Path) -> str:
    """The table type from the file name (`.csv`, `.parquet`, ...); unknown is one line."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind not in KINDS:
        raise DlpipeError(
            f"{path}: unknown table type {kind or '(none)'!r}; use {', '.join(KINDS)}"
        )
    return kind


def _open(path: Path) -> gzip.GzipFile | io.BufferedReader:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def check_table(path: Path) -> str:
    """The table's type, once the file is known to exist and, for text types, to be UTF-8 (a
    block at a time; the error names the first line that is not)."""
    if not path.is_file():
        raise DlpipeError(f"{path}: {'a folder' if path.exists() else 'no such file'}")
    kind = kind_of(path)
    if kind == ".parquet":
        return kind
    decoder = codecs.getincrementaldecoder("utf-8")()
    line = 1
    with _open(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(block)
            except UnicodeDecodeError as err:
                line += block[: max(0, err.start - pending)].count(b"\n")
                raise DlpipeError(
                    f"{path}: line {line} is not UTF-8 text ({err.reason}); save the file as UTF-8"
                ) from None
            line += block.count(b"\n")
    return kind


def batches(
    path: Path, columns: Sequence[str], keys: Mapping[str, str] | None = None
) -> Generator[pd.DataFrame, None, None]:
    """The table's `columns`, BATCH_ROWS rows at a time, in file order (check_table first).

    A missing column is one line naming the columns the table has (and the params key that
    names the column, from `keys`)."""
    kind = kind_of(path)
    try:
        if kind == ".parquet":
            yield from _parquet_batches(path, columns, keys or {})
            return
        with _open(path) as handle:
            if kind in (".jsonl", ".ndjson"):
                reader = pd.read_json(handle, lines=True, dtype=False, chunksize=BATCH_ROWS)
            else:
                reader = pd.read_csv(
                    handle,
                    sep="\t" if kind == ".tsv" else ",",
                    dtype=str,
                    keep_default_na=False,
                    na_values=[""],
                    encoding="utf-8-sig",
                    chunksize=BATCH_ROWS,
                )
            with reader:
                for batch in reader:
                    _require(batch.columns, columns, keys or {}, path)
                    yield batch[list(columns)].reset_index(drop=True)
    except DlpipeError:
        raise
    except Exception as err:  # pandas and pyarrow raise many kinds
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DlpipeError(f"{path}: cannot read as a {kind[1:]} table ({first})") from None


def check_columns(
    path: Path, columns: Sequence[str], keys: Mapping[str, str] | None = None
) -> None:
    """Fail now, not in the middle of a stream, when a column is missing (reads one batch)."""
    with closing(batches(path, columns, keys)) as reader:
        next(reader, None)


def _parquet_batches(
    path: Path, columns: Sequence[str], keys: Mapping[str, str]
) -> Iterator[pd.DataFrame]:
    import pyarrow.parquet as pq

    with _open(path) as handle, pq.ParquetFile(handle) as table:
        _require(table.schema_arrow.names, columns, keys, path)
        for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=list(columns)):
            yield batch.to_pandas()


def _require(
    have: Sequence[str], wanted: Sequence[str], keys: Mapping[str, str], path: Path
) -> None:
    for name in wanted:
        if name not in have:
            columns = ", ".join(map(str, have)) or "none"
            key = f" (set {keys[name]})" if name in keys else ""
            raise DlpipeError(f"{path}: no column {name!r}{key}; its columns: {columns}")
