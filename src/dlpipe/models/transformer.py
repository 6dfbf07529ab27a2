"""A small pre-norm Transformer encoder for text classification.

Pad tokens are hidden from attention by a key mask and left out of the pooling, so the logits do
not depend on how much padding a batch carries. Attention is one `scaled_dot_product_attention`
call, which picks a fused kernel on GPU and CPU.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from dlpipe.config import PositiveInt, Probability
from dlpipe.errors import DlpipeError
from dlpipe.family import DataMeta, Family
from dlpipe.inputs.tokens import TOKENS, EmbeddingOptions, check_vocab, masked_mean, padding_mask


class TransformerConfig(EmbeddingOptions):
    """train.transformer.model in params.yaml."""

    d_model: PositiveInt = 128
    heads: PositiveInt = 4
    layers: Annotated[int, Field(ge=1, le=24)] = 2
    ff_dim: PositiveInt = 256
    dropout: Probability = 0.1
    positional: Literal["sinusoidal", "learned"] = "sinusoidal"
    pooling: Literal["mean", "cls"] = "mean"
    max_len: Annotated[int, Field(ge=8, le=8192)] = 512

    @model_validator(mode="after")
    def _heads_divide_d_model(self) -> TransformerConfig:
        if self.d_model % self.heads:
            raise ValueError(f"heads {self.heads} does not divide d_model {self.d_model}")
        return self


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need": sin/cos at geometric wavelengths."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2] = torch.sin(position * freq)
    pe[:, 1::2] = torch.cos(position * freq)[:, : d_model // 2]  # odd d_model has one cos fewer
    return pe


class SelfAttention(nn.Module):
    """Multi-head self-attention. No dropout on the attention weights: on the CPU it forces the
    unfused kernel to materialise a [B, H, T, T] mask (much slower); the residual dropout
    remains."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], key_mask bool [B, 1, 1, T] (True = real token) -> [B, T, D]."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """Pre-norm residual block: normalising inside the branch keeps deep stacks easy to train."""

    def __init__(self, d_model: int, heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, ff_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_dim, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x), key_mask))
        return x + self.dropout(self.ff(self.ln2(x)))


class TransformerClassifier(nn.Module):
    """Embedding + positions -> encoder blocks -> LayerNorm -> masked mean or CLS -> head."""

    sinusoid: torch.Tensor  # buffer, present when positional == "sinusoidal"

    def __init__(self, config: TransformerConfig, meta: DataMeta) -> None:
        super().__init__()
        check_vocab(meta)
        if meta.max_len > config.max_len:  # prepare kept the head and the tail of long texts:
            # a model keeping fewer tokens would cut the tail (often the verdict) off again
            raise DlpipeError(
                f"datasets.{meta.dataset or '<dataset>'}.max_len {meta.max_len} is above the "
                f"transformer's model.max_len {config.max_len}: the model would drop the end of "
                "every longer text; lower the first or raise the second"
            )
        d = config.d_model
        self.max_len, self.scale = config.max_len, math.sqrt(d)
        # Drawn with std 1/sqrt(d) and scaled by sqrt(d): tokens and positions start at unit scale.
        self.embedding = config.token_embedding(meta.vocab_size, d, std=d**-0.5)
        self.positions: nn.Embedding | None = None
        if config.positional == "learned":
            self.positions = nn.Embedding(config.max_len, d)
        else:  # not saved in checkpoints: it is a function of (max_len, d_model)
            self.register_buffer(
                "sinusoid", sinusoidal_positions(config.max_len, d), persistent=False
            )
        self.cls = nn.Parameter(torch.randn(1, 1, d)) if config.pooling == "cls" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(d, config.heads, config.ff_dim, config.dropout) for _ in range(config.layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, meta.num_classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens: long [B, T] padded on the right; lengths: long [B] -> logits [B, classes]."""
        tokens = tokens[:, : self.max_len]  # longer input is cut, never a crash
        B, T = tokens.shape
        lengths = lengths.to(tokens.device).clamp(min=1, max=T)
        pos = self.positions.weight[:T] if self.positions is not None else self.sinusoid[:T]
        x = self.embedding(tokens) * self.scale + pos
        if self.cls is not None:  # the CLS vector has no position: it is told apart by itself
            x = torch.cat([self.cls.expand(B, -1, -1), x], dim=1)
            lengths = lengths + 1
        mask = padding_mask(lengths, x.size(1))
        key_mask = mask[:, None, None, :]
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x, key_mask)
        x = self.ln_f(x)
        pooled = x[:, 0] if self.cls is not None else masked_mean(x, mask)
        return self.head(self.dropout(pooled))


FAMILY = Family(
    name="transformer",
    inputs=TOKENS,
    cpu_bf16=False,  # its narrow matmuls run faster in fp32 than under autocast on CPUs
    config=TransformerConfig,
    build=TransformerClassifier,
    smoke={
        "epochs": 2,
        "batch_size": 64,
        "lr": 0.002,
        "model": {
            "d_model": 32,
            "heads": 2,
            "layers": 1,
            "ff_dim": 64,
            "max_len": 128,
            "bigram_buckets": 16384,
        },
    },
)
