"""A recurrent text classifier: embedding -> (bi)LSTM/GRU -> pooling -> linear head; with
`embedding_shortcut`, the head also reads the mean of the embeddings (the Transformer's residual
stream carries them to its pooling the same way).

Padding never changes the result: batches are padded on the right, so a forward direction reads
each review's real tokens before any pad, and the backward direction reads every review reversed
within its own length (`reverse_within_length`). That gives the same outputs as a packed sequence,
but runs on padded tensors: on the CPU, PyTorch's packed RNN backward materialises a gradient the
size of the whole batch at every time step, which made epochs of long reviews several times
slower.

Under CUDA autocast the recurrence runs in fp32: autocast's wrapper for cuDNN's RNN was written for
float16 and may hand cuDNN float16 under a bf16 policy (with no loss scaling), while the run says
bf16. The embedding and the head still follow autocast, and the run's precision tag, measured from
the kernels' inputs, says "bf16 (fp32: _cudnn_rnn)".
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from dlpipe.config import PositiveInt, Probability
from dlpipe.family import DataMeta, Family
from dlpipe.inputs.tokens import TOKENS, EmbeddingOptions, check_vocab, masked_mean, padding_mask


class RNNConfig(EmbeddingOptions):
    """train.rnn.model in params.yaml."""

    cell: Literal["lstm", "gru"] = "gru"
    embed_dim: PositiveInt = 128
    hidden_size: PositiveInt = 128
    num_layers: Annotated[int, Field(ge=1, le=8)] = 1
    bidirectional: bool = True
    dropout: Probability = 0.2
    pooling: Literal["last", "mean", "max"] = "max"
    embedding_shortcut: bool = False  # the head also reads the mean of the input embeddings


def recur(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's outputs [B, T, H]; in fp32 outside autocast on CUDA (see the module's doc)."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        with torch.autocast("cuda", enabled=False):
            out: torch.Tensor = layer(x.float())[0]
        return out
    out = layer(x)[0]
    return out


def reverse_within_length(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x [B, T, D] with row b's first lengths[b] steps reversed and its pads left in place."""
    steps = torch.arange(x.size(1), device=x.device).unsqueeze(0)  # [1, T]
    source = lengths.unsqueeze(1) - 1 - steps
    source = torch.where(source >= 0, source, steps)  # pads map to themselves
    return x.gather(1, source.unsqueeze(-1).expand_as(x))


class RNNClassifier(nn.Module):
    """Pooling `last` uses each direction's final state; `mean` / `max` pool the real steps."""

    def __init__(self, config: RNNConfig, meta: DataMeta) -> None:
        super().__init__()
        check_vocab(meta)
        self.pooling = config.pooling
        self.hidden = config.hidden_size
        self.bidirectional = config.bidirectional
        self.embedding = config.token_embedding(meta.vocab_size, config.embed_dim)
        self.dropout = nn.Dropout(config.dropout)
        cell = nn.LSTM if config.cell == "lstm" else nn.GRU
        directions = 2 if config.bidirectional else 1

        def layer(i: int) -> nn.Module:  # one direction of layer i
            inputs = config.embed_dim if i == 0 else config.hidden_size * directions
            return cell(inputs, config.hidden_size, batch_first=True)

        self.forward_layers = nn.ModuleList(layer(i) for i in range(config.num_layers))
        self.backward_layers = nn.ModuleList(
            layer(i) for i in range(config.num_layers if config.bidirectional else 0)
        )
        self.embedding_shortcut = config.embedding_shortcut
        features = config.hidden_size * directions + config.embed_dim * config.embedding_shortcut
        self.head = nn.Linear(features, meta.num_classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens: long [B, T] padded on the right; lengths: long [B] -> logits [B, classes]."""
        lengths = lengths.clamp(min=1, max=tokens.size(1)).to(tokens.device)
        x = embedded = self.dropout(self.embedding(tokens))
        for i, forward_layer in enumerate(self.forward_layers):
            if i > 0:
                x = self.dropout(x)  # between layers, as nn.GRU(dropout=...) does
            outputs = [recur(forward_layer, x)]
            if self.bidirectional:
                backward = recur(self.backward_layers[i], reverse_within_length(x, lengths))
                outputs.append(reverse_within_length(backward, lengths))
            x = torch.cat(outputs, dim=-1)  # [B, T, H * directions]; pad steps hold junk
        mask = padding_mask(lengths, x.size(1))
        if self.pooling == "last":
            # The forward direction ends at the last real token, the backward one at the first.
            pooled = x[torch.arange(x.size(0), device=x.device), lengths - 1]
            if self.bidirectional:
                pooled = torch.cat([pooled[:, : self.hidden], x[:, 0, self.hidden :]], dim=-1)
        elif self.pooling == "mean":
            pooled = masked_mean(x, mask)
        else:
            pooled = x.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        if self.embedding_shortcut:  # a bag of (bi)grams beside the recurrence, as fastText reads
            pooled = torch.cat([pooled, masked_mean(embedded, mask)], dim=-1)
        return self.head(self.dropout(pooled))


FAMILY = Family(
    name="rnn",
    inputs=TOKENS,
    cpu_bf16=False,  # its narrow matmuls run faster in fp32 than under autocast on CPUs
    config=RNNConfig,
    build=RNNClassifier,
    smoke={
        "epochs": 2,
        "batch_size": 64,
        "lr": 0.01,
        "model": {"embed_dim": 64, "hidden_size": 32, "dropout": 0.1, "bigram_buckets": 16384},
    },
)
