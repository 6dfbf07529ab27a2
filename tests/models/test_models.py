"""The three families: shapes for every option and data, padding invariance, and that each one can
learn."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.tiny import MNIST_META
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from dlpipe.errors import DlpipeError
from dlpipe.family import DataMeta, get_family
from dlpipe.inputs.tokens import (
    TOKENS,
    WORD_VECTORS_FILE,
    TokenEmbedding,
    masked_mean,
    padding_mask,
    truncate,
)
from dlpipe.models.cnn import CNNConfig
from dlpipe.models.rnn import RNNClassifier, RNNConfig
from dlpipe.models.transformer import TransformerConfig

VOCAB, PAD = 50, 1  # a non-zero pad id catches code that assumes 0
TEXT = DataMeta(num_classes=3, vocab_size=VOCAB, pad_id=PAD)
MNIST = DataMeta.from_json(MNIST_META)  # 1x28x28
# Colour pictures of another size, with their own per-channel statistics.
RGB = DataMeta(
    num_classes=4,
    dataset="pets",
    channels=3,
    height=32,
    width=32,
    mean=(0.5, 0.4, 0.3),
    std=(0.25, 0.2, 0.15),
)

TINY_RNN = RNNConfig(embed_dim=16, hidden_size=24, dropout=0.0)
TINY_TRANSFORMER = TransformerConfig(
    d_model=32, heads=4, layers=2, ff_dim=64, dropout=0.0, max_len=64
)


def text_batch(lengths: list[int], width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens, each row padded with PAD after its length, to `width` columns."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((len(lengths), width), PAD, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens[row, :n] = torch.randint(2, VOCAB, (n,), generator=g)
    return tokens, torch.tensor(lengths)


def pad_to(tokens: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(tokens, (0, width - tokens.size(1)), value=PAD)


def build_model(name: str, config: Any, meta: DataMeta) -> nn.Module:
    return get_family(name).build(config, meta)


# --- families -----------------------------------------------------------------------------------


def test_an_unknown_family_is_one_line() -> None:
    with pytest.raises(DlpipeError, match="unknown model family 'mlp': there is no src/dlpipe/"):
        get_family("mlp")


def test_text_models_need_a_vocabulary() -> None:
    with pytest.raises(DlpipeError, match="vocab_size"):
        build_model("rnn", TINY_RNN, DataMeta(num_classes=2))


def test_build_model_imports_only_the_model_it_builds() -> None:
    """DVC's train@cnn depends on cnn.py alone, so building it must not import the other models."""
    code = (
        "import sys\n"
        "from dlpipe.family import DataMeta, get_family\n"
        "cnn = get_family('cnn')\n"
        "cnn.build(cnn.config(), DataMeta(10, channels=1, height=28, width=28, mean=(0.1,),"
        " std=(0.3,)))\n"
        "others = ['dlpipe.models.rnn', 'dlpipe.models.transformer', 'dlpipe.inputs.tokens']\n"
        "assert not set(others) & set(sys.modules), sorted(set(others) & set(sys.modules))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_train_stage_starts_without_scikit_learn() -> None:
    """scikit-learn is 1 s of start-up that a training never uses (prepare splits with it)."""
    code = (
        "import sys\n"
        "from dlpipe.family import get_family\n"
        "from dlpipe.training import run\n"
        "for name in ('cnn', 'rnn', 'transformer'):\n"
        "    get_family(name)\n"
        "    assert 'sklearn' not in sys.modules, f'{name}: scikit-learn imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- CNN ----------------------------------------------------------------------------------------


def layer_signature(model: nn.Module) -> list[str]:
    signature = []
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            signature.append(
                f"Conv2d({layer.in_channels},{layer.out_channels},{layer.kernel_size})"
            )
        elif isinstance(layer, nn.Linear):
            signature.append(f"Linear({layer.in_features},{layer.out_features})")
        elif isinstance(layer, nn.MaxPool2d):
            signature.append(f"MaxPool2d({layer.kernel_size})")
        elif not list(layer.children()):
            signature.append(type(layer).__name__)
    return signature


def test_cnn_default_is_the_keras_mnist_convnet() -> None:
    model = build_model("cnn", CNNConfig(), MNIST)
    assert sum(p.numel() for p in model.parameters()) == 93_322
    assert layer_signature(model) == [
        "Conv2d(1,32,(3, 3))", "MaxPool2d(2)", "ReLU",
        "Conv2d(32,64,(3, 3))", "MaxPool2d(2)", "ReLU",
        "Conv2d(64,64,(3, 3))", "ReLU", "Flatten",
        "Linear(576,64)", "ReLU",
        "Linear(64,10)",
    ]  # fmt: skip


def test_cnn_on_colour_pictures_of_another_size() -> None:
    """Any channels and size: the same layers, the dense one sized to what the convolutions
    leave (32 -> 30 -> 15 -> 13 -> 6 -> 4)."""
    model = build_model("cnn", CNNConfig(), RGB)
    assert model(torch.rand(5, 3, 32, 32)).shape == (5, 4)
    signature = layer_signature(model)
    assert signature[0] == "Conv2d(3,32,(3, 3))"
    assert "Linear(1024,64)" in signature and signature[-1] == "Linear(64,4)"
    wide = replace(RGB, height=18, width=40)  # the smallest height
    assert build_model("cnn", CNNConfig(), wide)(torch.rand(2, 3, 18, 40)).shape == (2, 4)


@pytest.mark.parametrize(("height", "width"), [(16, 16), (17, 64), (64, 10)])
def test_cnn_refuses_pictures_too_small_for_its_layers(height: int, width: int) -> None:
    small = replace(RGB, height=height, width=width)
    with pytest.raises(DlpipeError) as caught:
        build_model("cnn", CNNConfig(), small)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"datasets.pets: {height}x{width} images are too small"), message
    assert "the smallest that works is 18x18" in message


@pytest.mark.parametrize("meta", [MNIST, RGB], ids=["mnist", "rgb"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_cnn_pools_before_relu_yet_computes_kerass_conv_relu_pool(
    batch_norm: bool, meta: DataMeta
) -> None:
    """The same function as Keras's order, written out with the model's own weights, on pixels
    normalised by the dataset's per-channel mean and std."""
    torch.manual_seed(0)
    model = build_model("cnn", CNNConfig(batch_norm=batch_norm), meta)
    model.train()  # batch statistics: the order must not matter there either
    images = torch.rand(8, meta.channels, meta.height, meta.width)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)] or [nn.Identity()] * 3
    mean, std = torch.tensor(meta.mean)[:, None, None], torch.tensor(meta.std)[:, None, None]
    x = (images - mean) / std
    for i, (conv, norm) in enumerate(zip(convs, norms, strict=True)):
        x = F.relu(norm(conv(x)))
        x = F.max_pool2d(x, 2) if i < 2 else x
    expected = model.classifier(x.flatten(1))
    torch.testing.assert_close(model(images), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "config",
    [CNNConfig(), CNNConfig(width=2), CNNConfig(batch_norm=True), CNNConfig(dropout=0.5)],
    ids=["default", "width2", "batchnorm", "dropout"],
)
def test_cnn_shapes(config: CNNConfig) -> None:
    model = build_model("cnn", config, MNIST)
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)
    signature = layer_signature(model)
    assert signature.count("BatchNorm2d") == (3 if config.batch_norm else 0)
    assert signature.count("Dropout") == (1 if config.dropout else 0)
    assert f"Linear({64 * config.width},10)" in signature


def test_cnn_channels_last_gives_the_same_logits() -> None:
    torch.manual_seed(0)
    model = build_model("cnn", CNNConfig(batch_norm=True), MNIST).eval()
    images = torch.rand(4, 1, 28, 28)
    expected = model(images)
    model = model.to(memory_format=torch.channels_last)
    got = model(images.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# --- text models --------------------------------------------------------------------------------

RNN_VARIANTS = [
    TINY_RNN.model_copy(update={"cell": cell, "pooling": pooling, "bidirectional": bidir})
    for cell in ("lstm", "gru")
    for pooling in ("last", "mean", "max")
    for bidir in (True, False)
] + [
    TINY_RNN.model_copy(update={"num_layers": 2, "dropout": 0.3, "cell": "lstm"}),
    TINY_RNN.model_copy(update={"bigram_buckets": 97}),
    TINY_RNN.model_copy(update={"bigram_buckets": 97, "embedding_shortcut": True}),
    TINY_RNN.model_copy(update={"pooling": "last", "embedding_shortcut": True}),
]
TRANSFORMER_VARIANTS = [
    TINY_TRANSFORMER.model_copy(update={"positional": positional, "pooling": pooling})
    for positional in ("sinusoidal", "learned")
    for pooling in ("mean", "cls")
] + [TINY_TRANSFORMER.model_copy(update={"bigram_buckets": 97})]
TEXT_VARIANTS = [("rnn", c) for c in RNN_VARIANTS] + [
    ("transformer", c) for c in TRANSFORMER_VARIANTS
]


def variant_id(variant: tuple[str, RNNConfig | TransformerConfig]) -> str:
    name, c = variant
    bigrams = f"-bigrams{c.bigram_buckets}" if c.bigram_buckets else ""
    if isinstance(c, RNNConfig):
        shape = f"{c.cell}-{c.pooling}-{'bi' if c.bidirectional else 'uni'}-{c.num_layers}l"
        shortcut = "-shortcut" if c.embedding_shortcut else ""
        return f"rnn-{shape}{bigrams}{shortcut}"
    return f"transformer-{c.positional}-{c.pooling}{bigrams}"


def with_random_bigrams(model: nn.Module) -> nn.Module:
    """The model with its bigram rows (zero when built) drawn at random, so they move logits."""
    bigrams = model.embedding.bigrams
    if bigrams is not None:
        nn.init.normal_(bigrams.weight)
    return model


@pytest.mark.parametrize("variant", TEXT_VARIANTS, ids=variant_id)
def test_text_model_shapes(variant: tuple[str, RNNConfig | TransformerConfig]) -> None:
    model = build_model(*variant, TEXT)
    tokens, lengths = text_batch([7, 1, 12, 3], width=12)
    assert model(tokens, lengths).shape == (4, 3)


@pytest.mark.parametrize("name", ["rnn", "transformer"])
def test_text_families_take_any_number_of_classes(name: str) -> None:
    config = TINY_RNN if name == "rnn" else TINY_TRANSFORMER
    five = DataMeta(num_classes=5, dataset="tickets", vocab_size=VOCAB, pad_id=PAD, max_len=64)
    model = build_model(name, config, five)
    tokens, lengths = text_batch([7, 1, 12], width=12)
    assert model(tokens, lengths).shape == (3, 5)


@pytest.mark.parametrize("variant", TEXT_VARIANTS, ids=variant_id)
def test_padding_never_changes_the_logits(
    variant: tuple[str, RNNConfig | TransformerConfig],
) -> None:
    torch.manual_seed(0)
    model = with_random_bigrams(build_model(*variant, TEXT)).eval()
    tokens, lengths = text_batch([9, 1, 12, 4], width=12)
    with torch.no_grad():
        expected = model(tokens, lengths)
        torch.testing.assert_close(model(pad_to(tokens, 40), lengths), expected, atol=1e-5, rtol=0)
        # One short review alone, then next to a neighbour five times its length.
        alone = model(tokens[:1, :9], lengths[:1])
        long_tokens, long_lengths = text_batch([9, 50], width=50)
        long_tokens[0, :9] = tokens[0, :9]
        torch.testing.assert_close(model(long_tokens, long_lengths)[:1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_rnn_equals_torchs_packed_bidirectional_rnn(
    cell: str, num_layers: int, pooling: str
) -> None:
    """The padded, reversed-within-length recurrence computes exactly what a packed one does."""
    torch.manual_seed(0)
    update = {"cell": cell, "num_layers": num_layers, "pooling": pooling}
    model = RNNClassifier(TINY_RNN.model_copy(update=update), TEXT).eval()
    reference = (nn.LSTM if cell == "lstm" else nn.GRU)(
        16, 24, num_layers=num_layers, bidirectional=True, batch_first=True
    )
    with torch.no_grad():
        for suffix, layers in (("", model.forward_layers), ("_reverse", model.backward_layers)):
            for i, layer in enumerate(layers):
                for weight in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    ours = getattr(layer, f"{weight}_l0")
                    getattr(reference, f"{weight}_l{i}{suffix}").copy_(ours)
        tokens, lengths = text_batch([9, 1, 12, 4], width=12)
        embedded = model.embedding(tokens)
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        outputs, hidden = reference(packed)
        if pooling == "last":
            final = hidden[0] if cell == "lstm" else hidden  # [layers * 2, B, H]
            pooled = torch.cat([final[-2], final[-1]], dim=-1)
        else:
            steps, _ = pad_packed_sequence(outputs, batch_first=True)
            pooled = masked_mean(steps, padding_mask(lengths, steps.size(1)))
        torch.testing.assert_close(model(tokens, lengths), model.head(pooled))


def test_bigram_embedding_reads_each_token_and_the_one_before_it() -> None:
    """A token's vector depends on itself and its predecessor only; fresh, it is the token's."""
    torch.manual_seed(0)
    embedding = TokenEmbedding(VOCAB, 8, bigram_buckets=101)
    tokens, _ = text_batch([10], width=10)
    torch.testing.assert_close(embedding(tokens), embedding.tokens(tokens))  # zero bigram rows
    nn.init.normal_(embedding.bigrams.weight)
    before = embedding(tokens)
    edited = tokens.clone()
    edited[0, 4] = 2 if tokens[0, 4] != 2 else 3
    moved = (embedding(edited) - before).abs().amax(dim=-1)[0] > 0
    assert moved.tolist() == [i in (4, 5) for i in range(10)]
    assert TokenEmbedding(VOCAB, 8).bigrams is None


def test_embedding_shortcut_gives_the_head_the_mean_of_the_real_tokens_embeddings() -> None:
    torch.manual_seed(0)
    config = TINY_RNN.model_copy(update={"embedding_shortcut": True, "bigram_buckets": 97})
    model = with_random_bigrams(build_model("rnn", config, TEXT)).eval()
    tokens, lengths = text_batch([9, 4, 1], width=9)
    recurrent = model.head.in_features - config.embed_dim
    with torch.no_grad():
        model.head.weight[:, :recurrent] = 0  # only the shortcut reaches the logits
        means = [
            model.embedding(tokens[i : i + 1, :n])[0].mean(dim=0) for i, n in enumerate(lengths)
        ]
        expected = model.head.bias + torch.stack(means) @ model.head.weight[:, recurrent:].T
        torch.testing.assert_close(model(tokens, lengths), expected)


def test_word_dropout_drops_whole_tokens_in_training_only() -> None:
    torch.manual_seed(0)
    embedding = TokenEmbedding(VOCAB, 8, word_dropout=0.5)
    tokens, _ = text_batch([200, 200], width=200)
    plain = embedding.tokens(tokens)
    out = embedding(tokens)
    dropped = out.abs().amax(dim=-1) == 0  # [B, T]: every element of a token, or none
    kept = ~dropped
    assert 0.4 < dropped.float().mean() < 0.6
    torch.testing.assert_close(out[kept], plain[kept] * 2)  # survivors scaled by 1 / (1 - p)
    torch.testing.assert_close(embedding.eval()(tokens), plain)


@pytest.mark.parametrize(("name", "config"), [("rnn", TINY_RNN), ("transformer", TINY_TRANSFORMER)])
def test_pretrained_models_start_from_the_prepared_word_vectors(
    tmp_path: Path, name: str, config: RNNConfig | TransformerConfig
) -> None:
    """Each text family's token vectors start from the first columns of word_vectors.npy, at its
    embedding's own scale; a model not set `pretrained` keeps its random start."""
    vectors = np.random.default_rng(0).standard_normal((VOCAB, 40)).astype(np.float32)
    np.save(tmp_path / WORD_VECTORS_FILE, vectors)
    model = build_model(name, config.model_copy(update={"pretrained": True}), TEXT)
    TOKENS.initialize(model, tmp_path)
    embedding = model.embedding
    dim = embedding.tokens.embedding_dim
    expected = torch.from_numpy(vectors[:, :dim]) * embedding.std
    torch.testing.assert_close(embedding.tokens.weight, expected)

    plain = build_model(name, config, TEXT)
    before = plain.embedding.tokens.weight.clone()
    TOKENS.initialize(plain, tmp_path)
    torch.testing.assert_close(plain.embedding.tokens.weight, before)


def test_pretrained_embedding_keeps_random_columns_past_the_vectors_and_checks_the_vocabulary(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    embedding = TokenEmbedding(VOCAB, 8, pretrained=True)
    before = embedding.tokens.weight.clone()
    embedding.load_vectors(np.ones((VOCAB, 3), dtype=np.float32))
    assert (embedding.tokens.weight[:, :3] == 1).all()
    torch.testing.assert_close(embedding.tokens.weight[:, 3:], before[:, 3:])
    with pytest.raises(DlpipeError, match="do not fit a 50-token vocabulary"):
        embedding.load_vectors(np.ones((VOCAB + 1, 8), dtype=np.float32))

    model = nn.Sequential(embedding)
    with pytest.raises(DlpipeError, match="word_vectors_dim above 0"):
        TOKENS.initialize(model, tmp_path)  # no word_vectors.npy there


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two logits differ by more than float noise."""
    return bool((a - b).abs().max() > 1e-4)


@pytest.mark.parametrize(
    "config", TRANSFORMER_VARIANTS, ids=lambda c: f"{c.positional}-{c.pooling}"
)
def test_transformer_reads_only_its_first_max_len_tokens(config: TransformerConfig) -> None:
    """Longer input is cut to the head: tokens past max_len cannot move the logits, any token
    inside the window (first or last kept) does, and a length past max_len counts as max_len."""
    torch.manual_seed(0)
    model = build_model("transformer", config, TEXT).eval()
    keep = config.max_len
    tokens, lengths = text_batch([200, 200], width=200)
    other = torch.randint(2, VOCAB, tokens.shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits = model(tokens, lengths)
        new_tail = torch.cat([tokens[:, :keep], other[:, keep:]], dim=1)
        torch.testing.assert_close(model(new_tail, lengths), logits, atol=0, rtol=0)
        torch.testing.assert_close(model(tokens, torch.tensor([keep, 150])), logits)
        for position in (0, keep - 1):
            edited = tokens.clone()
            edited[:, position] = (tokens[:, position] - 2 + 1) % (VOCAB - 2) + 2  # another word
            assert changed(model(edited, lengths), logits), position
        # Declaring fewer real tokens than max_len does cut the window.
        assert changed(model(tokens, torch.tensor([keep - 1, keep - 1])), logits)


def test_a_long_review_keeps_its_opening_and_its_verdict() -> None:
    """The pipeline's contract for a review longer than max_len: `truncate` (head+tail, as the
    prepare stage and the predictor use it) keeps the first quarter and the end, so the last
    words (the verdict) reach the model while the middle is dropped."""
    torch.manual_seed(0)
    model = build_model("transformer", TINY_TRANSFORMER, TEXT).eval()
    keep = TINY_TRANSFORMER.max_len
    review = list(range(2, VOCAB)) * 6  # 288 ids
    middle, last, first = len(review) // 2, len(review) - 1, 0

    def logits(ids: list[int]) -> torch.Tensor:
        kept = truncate(ids, keep, "head+tail")
        assert len(kept) == keep
        with torch.no_grad():
            return model(torch.tensor([kept]), torch.tensor([len(kept)]))

    def with_word(position: int) -> list[int]:
        edited = list(review)
        edited[position] = 2 if review[position] != 2 else 3
        return edited

    base = logits(review)
    torch.testing.assert_close(logits(with_word(middle)), base, atol=0, rtol=0)
    assert changed(logits(with_word(last)), base)
    assert changed(logits(with_word(first)), base)
    assert changed(logits(with_word(keep // 4 - 1)), base)  # the head's last kept word
    torch.testing.assert_close(logits(with_word(keep // 4)), base, atol=0, rtol=0)  # dropped


def test_heads_must_divide_d_model() -> None:
    with pytest.raises(ValueError, match="heads 5 does not divide d_model 16"):
        TransformerConfig(d_model=16, heads=5)


def test_the_transformer_refuses_data_longer_than_it_keeps() -> None:
    """prepare kept the head and the tail of each text: a model keeping fewer tokens would cut
    the tail (often the verdict) off again, silently; built for such data it is one line naming
    the dataset's max_len instead."""
    keep = TINY_TRANSFORMER.max_len
    longer = DataMeta(num_classes=2, dataset="imdb", vocab_size=VOCAB, pad_id=PAD, max_len=keep + 1)
    with pytest.raises(DlpipeError) as caught:
        build_model("transformer", TINY_TRANSFORMER, longer)
    message = str(caught.value)
    assert "\n" not in message, message
    assert message.startswith(f"datasets.imdb.max_len {keep + 1} is above the transformer's ")
    assert f"model.max_len {keep}" in message
    fits = DataMeta(num_classes=2, dataset="imdb", vocab_size=VOCAB, pad_id=PAD, max_len=keep)
    build_model("transformer", TINY_TRANSFORMER, fits)  # as long as it keeps: fine


# --- all three ----------------------------------------------------------------------------------


def model_and_batch(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], torch.Tensor]:
    """A tiny model, a fixed batch of 16 inputs and random labels for it."""
    torch.manual_seed(0)
    if name == "cnn":
        model = build_model("cnn", CNNConfig(), MNIST)
        inputs: tuple[torch.Tensor, ...] = (torch.rand(16, 1, 28, 28),)
        classes = 10
    else:
        config = TINY_RNN if name == "rnn" else TINY_TRANSFORMER
        model = build_model(name, config, TEXT)
        lengths = torch.randint(3, 16, (16,)).tolist()
        inputs = text_batch(lengths, width=16)
        classes = TEXT.num_classes
    return model, inputs, torch.randint(0, classes, (16,))


@pytest.mark.parametrize("name", ["cnn", "rnn", "transformer"])
def test_each_model_can_memorise_a_small_batch(name: str) -> None:
    """Random labels leave nothing to generalise: reaching accuracy 1.0 proves gradients flow."""
    model, inputs, labels = model_and_batch(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(200):
        logits = model(*inputs)
        if (logits.argmax(dim=1) == labels).all():  # the tiny models use no dropout
            break
        optimizer.zero_grad()
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(*inputs).argmax(dim=1) == labels).float().mean().item()
    assert accuracy == 1.0


@pytest.mark.parametrize("name", ["cnn", "rnn", "transformer"])
def test_bf16_autocast_forward_and_backward_are_finite(name: str) -> None:
    model, inputs, labels = model_and_batch(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(*inputs), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
