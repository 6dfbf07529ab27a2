"""Labelled texts -> prepared token splits: normalise, learn a subword vocabulary on the training
split (and any unlabeled text), encode to int32 token ids, and learn token vectors from
co-occurrences in the same texts (no labels). Every text format (a built-in, a user's table) ends
here.

The normaliser lives inside `tokenizer.json`, so any text given to the saved tokenizer later (the
CLI, a served model) is cleaned exactly as the training data was.

Texts stream: a split's texts are read from their table a record batch at a time whenever they
are needed (learning the vocabulary, counting co-occurrences, encoding), and the token arrays are
written a block of rows at a time, so memory holds a few batches, not the corpus.
"""

from __future__ import annotations

import functools
import itertools
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dlpipe.data.columns import batches
from dlpipe.data.splits import class_counts
from dlpipe.datasets import DatasetSettings
from dlpipe.errors import DlpipeError
from dlpipe.inputs.tokens import (
    MARKUP,
    PAD_ID,
    TEXTS_FILE,
    TOKENIZER_FILE,
    UNK_ID,
    WORD_VECTORS_FILE,
    truncate,
)
from dlpipe.integrity import remove_manifest, write_manifest_of
from dlpipe.io import Blocks, atomic_path, write_json_atomic, write_npz_atomic

if TYPE_CHECKING:
    import scipy.sparse as sp

PAD, UNK = "[PAD]", "[UNK]"


class TextSettings(DatasetSettings):
    """How texts become token ids: the settings of every text format."""

    tokenizer: Literal["bpe", "wordpiece"] = "bpe"
    vocab_size: Annotated[int, Field(ge=100, le=65536)] = 32000
    min_frequency: Annotated[int, Field(ge=1)] = 2
    lowercase: bool = True
    max_len: Annotated[int, Field(ge=8, le=4096)] = 512  # tokens kept per text
    truncation: Literal["head", "tail", "head+tail"] = "head+tail"
    word_vectors_dim: Annotated[int, Field(ge=0, le=1024)] = 128  # PPMI-SVD vectors; 0: none
    word_vectors_window: Annotated[int, Field(ge=1, le=20)] = 5  # tokens either side that count
    max_unlabeled: Annotated[int, Field(ge=0)] = 0  # 0 = all; >0 = a random sample (smoke)


@dataclass(frozen=True)
class TextColumn:
    """Some rows of a table's text column, read again a record batch at a time each time they
    are iterated: `read` gives every row's text batch by batch, in file order; `rows` are the
    positions kept, sorted."""

    read: Callable[[], Iterator[Sequence[str]]]
    rows: np.ndarray

    @classmethod
    def in_table(cls, path: Path, column: str, rows: np.ndarray) -> TextColumn:
        """Rows `rows` of the column `column` of the table file `path`."""

        def read() -> Iterator[Sequence[str]]:
            for batch in batches(path, [column]):
                yield batch[column].astype(str).tolist()

        return cls(read, np.asarray(rows, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> TextColumn:
        """The rows at `positions` (sorted) of these rows."""
        return replace(self, rows=self.rows[positions])

    def __iter__(self) -> Iterator[str]:
        start = 0
        for texts in self.read():
            end = start + len(texts)
            first, last = np.searchsorted(self.rows, (start, end))
            for row in self.rows[first:last]:
                yield texts[row - start]
            start = end


@dataclass(frozen=True)
class LabelledTexts:
    """One split's rows: their ids, their integer labels and their texts."""

    row_id: np.ndarray
    labels: np.ndarray
    texts: TextColumn

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, positions: np.ndarray) -> LabelledTexts:
        """The rows at `positions` (sorted)."""
        return LabelledTexts(
            self.row_id[positions], self.labels[positions], self.texts.take(positions)
        )


def new_tokenizer(config: TextSettings) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer (normaliser + pre-tokeniser + subword model) and its trainer."""
    steps = [normalizers.NFC(), normalizers.Replace(Regex(MARKUP), " ")]
    if config.lowercase:
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    # No end-of-word suffix for BPE: with one the trainer numbers tokens differently on every
    # run. So decode() loses word boundaries; nothing decodes (reports show the raw texts).
    model, decoder, trainer_class = {
        "bpe": (models.BPE, decoders.BPEDecoder, trainers.BpeTrainer),
        "wordpiece": (models.WordPiece, decoders.WordPiece, trainers.WordPieceTrainer),
    }[config.tokenizer]
    tokenizer = Tokenizer(model(unk_token=UNK))
    tokenizer.decoder = decoder()
    trainer = trainer_class(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[PAD, UNK],
        show_progress=False,
    )
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer, trainer


def train_tokenizer(texts: Iterable[str], config: TextSettings) -> Tokenizer:
    tokenizer, trainer = new_tokenizer(config)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if config.tokenizer == "wordpiece":
        _renumber_wordpiece(tokenizer)
    if tokenizer.token_to_id(PAD) != PAD_ID or tokenizer.token_to_id(UNK) != UNK_ID:
        raise DlpipeError("tokenizer special tokens did not get ids 0 ([PAD]) and 1 ([UNK])")
    return tokenizer


def _renumber_wordpiece(tokenizer: Tokenizer) -> None:
    """Give a trained WordPiece vocabulary ids that do not change from run to run.

    WordPieceTrainer numbers its `##` pieces in hash-map order (huggingface/tokenizers#1794), so
    the same texts gave different ids, and a different tokenizer.json, on every run. Number the
    pieces the special tokens first, then the rest sorted. (Where merge counts tie, as in tiny
    corpora, the trainer can still pick different pieces; real reviews give the same ones.)
    """
    model = tokenizer.model
    assert isinstance(model, models.WordPiece)
    pieces = sorted(set(tokenizer.get_vocab(with_added_tokens=False)) - {PAD, UNK})
    tokenizer.model = models.WordPiece(
        {piece: i for i, piece in enumerate([PAD, UNK, *pieces])},
        unk_token=model.unk_token,
        continuing_subword_prefix=model.continuing_subword_prefix,
        max_input_chars_per_word=model.max_input_chars_per_word,
    )


ENCODE_CHUNK = 4096  # texts tokenized at once: the tokenizer's Encoding objects stay this few


def token_ids(tokenizer: Tokenizer, texts: Iterable[str]) -> Iterator[np.ndarray]:
    """Each text's int32 token ids, tokenized a chunk at a time (in parallel within a chunk), so
    memory holds one chunk's Encoding objects, not the whole corpus's."""
    for chunk in _chunks(texts, ENCODE_CHUNK):
        yield from _encode_chunk(tokenizer, chunk)


def _chunks(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _encode_chunk(tokenizer: Tokenizer, texts: list[str]) -> Iterator[np.ndarray]:
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        yield np.asarray(encoding.ids, dtype=np.int32)


@dataclass
class _Spilled:
    """A split's kept token ids, written one after another to a spill file, and their lengths."""

    lengths: np.ndarray
    full_lengths: np.ndarray
    unk: int

    @property
    def width(self) -> int:
        return max(1, int(self.lengths.max(initial=1)))

    def blocks(self, spill: IO[bytes]) -> Iterator[np.ndarray]:
        """The padded rows [rows, width], ENCODE_CHUNK rows a block, read back from the spill."""
        spill.seek(0)
        columns = np.arange(self.width)
        for start in range(0, len(self.lengths), ENCODE_CHUNK):
            lengths = self.lengths[start : start + ENCODE_CHUNK]
            ids = np.frombuffer(spill.read(4 * int(lengths.sum())), dtype=np.int32)
            block = np.full((len(lengths), self.width), PAD_ID, dtype=np.int32)
            block[columns[None, :] < lengths[:, None]] = ids  # row by row, left to right
            yield block


def _spill(
    tokenizer: Tokenizer,
    texts: Iterable[str],
    count: int,
    max_len: int,
    policy: str,
    spill: IO[bytes],
    each_chunk: Callable[[int, list[str]], None] | None = None,
) -> _Spilled:
    """Tokenize `count` texts a chunk at a time, writing each one's kept ids to `spill`
    (`each_chunk(first row, texts)` sees every chunk of texts)."""
    lengths = np.zeros(count, dtype=np.int32)
    full_lengths = np.zeros(count, dtype=np.int32)
    unk, row = 0, 0
    for chunk in _chunks(texts, ENCODE_CHUNK):
        if each_chunk is not None:
            each_chunk(row, chunk)
        kept = []
        for ids in _encode_chunk(tokenizer, chunk):
            full_lengths[row] = len(ids)
            kept.append(np.asarray(truncate(ids.tolist(), max_len, policy), dtype=np.int32))
            lengths[row] = len(kept[-1])
            row += 1
        flat = np.concatenate([np.zeros(0, np.int32), *kept])
        unk += int((flat == UNK_ID).sum())
        spill.write(flat.tobytes())
    if row != count:
        raise DlpipeError(f"expected {count} texts, read {row}: did a table change while read?")
    return _Spilled(lengths, full_lengths, unk)


COUNT_CHUNK_TOKENS = 1 << 22  # tokens whose pairs are counted at once (~4M: a few hundred MB)


def cooccurrence(docs: Iterable[np.ndarray], vocab_size: int, window: int) -> sp.csr_matrix:
    """Symmetric counts of the token pairs at most `window` apart within a document, each weighted
    1/distance (as GloVe does): float32 [vocab, vocab]. Documents are counted a few million tokens
    at a time, so memory holds the counts and one chunk's pairs, however many documents there
    are."""
    import scipy.sparse as sp

    counts = sp.csr_matrix((vocab_size, vocab_size), dtype=np.float32)
    chunk: list[np.ndarray] = []
    size = 0
    for doc in docs:
        chunk.append(np.asarray(doc, np.int64))
        size += len(doc)
        if size >= COUNT_CHUNK_TOKENS:
            counts = counts + _pair_counts(chunk, vocab_size, window)
            chunk, size = [], 0
    if chunk:
        counts = counts + _pair_counts(chunk, vocab_size, window)
    return counts


def _pair_counts(docs: list[np.ndarray], vocab_size: int, window: int) -> sp.csr_matrix:
    import scipy.sparse as sp

    lengths = np.fromiter((len(doc) for doc in docs), dtype=np.int64, count=len(docs))
    tokens = np.concatenate([np.zeros(0, np.int64), *docs])
    doc_of = np.repeat(np.arange(len(docs)), lengths)
    counts = sp.csr_matrix((vocab_size, vocab_size), dtype=np.float32)
    for distance in range(1, window + 1):
        same_doc = doc_of[:-distance] == doc_of[distance:]
        left, right = tokens[:-distance][same_doc], tokens[distance:][same_doc]
        weights = np.full(left.size, 1.0 / distance, dtype=np.float32)
        pairs = sp.csr_matrix((weights, (left, right)), shape=(vocab_size, vocab_size))
        counts = counts + pairs + pairs.T
    return counts


def ppmi(counts: sp.csr_matrix, context_power: float = 0.75) -> sp.csr_matrix:
    """max(0, log p(w, c) / (p(w) p(c)^a)): positive pointwise mutual information, the context
    counts raised to `context_power` (else rare contexts get inflated scores)."""
    import scipy.sparse as sp

    coo = counts.tocoo()
    total = float(coo.data.sum())
    words = np.asarray(counts.sum(axis=1)).ravel()
    contexts = words**context_power
    contexts /= contexts.sum()
    scores = np.log(coo.data / total) - np.log(words[coo.row] / total) - np.log(contexts[coo.col])
    keep = scores > 0
    values = scores[keep].astype(np.float32)
    return sp.csr_matrix((values, (coo.row[keep], coo.col[keep])), shape=counts.shape)


def word_vectors(
    docs: Iterable[np.ndarray], vocab_size: int, dim: int, window: int, seed: int
) -> np.ndarray:
    """Float32 [vocab_size, dim]: the PPMI matrix's top `dim` singular directions (Levy, Goldberg
    and Dagan 2015 found them on par with word2vec's skip-gram; here they take seconds, not a
    training). Columns come in order of importance, so a family's first d columns are the best
    d-dimensional vectors; each has unit standard deviation. A token never seen, and columns
    past the vocabulary's rank, are zero."""
    from sklearn.utils.extmath import randomized_svd

    scores = ppmi(cooccurrence(docs, vocab_size, window))
    vectors = np.zeros((vocab_size, dim), dtype=np.float32)
    rank = min(dim, vocab_size - 1, scores.nnz)
    if rank < 1:
        return vectors
    left, singular, _ = randomized_svd(scores, rank, n_iter=5, random_state=seed)
    found = left * np.sqrt(singular)
    std = found.std(axis=0)
    vectors[:, :rank] = (found - found.mean(axis=0)) / np.where(std > 0, std, 1.0)
    vectors[np.asarray(scores.sum(axis=1)).ravel() == 0] = 0.0
    return vectors


def _split_card(
    encoded: _Spilled, labels: np.ndarray, max_len: int, num_classes: int
) -> dict[str, Any]:
    full, lengths = encoded.full_lengths, encoded.lengths
    return {
        "count": len(labels),
        "class_counts": class_counts(labels, num_classes),
        "length_percentiles": {
            f"p{p}": int(np.percentile(full, p)) if len(full) else 0
            for p in (5, 25, 50, 75, 95, 99)
        },
        "mean_length": round(float(full.mean()), 1) if len(full) else 0.0,
        "truncation_rate": round(float((full > max_len).mean()), 4) if len(full) else 0.0,
        "unk_rate": round(encoded.unk / max(1, int(lengths.sum())), 6),
    }


TEXTS_GROUP_ROWS = 1 << 16  # rows of texts.parquet written at once (one Parquet row group)


class _TextsWriter:
    """texts.parquet (`row_id`, `text`, `split`: every split's raw texts), written a row group
    at a time as the splits are encoded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending: list[pd.DataFrame] = []
        self.pending_rows = 0
        self.writer: Any = None

    def add(self, split: str, row_ids: np.ndarray, first: int, texts: list[str]) -> None:
        """Rows first.. of `split` (whose ids are `row_ids`) have `texts`."""
        ids = row_ids[first : first + len(texts)]
        self.pending.append(pd.DataFrame({"row_id": ids, "text": texts, "split": split}))
        self.pending_rows += len(texts)
        if self.pending_rows >= TEXTS_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.pending:
            return
        table = pa.Table.from_pandas(pd.concat(self.pending).astype(str), preserve_index=False)
        self.pending, self.pending_rows = [], 0
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema, compression="snappy")
        self.writer.write_table(table)

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def sample_texts(columns: Sequence[TextColumn], limit: int, seed: int) -> list[TextColumn]:
    """At most `limit` of the texts of `columns` (0: all), drawn at random, in file order."""
    sizes = [len(column) for column in columns]
    if not limit or sum(sizes) <= limit:
        return list(columns)
    chosen = np.sort(np.random.default_rng(seed).choice(sum(sizes), limit, replace=False))
    starts = np.cumsum([0, *sizes])
    return [
        column.take(chosen[(chosen >= start) & (chosen < end)] - start)
        for column, start, end in zip(columns, starts[:-1], starts[1:], strict=True)
    ]


def prepare_texts(
    splits: Mapping[str, LabelledTexts],
    unlabeled: Sequence[TextColumn],
    label_names: Sequence[str],
    config: TextSettings,
    out_dir: Path,
    seed: int,
) -> dict[str, Any]:
    """Write the prepared text dataset: `splits` are the train, val and test rows, `unlabeled`
    more texts for the vocabulary and the word vectors. The tokenizer and the vectors learn from
    the training split and `unlabeled` only, never validation or test text. Returns the data
    card."""
    unlabeled = sample_texts(unlabeled, config.max_unlabeled, seed)

    def corpus() -> Iterator[str]:
        return itertools.chain(splits["train"].texts, *unlabeled)

    tokenizer = train_tokenizer(corpus(), config)
    vectors = None
    if config.word_vectors_dim:  # from the tokenizer's texts: the training split (+ unlabeled)
        vectors = word_vectors(
            token_ids(tokenizer, corpus()),
            tokenizer.get_vocab_size(),
            config.word_vectors_dim,
            config.word_vectors_window,
            seed,
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_manifest(out_dir)  # until the new one is written, the folder is incomplete
    num_classes = len(label_names)
    card: dict[str, Any] = {
        "num_classes": num_classes,
        "label_names": list(label_names),
        "tokenizer": config.tokenizer,
        "vocab_size": tokenizer.get_vocab_size(),
        "max_len": config.max_len,
        "truncation": config.truncation,
    }
    with atomic_path(out_dir / TEXTS_FILE) as texts_path:
        texts = _TextsWriter(texts_path)
        for name, split in splits.items():
            with tempfile.TemporaryFile(dir=out_dir) as spill:
                encoded = _spill(
                    tokenizer,
                    split.texts,
                    len(split),
                    config.max_len,
                    config.truncation,
                    spill,
                    functools.partial(texts.add, name, split.row_id),
                )
                tokens = Blocks(
                    (len(split), encoded.width), np.dtype(np.int32), encoded.blocks(spill)
                )
                write_npz_atomic(
                    out_dir / f"{name}.npz",
                    tokens=tokens,
                    lengths=encoded.lengths,
                    labels=split.labels.astype(np.int64),
                    row_id=np.asarray(split.row_id, dtype=str),
                )
            card[name] = _split_card(encoded, split.labels, config.max_len, num_classes)
        texts.close()
    with atomic_path(out_dir / TOKENIZER_FILE) as tmp:
        tokenizer.save(str(tmp))
    written = [*(f"{name}.npz" for name in splits), TEXTS_FILE, TOKENIZER_FILE, "meta.json"]
    (out_dir / WORD_VECTORS_FILE).unlink(missing_ok=True)
    if vectors is not None:
        with atomic_path(out_dir / WORD_VECTORS_FILE) as tmp, open(tmp, "wb") as handle:
            np.save(handle, vectors)
        written.append(WORD_VECTORS_FILE)
        card["word_vectors"] = {
            "dim": config.word_vectors_dim,
            "window": config.word_vectors_window,
            "texts": len(splits["train"]) + sum(map(len, unlabeled)),
            "unlabeled": sum(map(len, unlabeled)),
        }
    meta = {
        "inputs": "tokens",
        "dataset": out_dir.name,
        "num_classes": num_classes,
        "label_names": list(label_names),
        "vocab_size": tokenizer.get_vocab_size(),
        "pad_id": PAD_ID,
        "max_len": config.max_len,
        "truncation": config.truncation,
    }
    write_json_atomic(out_dir / "meta.json", meta)
    write_manifest_of(out_dir, written)
    return card
