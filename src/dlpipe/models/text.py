"""Helpers both text models share: which positions are real tokens, and pooling over them only."""

from __future__ import annotations

import torch

from dlpipe.errors import DlpipeError
from dlpipe.models import DataMeta


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
