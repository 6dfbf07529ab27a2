"""Adversarial training on token embeddings (Miyato, Dai & Goodfellow 2017, the non-virtual
part): every step also trains on the batch with each text's embedded tokens moved a small step
in the direction that raises its loss most, the clean loss's gradient normalised per text. The
step is `relative_eps` times that text's own embedding norm, so one setting fits any length and
embedding size. It regularises the embeddings (the hashed bigram rows especially, which can
otherwise memorise the training phrases) at the cost of a second forward and backward pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from dlpipe.errors import DlpipeError
from dlpipe.inputs.tokens import TokenEmbedding


class EmbeddingAdversary:
    """Hooks on the model's token embeddings: the clean pass keeps their outputs, `arm()` turns
    those outputs' gradients into shifts, and the next forward pass adds them (once)."""

    def __init__(self, model: nn.Module, relative_eps: float) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, TokenEmbedding)]
        if not self.layers:
            raise DlpipeError(
                f"adversarial_eps: {type(model).__name__} has no token embeddings to perturb "
                "(a text family's option; set it to 0)"
            )
        self.relative_eps = relative_eps
        self._clean: dict[nn.Module, Tensor] = {}
        self._shift: dict[nn.Module, Tensor] = {}

    def _hook(self, layer: nn.Module, inputs: Any, out: Tensor) -> Tensor | None:
        if layer in self._shift:
            return out + self._shift.pop(layer)
        if layer.training and out.requires_grad:
            out.retain_grad()
            self._clean[layer] = out
        return None

    @contextmanager
    def attached(self) -> Iterator[EmbeddingAdversary]:
        """The hooks for one epoch; removed after it, so evaluation and the saved model (MLflow
        pickles it) never carry them."""
        handles = [layer.register_forward_hook(self._hook) for layer in self.layers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._clean.clear()
            self._shift.clear()

    def arm(self) -> None:
        """After the clean loss's backward: shift the next forward pass's embeddings. A loss
        scaler scales the gradient, not its direction, so the shift is the same under fp16."""
        for layer, out in self._clean.items():
            if out.grad is None:
                continue
            grad, value = out.grad.float(), out.detach().float()
            shape = (-1,) + (1,) * (grad.dim() - 1)
            direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
            size = self.relative_eps * value.flatten(1).norm(dim=1).view(shape)
            self._shift[layer] = (size * direction).to(out.dtype)
        self._clean.clear()
