"""IMDB: normalise, learn a subword vocabulary on the training split, encode to int32 token ids,
and learn token vectors from co-occurrences in the same reviews (no labels).

The normaliser lives inside `tokenizer.json`, so any text given to the saved tokenizer later (the
CLI, a served model) is cleaned exactly as the training data was.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from dlpipe.config import PrepareImdbConfig
from dlpipe.data.splits import class_counts, stratified_split, stratified_subset
from dlpipe.errors import DlpipeError
from dlpipe.integrity import remove_manifest, write_manifest_of
from dlpipe.io import atomic_path, write_json_atomic, write_npz_atomic

if TYPE_CHECKING:
    import scipy.sparse as sp

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1
NUM_CLASSES = 2
LABEL_NAMES = ("negative", "positive")
WORD_VECTORS_FILE = "word_vectors.npy"


def new_tokenizer(config: PrepareImdbConfig) -> tuple[Tokenizer, trainers.Trainer]:
    """An untrained tokenizer (normaliser + pre-tokeniser + subword model) and its trainer."""
    steps = [normalizers.NFC(), normalizers.Replace(Regex(r"(?i)<br\s*/?>"), " ")]
    if config.lowercase:
        steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()]
    special = [PAD, UNK]
    trainer: trainers.Trainer
    if config.tokenizer == "bpe":
        # No end-of-word suffix: with one the trainer numbers tokens differently on every run.
        # So decode() loses word boundaries; nothing decodes (reports show the raw reviews).
        tokenizer = Tokenizer(models.BPE(unk_token=UNK))
        tokenizer.decoder = decoders.BPEDecoder()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=special,
            show_progress=False,
        )
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
        tokenizer.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            special_tokens=special,
            show_progress=False,
        )
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer, trainer


def train_tokenizer(texts: Iterable[str], config: PrepareImdbConfig) -> Tokenizer:
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


def truncate(ids: list[int], max_len: int, policy: str) -> list[int]:
    """Keep `max_len` ids: the start, the end, or a quarter from the start and the rest from the end

    Reviews tend to open with context and close with the verdict, so head+tail keeps both.
    """
    if len(ids) <= max_len:
        return ids
    if policy == "head":
        return ids[:max_len]
    if policy == "tail":
        return ids[-max_len:]
    head = max_len // 4
    return ids[:head] + ids[len(ids) - (max_len - head) :]


def encode(
    tokenizer: Tokenizer, texts: list[str], max_len: int, policy: str
) -> dict[str, np.ndarray]:
    """Token ids padded with PAD_ID to the longest kept review, lengths, and full lengths."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    full_lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int32, count=len(texts))
    kept = [truncate(e.ids, max_len, policy) for e in encodings]
    lengths = np.fromiter((len(ids) for ids in kept), dtype=np.int32, count=len(texts))
    tokens = np.full((len(texts), max(1, int(lengths.max(initial=1)))), PAD_ID, dtype=np.int32)
    for row, ids in enumerate(kept):
        tokens[row, : len(ids)] = ids
    return {"tokens": tokens, "lengths": lengths, "full_lengths": full_lengths}


def cooccurrence(docs: Sequence[np.ndarray], vocab_size: int, window: int) -> sp.csr_matrix:
    """Symmetric counts of the token pairs at most `window` apart within a document, each weighted
    1/distance (as GloVe does): float32 [vocab, vocab]."""
    import scipy.sparse as sp

    lengths = np.fromiter((len(doc) for doc in docs), dtype=np.int64, count=len(docs))
    tokens = np.concatenate([np.zeros(0, np.int64), *(np.asarray(doc, np.int64) for doc in docs)])
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
    docs: Sequence[np.ndarray], vocab_size: int, dim: int, window: int, seed: int
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


def _split_card(encoded: dict[str, np.ndarray], labels: np.ndarray, max_len: int) -> dict[str, Any]:
    full = encoded["full_lengths"]
    tokens, lengths = encoded["tokens"], encoded["lengths"]
    real = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    unk = int(((tokens == UNK_ID) & real).sum())
    return {
        "count": len(labels),
        "class_counts": class_counts(labels, NUM_CLASSES),
        "length_percentiles": {
            f"p{p}": int(np.percentile(full, p)) if len(full) else 0
            for p in (5, 25, 50, 75, 95, 99)
        },
        "mean_length": round(float(full.mean()), 1) if len(full) else 0.0,
        "truncation_rate": round(float((full > max_len).mean()), 4) if len(full) else 0.0,
        "unk_rate": round(unk / max(1, int(lengths.sum())), 6),
    }


def read_raw(raw_dir: Path, split: str) -> pd.DataFrame:
    path = raw_dir / f"{split}.parquet"
    if not path.exists():
        raise DlpipeError(f"{path}: missing; run the fetch stage first (dvc repro fetch)")
    frame = pd.read_parquet(path)
    missing = {"review_id", "label", "text"} - set(frame.columns)
    if missing:
        raise DlpipeError(f"{path}: missing columns {sorted(missing)}")
    return frame


def prepare(
    raw_dir: Path, out_dir: Path, card_path: Path, config: PrepareImdbConfig, seed: int
) -> dict[str, Any]:
    """Split train into train/val, train the tokenizer on train, encode train/val/test."""
    train_all, test = read_raw(raw_dir, "train"), read_raw(raw_dir, "test")
    train_all = train_all.iloc[
        stratified_subset(train_all["label"].to_numpy(), config.max_train, seed)
    ]
    test = test.iloc[stratified_subset(test["label"].to_numpy(), config.max_test, seed)]
    for name, frame in (("train", train_all), ("test", test)):
        if not frame["label"].isin([0, 1]).all():
            raise DlpipeError(f"{raw_dir / name}.parquet: labels must be 0 or 1")
    keep, val = stratified_split(train_all["label"].to_numpy(), config.val_size, seed)
    frames = {"train": train_all.iloc[keep], "val": train_all.iloc[val], "test": test}

    corpus = list(frames["train"]["text"])
    if config.train_on_unsup:
        corpus += list(read_raw(raw_dir, "unsup")["text"])
    tokenizer = train_tokenizer(corpus, config)
    vectors = None
    if config.word_vectors_dim:  # from the tokenizer's texts: the training split (+ unlabelled)
        docs = [np.asarray(e.ids) for e in tokenizer.encode_batch(corpus, add_special_tokens=False)]
        vectors = word_vectors(
            docs,
            tokenizer.get_vocab_size(),
            config.word_vectors_dim,
            config.word_vectors_window,
            seed,
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_manifest(out_dir)  # until the new one is written, the folder is incomplete
    card: dict[str, Any] = {
        "num_classes": NUM_CLASSES,
        "tokenizer": config.tokenizer,
        "vocab_size": tokenizer.get_vocab_size(),
        "max_len": config.max_len,
        "truncation": config.truncation,
    }
    for name, frame in frames.items():
        labels = frame["label"].to_numpy(dtype=np.int64)
        encoded = encode(tokenizer, list(frame["text"]), config.max_len, config.truncation)
        write_npz_atomic(
            out_dir / f"{name}.npz",
            tokens=encoded["tokens"],
            lengths=encoded["lengths"],
            labels=labels,
            review_id=frame["review_id"].to_numpy(dtype=str),
        )
        card[name] = _split_card(encoded, labels, config.max_len)
    with atomic_path(out_dir / "tokenizer.json") as tmp:
        tokenizer.save(str(tmp))
    written = [*(f"{name}.npz" for name in frames), "tokenizer.json", "meta.json"]
    (out_dir / WORD_VECTORS_FILE).unlink(missing_ok=True)
    if vectors is not None:
        with atomic_path(out_dir / WORD_VECTORS_FILE) as tmp, open(tmp, "wb") as handle:
            np.save(handle, vectors)
        written.append(WORD_VECTORS_FILE)
        card["word_vectors"] = {
            "dim": config.word_vectors_dim,
            "window": config.word_vectors_window,
            "reviews": len(corpus),
            "unlabeled": config.train_on_unsup,
        }
    meta = {
        "num_classes": NUM_CLASSES,
        "label_names": list(LABEL_NAMES),
        "vocab_size": tokenizer.get_vocab_size(),
        "pad_id": PAD_ID,
        "max_len": config.max_len,
        "truncation": config.truncation,
    }
    write_json_atomic(out_dir / "meta.json", meta)
    write_manifest_of(out_dir, written)
    write_json_atomic(card_path, card)
    return card
