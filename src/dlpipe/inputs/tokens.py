"""Token sequences: int32 ids padded on the right in training, raw text when serving.

Batches are `(tokens [B, T], lengths [B])`; models hide pads with `padding_mask` and pool with
`masked_mean`, so padding never changes a result. Raw text goes through the prepare stage's own
tokenizer.json (its normaliser cleans text exactly as in training), is cut to the trained
`max_len` by the trained truncation policy, and padded with `pad_id`. Empty or whitespace-only
text is an error, not a guess.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from pydantic import Field

from dlpipe.config import Probability, Strict
from dlpipe.errors import DlpipeError
from dlpipe.inputs import InputKind
from dlpipe.io import read_user_file

if TYPE_CHECKING:
    from mlflow.types import Schema
    from tokenizers import Tokenizer
    from torch import nn

    from dlpipe.data.tensors import Split
    from dlpipe.family import DataMeta

TOKENIZER_FILE = "tokenizer.json"
WORD_VECTORS_FILE = "word_vectors.npy"
TEXTS_FILE = (
    "texts.parquet"  # every split's raw texts by row id: linear models and mistakes read it
)
PAD_ID, UNK_ID = 0, 1
MARKUP = r"(?i)<br\s*/?>"  # line breaks as HTML leaves them in scraped text
SHOWN = 50  # characters of a text printed by `dlpipe predict`


def clean_markup(text: str) -> str:
    """`<br />` and its variants as a space: what the tokenizer's normaliser does first."""
    return re.sub(MARKUP, " ", text)


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


def read_texts(prepared_dir: Path, split: str) -> dict[str, str]:
    """The raw texts of a prepared split by row id (checked against the folder's SHA256SUMS)."""
    import io

    import pandas as pd

    from dlpipe.integrity import read_verified

    path = prepared_dir / TEXTS_FILE
    rerun = f"dvc repro prepare@{prepared_dir.name}"
    if not path.is_file():
        raise DlpipeError(f"{path}: missing; run `{rerun}` first")
    frame = pd.read_parquet(io.BytesIO(read_verified(path, rerun)))
    rows = frame[frame["split"] == split]
    return dict(zip(rows["row_id"], rows["text"], strict=True))


def labelled_texts(prepared_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    """The raw texts of a prepared split in its row order, markup as spaces, with its labels:
    what the linear models read."""
    import io

    from dlpipe.integrity import read_verified

    path = prepared_dir / f"{split}.npz"
    rerun = f"dvc repro prepare@{prepared_dir.name}"
    if not path.is_file():
        raise DlpipeError(f"{path}: missing; run `{rerun}` first")
    with np.load(io.BytesIO(read_verified(path, rerun))) as arrays:
        if "row_id" not in arrays:  # written by a prepare stage older than the row ids
            raise DlpipeError(f"{path}: no row ids; rerun `{rerun}`")
        ids, labels = arrays["row_id"], arrays["labels"].astype(np.int64)
    texts = read_texts(prepared_dir, split)
    return [clean_markup(texts[row]) for row in ids], labels


def check_vocab(meta: DataMeta) -> None:
    """Fail with one readable line instead of an Embedding assertion deep inside torch."""
    if meta.vocab_size < 1 or not 0 <= meta.pad_id < meta.vocab_size:
        raise DlpipeError(
            f"text models need a vocabulary: got vocab_size={meta.vocab_size}, "
            f"pad_id={meta.pad_id} (pad_id must be in [0, vocab_size))"
        )


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Bool [B, max_len], True at the first `lengths[b]` positions of row b (the real tokens)."""
    return torch.arange(max_len, device=lengths.device) < lengths[:, None]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T, D] over the positions where mask [B, T] is True -> [B, D]."""
    weights = mask.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


BIGRAM_HASH = 2_654_435_761  # Knuth's multiplicative constant: spreads (previous, token) pairs


class TokenEmbedding(torch.nn.Module):
    """Token embeddings plus, when `bigram_buckets` > 0, an embedding of each token's pair with the
    one before it, hashed into that many rows (fastText's trick): a phrase such as "not good" is
    one lookup instead of something the layers above must learn. The bigram rows start at zero,
    so training starts from the plain token model. `word_dropout` drops whole tokens in training
    (their vectors zeroed, the rest scaled up): a regulariser that costs one draw per token, not
    one per vector element. With `pretrained`, training starts the token vectors from the
    prepare stage's word vectors (`load_vectors`) instead of noise."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        bigram_buckets: int = 0,
        std: float = 1.0,
        word_dropout: float = 0.0,
        pretrained: bool = False,
    ) -> None:
        super().__init__()
        self.word_dropout, self.std, self.pretrained = word_dropout, std, pretrained
        self.tokens = torch.nn.Embedding(vocab_size, dim)
        torch.nn.init.normal_(self.tokens.weight, std=std)
        self.bigrams = torch.nn.Embedding(bigram_buckets, dim) if bigram_buckets else None
        if self.bigrams is not None:
            torch.nn.init.zeros_(self.bigrams.weight)

    @torch.no_grad()
    def load_vectors(self, vectors: np.ndarray) -> None:
        """Start each token's vector from its first `dim` columns of `vectors` [vocab, >= 1],
        at this embedding's scale; columns beyond those given keep their random start."""
        rows, dim = self.tokens.weight.shape
        if vectors.ndim != 2 or vectors.shape[0] != rows:
            raise DlpipeError(
                f"word vectors of shape {vectors.shape} do not fit a {rows}-token vocabulary; "
                "rerun the prepare stage (dvc repro)"
            )
        given = min(dim, vectors.shape[1])
        self.tokens.weight[:, :given] = torch.from_numpy(vectors[:, :given]) * self.std

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: long [B, T] -> [B, T, dim]."""
        x: torch.Tensor = self.tokens(tokens)
        if self.bigrams is not None:
            previous = torch.nn.functional.pad(tokens[:, :-1], (1, 0), value=-1) + 1  # 0: none
            x = x + self.bigrams((previous * BIGRAM_HASH + tokens) % self.bigrams.num_embeddings)
        # [B, T, D] read as T channels of length D: dropout1d zeroes whole positions.
        return torch.nn.functional.dropout1d(x, self.word_dropout, self.training)


class EmbeddingOptions(Strict):
    """The TokenEmbedding knobs of every text family's model config (train.<name>.model)."""

    bigram_buckets: Annotated[int, Field(ge=0, le=2**24)] = 0  # 0: tokens only
    word_dropout: Probability = 0.0  # share of tokens dropped whole in training
    pretrained: bool = False  # start token vectors from the prepared word vectors

    def token_embedding(self, vocab_size: int, dim: int, std: float = 1.0) -> TokenEmbedding:
        return TokenEmbedding(
            vocab_size, dim, self.bigram_buckets, std, self.word_dropout, self.pretrained
        )


class TokensOnly(torch.nn.Module):
    """A text model callable with one int64 [B, T] tensor, as MLflow's pyfunc calls it: without
    `lengths`, each row's length is one past its last non-pad token (rows are padded on the
    right). Called with `(tokens, lengths)` it is the wrapped model."""

    def __init__(self, model: torch.nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model, self.pad_id = model, pad_id

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            positions = torch.arange(1, tokens.size(1) + 1, device=tokens.device)
            lengths = ((tokens != self.pad_id) * positions).amax(dim=1).clamp(min=1)
        out: torch.Tensor = self.model(tokens, lengths)
        return out


def load_tokenizer(path: Path) -> Tokenizer:
    """The prepare stage's tokenizer.json; missing or broken is a user-level error."""
    from tokenizers import Tokenizer

    if not path.is_file():
        raise DlpipeError(f"{path}: missing; run `dvc repro` first")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises plain Exception
        raise DlpipeError(f"{path}: not a tokenizer file ({str(err).splitlines()[0]})") from None


def check_text(text: Any, name: str = "text") -> str:
    """The text itself; None, non-text, empty, whitespace-only or unencodable -> DlpipeError."""
    if not isinstance(text, str):
        raise DlpipeError(f"{name}: expected text, got {type(text).__name__}")
    if not text.strip():
        raise DlpipeError(f"{name}: empty text")
    try:  # a lone surrogate, e.g. from a command line holding bytes that are not UTF-8
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DlpipeError(f"{name}: not valid Unicode text ({err.reason} at {err.start})") from None
    return text


def shorten(text: str, width: int = SHOWN) -> str:
    flat = re.sub(r"\s+", " ", text).strip()
    return flat if len(flat) <= width else flat[: width - 3] + "..."


class TokenInputs(InputKind):
    """Texts: one per input, tokenized with the tokenizer saved beside the model."""

    column = "text"
    serve_batch = 64
    mistakes_file = "mistakes.md"
    bundled = (TOKENIZER_FILE,)
    name = "tokens"
    row_ids = ("row_id",)  # not the tokens: another vocabulary encodes the same texts
    start_files = (WORD_VECTORS_FILE,)

    def initialize(self, model: nn.Module, prepared_dir: Path) -> None:
        """Load the prepared word vectors into every embedding built `pretrained`."""
        wanted = [m for m in model.modules() if isinstance(m, TokenEmbedding) and m.pretrained]
        if not wanted:
            return
        path = prepared_dir / WORD_VECTORS_FILE
        if not path.is_file():
            raise DlpipeError(
                f"{path}: missing, and the model is set `pretrained: true`; set the prepare "
                "stage's word_vectors_dim above 0 (then dvc repro), or pretrained: false"
            )
        vectors = np.load(path)
        for embedding in wanted:
            embedding.load_vectors(vectors)

    def pytorch_model(self, model: nn.Module, pad_id: int) -> nn.Module:
        return TokensOnly(model, pad_id)

    def tensor_schema(self) -> Schema:
        from mlflow.types import Schema, TensorSpec

        return Schema([TensorSpec(np.dtype(np.int64), (-1, -1))])  # any batch, any length

    def load_assets(self, model_dir: Path, info: dict[str, Any]) -> Tokenizer:
        tokenizer = load_tokenizer(model_dir / TOKENIZER_FILE)
        if tokenizer.get_vocab_size() != int(info["data"]["vocab_size"]):
            raise DlpipeError(
                f"{model_dir / TOKENIZER_FILE} has {tokenizer.get_vocab_size()} tokens but the "
                f"model was trained with {info['data']['vocab_size']}; rerun `dvc repro`"
            )
        return tokenizer

    def check(self, value: Any, name: str) -> str:
        return check_text(value, name)

    def encode(
        self, values: Sequence[Any], names: Sequence[str], info: dict[str, Any], assets: Any
    ) -> tuple[torch.Tensor, ...]:
        texts = [check_text(v, n) for v, n in zip(values, names, strict=True)]
        data = info["data"]
        max_len, policy, pad_id = int(data["max_len"]), str(data["truncation"]), data["pad_id"]
        encodings = assets.encode_batch(texts, add_special_tokens=False)
        kept = [truncate(list(e.ids), max_len, policy) for e in encodings]
        for ids, name in zip(kept, names, strict=True):
            if not ids:  # e.g. only "<br />": the normaliser leaves nothing to read
                raise DlpipeError(f"{name}: no words left after cleaning (only markup?)")
        lengths = torch.tensor([len(ids) for ids in kept])
        tokens = torch.full((len(kept), int(lengths.max())), int(pad_id), dtype=torch.long)
        for row, ids in enumerate(kept):
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens, lengths

    def read_cli_inputs(
        self, arguments: Sequence[str], file: str | None
    ) -> tuple[list[Any], list[str], list[str]]:
        texts = [check_text(text, f"text {i + 1}") for i, text in enumerate(arguments)]
        names = [f"text {i + 1}" for i in range(len(texts))]
        if file is not None:
            path = Path(file)
            try:
                content = read_user_file(path).decode("utf-8-sig")
            except UnicodeDecodeError as err:
                raise DlpipeError(
                    f"{path}: not UTF-8 text ({err.reason} at byte {err.start})"
                ) from None
            lines = [(n, line) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
            if not lines:
                raise DlpipeError(f"{path}: no texts (every line is blank)")
            texts += [line for _, line in lines]
            names += [f"{path}:{n}" for n, _ in lines]
        if not texts:
            raise DlpipeError("give at least one text, or --file with one text per line")
        return texts, names, [shorten(text) for text in texts]

    def example(self, info: dict[str, Any]) -> list[Any]:
        return ["A short example text.", "Another example, a little longer than the first."]

    def write_mistakes(
        self,
        dest: Path,
        split: Split,
        rows: np.ndarray,
        actual: list[str],
        predicted: list[str],
        confidence: np.ndarray,
        prepared_dir: Path,
    ) -> None:
        from dlpipe.evaluation.figures import mistakes_markdown

        with np.load(prepared_dir / "test.npz") as arrays:
            row_ids = arrays["row_id"][rows]
        texts = read_texts(prepared_dir, "test")
        table = [
            {
                "text": clean_markup(texts[row]),
                "actual": a,
                "predicted": p,
                "confidence": f"{c:.1%}",
            }
            for row, a, p, c in zip(row_ids, actual, predicted, confidence, strict=True)
        ]
        mistakes_markdown(table, dest)


TOKENS = TokenInputs()
