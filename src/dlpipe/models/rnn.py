"""A recurrent text classifier: embedding -> (bi)LSTM/GRU -> pooling -> linear head.

The recurrence runs over a packed sequence, so pad tokens are never read: a review gets the same
logits whether its batch is padded to 300 or to 512 tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dlpipe.config import RNNConfig
from dlpipe.models import DataMeta
from dlpipe.models.text import check_vocab, masked_mean, padding_mask


class RNNClassifier(nn.Module):
    """Pooling `last` uses each direction's final hidden state; `mean` / `max` pool all steps."""

    def __init__(self, config: RNNConfig, meta: DataMeta) -> None:
        super().__init__()
        check_vocab(meta)
        self.pooling = config.pooling
        self.directions = 2 if config.bidirectional else 1
        self.embedding = nn.Embedding(meta.vocab_size, config.embed_dim, padding_idx=meta.pad_id)
        self.dropout = nn.Dropout(config.dropout)
        rnn = nn.LSTM if config.cell == "lstm" else nn.GRU
        self.rnn = rnn(
            config.embed_dim,
            config.hidden_size,
            num_layers=config.num_layers,
            batch_first=True,
            bidirectional=config.bidirectional,
            dropout=config.dropout if config.num_layers > 1 else 0.0,  # only between layers
        )
        self.head = nn.Linear(config.hidden_size * self.directions, meta.num_classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """tokens: long [B, T] padded on the right; lengths: long [B] -> logits [B, classes]."""
        lengths = lengths.clamp(min=1, max=tokens.size(1))
        x = self.dropout(self.embedding(tokens))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        outputs, hidden = self.rnn(packed)  # both come back in the batch's original order
        if self.pooling == "last":
            h = hidden[0] if isinstance(hidden, tuple) else hidden  # LSTM also returns its cell
            # h is [layers * directions, B, H]; keep the top layer's directions side by side.
            pooled = h[-self.directions :].transpose(0, 1).reshape(tokens.size(0), -1)
        else:
            steps, _ = pad_packed_sequence(outputs, batch_first=True)  # [B, max(lengths), D]
            mask = padding_mask(lengths.to(steps.device), steps.size(1))
            if self.pooling == "mean":
                pooled = masked_mean(steps, mask)
            else:
                pooled = steps.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        return self.head(self.dropout(pooled))


def build(config: RNNConfig, meta: DataMeta) -> RNNClassifier:
    return RNNClassifier(config, meta)
