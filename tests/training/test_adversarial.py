"""Adversarial training on token embeddings (train.<model>.adversarial_eps): the shift's size and
direction, that it is applied once, and training with it (history, exact resume, no hooks left
on the model it ships)."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from support.tiny import TinyProject
from test_training import fresh_model, tiny_data
from torch.utils.hooks import RemovableHandle

from dlpipe.config import train_config
from dlpipe.errors import DlpipeError
from dlpipe.inputs.tokens import TokenEmbedding
from dlpipe.training.adversarial import EmbeddingAdversary
from dlpipe.training.runtime import make_runtime
from dlpipe.training.trainer import Trainer

EPS = 0.05


def embedding_outputs(model: torch.nn.Module) -> tuple[list[torch.Tensor], RemovableHandle]:
    """Collects what the model's token embeddings put out on each forward pass (after the
    hooks registered before it)."""
    seen: list[torch.Tensor] = []
    [layer] = [m for m in model.modules() if isinstance(m, TokenEmbedding)]
    hook = layer.register_forward_hook(lambda _, __, out: seen.append(out.detach().clone()))
    return seen, hook


@pytest.mark.parametrize("name", ["rnn", "transformer"])
def test_the_shift_is_eps_of_each_texts_norm_along_its_loss_gradient_and_applied_once(
    tiny_project: TinyProject, name: str
) -> None:
    params = tiny_project.with_train(name, model={"dropout": 0.0, "word_dropout": 0.0})
    train, _, meta = tiny_data(name)
    model = fresh_model(name, params, meta).train()
    adversary = EmbeddingAdversary(model, EPS)
    inputs, targets = train.batch(torch.arange(8))
    with adversary.attached():
        seen, collector = embedding_outputs(model)
        clean = F.cross_entropy(model(*inputs), targets)
        clean.backward()
        [layer] = adversary.layers
        gradient = adversary._clean[layer].grad.clone()  # noqa: SLF001 (what arm() reads)
        adversary.arm()
        shifted = F.cross_entropy(model(*inputs), targets)
        again = F.cross_entropy(model(*inputs), targets)
        collector.remove()
    embedded, shifted_embedded = seen[0], seen[1]
    shift = (shifted_embedded - embedded).flatten(1)
    assert torch.allclose(shift.norm(dim=1), EPS * embedded.flatten(1).norm(dim=1), rtol=1e-4)
    cosine = F.cosine_similarity(shift, gradient.flatten(1), dim=1)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-4)
    assert shifted > clean  # a step up the loss's gradient raises it
    assert torch.equal(seen[2], embedded) and torch.isclose(again, clean)  # applied once
    assert not layer._forward_hooks  # noqa: SLF001 (detached after the epoch)


def test_a_model_without_token_embeddings_is_one_line(tiny_project: TinyProject) -> None:
    _, _, meta = tiny_data("cnn")
    with pytest.raises(DlpipeError, match="adversarial_eps: .* has no token embeddings"):
        EmbeddingAdversary(fresh_model("cnn", tiny_project.params, meta), EPS)


def test_training_with_it_logs_its_loss_and_ships_no_hooks(tiny_project: TinyProject) -> None:
    """(Its exact resume is one case of test_training's resume test.)"""
    name = "transformer"
    params = tiny_project.with_train(name, adversarial_eps=EPS)
    config = train_config(params, name)
    train, val, meta = tiny_data(name)
    runtime = make_runtime(config.device, config.precision)
    trainer = Trainer(fresh_model(name, params, meta), config, runtime, params.seed, label=name)
    result = trainer.fit(train, val)
    assert all(row["train_adversarial_loss"] > 0 for row in result.history)
    assert not any(m._forward_hooks for m in trainer.model.modules())  # noqa: SLF001
    pickle.dumps(trainer.model)  # as MLflow's log_model does
