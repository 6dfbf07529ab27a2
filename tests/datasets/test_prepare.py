"""prepare: the IDX reader, seeded stratified splits, the MNIST and IMDB outputs and data cards."""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from support.archives import TINY_IMDB
from support.families import REPO_ROOT
from support.tiny import MNIST_META, PREPARED_IMDB_FILES, run_stage_here
from tokenizers import Tokenizer

from dlpipe.data import text
from dlpipe.data.splits import class_counts, stratified_split
from dlpipe.data.text import TextSettings
from dlpipe.datasets import imdb, mnist
from dlpipe.datasets.imdb import ImdbSettings, frame
from dlpipe.datasets.mnist import MnistSettings
from dlpipe.errors import DlpipeError
from dlpipe.inputs.tokens import PAD_ID, TEXTS_FILE, UNK_ID, WORD_VECTORS_FILE, truncate

# --- IDX files ---------------------------------------------------------------------------------


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(f">{1 + len(dims)}I", magic, *dims) + payload


def write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes) -> Path:
    """An IDX file at `path`, gzip-compressed when the name ends in .gz."""
    data = idx_bytes(magic, dims, payload)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """The canonical pair of gz files of one split."""
    images_name, labels_name = mnist.FILES[split]
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / images_name, mnist.IMAGES_MAGIC, images.shape, images.tobytes())
    write_idx(folder / labels_name, mnist.LABELS_MAGIC, labels.shape, labels.tobytes())


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_images(tmp_path: Path, name: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    path = write_idx(tmp_path / name, 2051, (3, 28, 28), images.tobytes())
    decoded = mnist.read_idx(path)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (3, 28, 28)
    np.testing.assert_array_equal(decoded, images)


@pytest.mark.parametrize("name", ["labels-idx1-ubyte", "labels-idx1-ubyte.gz"])
def test_read_idx_labels(tmp_path: Path, name: str) -> None:
    path = write_idx(tmp_path / name, 2049, (5,), bytes([5, 0, 4, 1, 9]))
    assert mnist.read_idx(path).tolist() == [5, 0, 4, 1, 9]


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("x.idx", idx_bytes(2052, (1,), b"\x00"), r"bad IDX magic 2052, expected 2051 or 2049"),
        ("x.idx", idx_bytes(0x1F8B0800, (1,), b"\x00"), r"bad IDX magic"),  # gzip, named raw
        ("x.idx", idx_bytes(2049, (5,), bytes(3)), r"11 bytes, header says 13 \(truncated\?\)"),
        ("x.idx", idx_bytes(2049, (2,), bytes(3)), r"11 bytes, header says 10"),  # trailing junk
        ("x.idx", idx_bytes(2051, (2, 28, 28), bytes(784)), r"header says 1584 \(truncated\?\)"),
        ("x.idx", idx_bytes(2051, (1, 27, 28), bytes(756)), r"images are 27x28, expected 28x28"),
        ("x.idx", idx_bytes(2051, (1, 28, 29), bytes(812)), r"images are 28x29, expected 28x28"),
        ("x.idx", b"\x00\x00\x08", r"too short for an IDX header \(3 bytes\)"),
    ],
)
def test_read_idx_rejects_malformed_files(
    tmp_path: Path, name: str, data: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DlpipeError, match=message) as info:
        mnist.read_idx(path)
    assert str(info.value).startswith(f"{path}: ")


def test_read_idx_rejects_a_truncated_gzip_stream(tmp_path: Path) -> None:
    good = gzip.compress(idx_bytes(2051, (2, 28, 28), bytes(range(256)) * 6 + bytes(32)))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DlpipeError, match=r"cannot read IDX file"):
        mnist.read_idx(path)


def test_read_idx_rejects_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DlpipeError, match=r"nope\.gz: cannot read IDX file"):
        mnist.read_idx(tmp_path / "nope.gz")


def test_load_split_rejects_labels_above_9(tmp_path: Path) -> None:
    write_split(tmp_path, "test", np.zeros((3, 28, 28), np.uint8), np.array([1, 10, 2], np.uint8))
    with pytest.raises(DlpipeError, match=r"t10k-labels-idx1-ubyte\.gz: label 10 outside 0-9"):
        mnist.load_split(tmp_path, "test")


def test_load_split_rejects_a_count_mismatch(tmp_path: Path) -> None:
    write_split(tmp_path, "train", np.zeros((3, 28, 28), np.uint8), np.array([1, 2], np.uint8))
    with pytest.raises(DlpipeError, match=r"3 train images but 2 labels"):
        mnist.load_split(tmp_path, "train")


def test_load_split_rejects_swapped_files(tmp_path: Path) -> None:
    images_name, labels_name = mnist.FILES["test"]
    write_idx(tmp_path / images_name, 2049, (2,), bytes(2))
    write_idx(tmp_path / labels_name, 2051, (2, 28, 28), bytes(2 * 784))
    with pytest.raises(DlpipeError, match=r"swapped or malformed"):
        mnist.load_split(tmp_path, "test")


# --- stratified splits -------------------------------------------------------------------------

SPLITS = ("test", "train", "val")
IMBALANCED = np.repeat(np.array([0, 1, 2]), [600, 300, 100])


def test_split_is_a_sorted_partition() -> None:
    keep, val = stratified_split(IMBALANCED, 100, seed=42)
    assert len(val) == 100
    assert len(keep) == 900
    assert np.all(np.diff(keep) > 0)
    assert np.all(np.diff(val) > 0)
    np.testing.assert_array_equal(np.sort(np.concatenate([keep, val])), np.arange(1000))


def test_split_keeps_class_proportions() -> None:
    keep, val = stratified_split(IMBALANCED, 100, seed=3)
    assert class_counts(IMBALANCED[val], 3) == [60, 30, 10]
    assert class_counts(IMBALANCED[keep], 3) == [540, 270, 90]


def test_split_is_deterministic_per_seed() -> None:
    keep_a, val_a = stratified_split(IMBALANCED, 100, seed=42)
    keep_b, val_b = stratified_split(IMBALANCED, 100, seed=42)
    np.testing.assert_array_equal(val_a, val_b)
    np.testing.assert_array_equal(keep_a, keep_b)
    _, val_c = stratified_split(IMBALANCED, 100, seed=43)
    assert not np.array_equal(val_a, val_c)
    assert class_counts(IMBALANCED[val_c], 3) == [60, 30, 10]


def test_split_rows_are_pinned_across_versions() -> None:
    """The same seed gives the same rows on any machine and library version: a change to these
    indices (e.g. a scikit-learn upgrade) silently changes every dataset and must be noticed."""
    labels = np.repeat(np.array([0, 1, 2]), [60, 30, 10])
    _, val = stratified_split(labels, 10, seed=42)
    assert val.tolist() == [7, 14, 28, 38, 42, 51, 66, 67, 71, 94]


def test_split_size_may_be_a_share_of_the_rows() -> None:
    keep, val = stratified_split(IMBALANCED, 0.1, seed=3)
    assert class_counts(IMBALANCED[val], 3) == [60, 30, 10]
    assert len(keep) == 900
    np.testing.assert_array_equal(val, stratified_split(IMBALANCED, 100, seed=3)[1])


@pytest.mark.parametrize("val_size", [0, 1000, 1500])
def test_split_rejects_val_size_out_of_range(val_size: int) -> None:
    message = rf"^val_size {val_size} must leave rows on both sides of 1000 rows$"
    with pytest.raises(DlpipeError, match=message):
        stratified_split(IMBALANCED, val_size, seed=0)


@pytest.mark.parametrize(
    ("label_names", "shown"), [(None, "'1'"), (["negative", "positive"], "'positive'")]
)
def test_split_rejects_a_class_too_small_to_stratify(
    label_names: list[str] | None, shown: str
) -> None:
    with pytest.raises(DlpipeError) as err:
        stratified_split(np.array([0] * 10 + [1]), 3, seed=0, label_names=label_names)
    assert str(err.value) == (
        f"cannot split 11 rows by val_size 3: class {shown} has 1 example(s), and each side "
        "needs one of every class (2 classes)"
    )


def test_split_rejects_a_single_class() -> None:
    with pytest.raises(DlpipeError, match=r"^cannot split 5 rows by val_size: they hold one class"):
        stratified_split(np.zeros(5, np.int64), 2, seed=0)


# --- MNIST prepare -----------------------------------------------------------------------------


@dataclass
class RawMnist:
    folder: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def synthetic_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Random images [N, 28, 28] (as the IDX files hold them) whose first three pixels spell the
    row index (2 bytes) and the label."""
    images = np.random.default_rng(seed).integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
    rows = np.arange(len(labels))
    images[:, 0, 0], images[:, 0, 1], images[:, 0, 2] = rows % 256, rows // 256, labels
    return images


def row_ids(images: np.ndarray) -> np.ndarray:
    """The row index spelled by prepared images [N, 1, 28, 28]."""
    return images[:, 0, 0, 0].astype(np.int64) + 256 * images[:, 0, 0, 1].astype(np.int64)


@pytest.fixture
def raw_mnist(tmp_path: Path) -> RawMnist:
    """200 train / 50 test synthetic images, 10 classes, balanced, in shuffled order."""
    rng = np.random.default_rng(1)
    train_labels = rng.permutation(np.arange(200) % 10).astype(np.uint8)
    test_labels = rng.permutation(np.arange(50) % 10).astype(np.uint8)
    raw = RawMnist(
        tmp_path / "raw" / "mnist",
        synthetic_images(train_labels, 2),
        train_labels,
        synthetic_images(test_labels, 3),
        test_labels,
    )
    write_split(raw.folder, "train", raw.train_images, raw.train_labels)
    write_split(raw.folder, "test", raw.test_images, raw.test_labels)
    return raw


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def mnist_settings(raw: RawMnist, **overrides: object) -> MnistSettings:
    return MnistSettings.model_validate(
        {"format": "mnist", "path": str(raw.folder), "val_size": 20, **overrides}
    )


def test_prepare_mnist(raw_mnist: RawMnist, tmp_path: Path) -> None:
    out = tmp_path / "prepared" / "mnist"
    card = mnist.prepare(mnist_settings(raw_mnist), raw_mnist.folder, out, 42)

    arrays = {split: load_npz(out / f"{split}.npz") for split in ("train", "val", "test")}
    for split, count in (("train", 180), ("val", 20), ("test", 50)):
        assert arrays[split]["images"].shape == (count, 1, 28, 28)
        assert arrays[split]["images"].dtype == np.uint8
        assert arrays[split]["labels"].shape == (count,)
        assert arrays[split]["labels"].dtype == np.int64
        # Each image is still paired with its own label.
        np.testing.assert_array_equal(arrays[split]["images"][:, 0, 0, 2], arrays[split]["labels"])

    # train + val are exactly the 200 training images, unchanged; test is the test file as is.
    train_ids, val_ids = row_ids(arrays["train"]["images"]), row_ids(arrays["val"]["images"])
    np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, val_ids])), np.arange(200))
    np.testing.assert_array_equal(arrays["val"]["images"][:, 0], raw_mnist.train_images[val_ids])
    np.testing.assert_array_equal(arrays["test"]["images"][:, 0], raw_mnist.test_images)
    np.testing.assert_array_equal(arrays["test"]["labels"], raw_mnist.test_labels)

    _, expected_val = stratified_split(raw_mnist.train_labels, 20, 42)
    np.testing.assert_array_equal(val_ids, expected_val)

    assert card["num_classes"] == 10
    assert card["label_names"] == [str(digit) for digit in range(10)]
    assert card["image_shape"] == [1, 28, 28]
    assert card["train"]["count"] == 180
    assert card["train"]["class_counts"] == [18] * 10
    assert card["val"]["class_counts"] == [2] * 10
    assert card["test"]["class_counts"] == [5] * 10
    expected_mean = round(float(raw_mnist.test_images.mean(dtype=np.float64)) / 255.0, 4)
    assert card["test"]["pixel_mean"] == [expected_mean]
    [std] = card["test"]["pixel_std"]
    assert 0.0 < std < 1.0
    # The models normalise with MNIST's canonical statistics; served pictures use the digit rule.
    assert json.loads((out / "meta.json").read_text(encoding="utf-8")) == MNIST_META
    assert sorted(p.name for p in out.iterdir()) == [
        "SHA256SUMS",
        "meta.json",
        *(f"{s}.npz" for s in SPLITS),
    ]


def test_prepare_mnist_is_byte_for_byte_reproducible(raw_mnist: RawMnist, tmp_path: Path) -> None:
    """Same seed, same bytes: DVC sees an unchanged output and reruns nothing downstream."""
    settings = mnist_settings(raw_mnist)
    outputs = {}
    for run, seed in (("a", 42), ("b", 42), ("c", 7)):
        out = tmp_path / run / "mnist"
        mnist.prepare(settings, raw_mnist.folder, out, seed)
        outputs[run] = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    assert outputs["a"] == outputs["b"]
    assert outputs["a"]["val.npz"] != outputs["c"]["val.npz"]
    assert outputs["a"]["test.npz"] == outputs["c"]["test.npz"]


def test_prepare_mnist_rejects_a_val_size_larger_than_train(
    raw_mnist: RawMnist, tmp_path: Path
) -> None:
    settings = mnist_settings(raw_mnist, val_size=200)
    with pytest.raises(DlpipeError, match=r"val_size 200 must leave rows on both sides of 200"):
        mnist.prepare(settings, raw_mnist.folder, tmp_path / "o", 0)
    assert not (tmp_path / "o").exists()


def test_prepare_stage_writes_the_data_card(
    raw_mnist: RawMnist, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stages/prepare.py mnist` prepares datasets.mnist into data/prepared/mnist and writes the
    card the format returns to reports/data/mnist.json."""
    project = tmp_path / "project"
    project.mkdir()
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["datasets"]["mnist"].update(path=str(raw_mnist.folder), val_size=20)
    (project / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(project)
    assert run_stage_here("prepare", "mnist", monkeypatch) == 0
    card = json.loads((project / "reports" / "data" / "mnist.json").read_text(encoding="utf-8"))
    expected = mnist.prepare(mnist_settings(raw_mnist), raw_mnist.folder, tmp_path / "mnist", 42)
    assert card == expected
    prepared = project / "data" / "prepared" / "mnist"
    assert sorted(p.name for p in prepared.iterdir()) == [
        "SHA256SUMS",
        "meta.json",
        *(f"{s}.npz" for s in SPLITS),
    ]
    assert sorted(p.name for p in project.iterdir()) == ["data", "params.yaml", "reports"]


# --- IMDB: truncation, normaliser, tokenizer ---------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "max_len", "expected"),
    [
        ("head", 4, [0, 1, 2, 3]),
        ("tail", 4, [6, 7, 8, 9]),
        ("head+tail", 4, [0, 7, 8, 9]),  # a quarter (1) from the start, 3 from the end
        ("head+tail", 8, [0, 1, 4, 5, 6, 7, 8, 9]),
        ("head+tail", 3, [7, 8, 9]),  # 3 // 4 == 0 from the start
        ("head", 10, list(range(10))),
        ("tail", 10, list(range(10))),
        ("head+tail", 10, list(range(10))),
        ("head+tail", 50, list(range(10))),
    ],
)
def test_truncate(policy: str, max_len: int, expected: list[int]) -> None:
    ids = list(range(10))
    assert truncate(ids, max_len, policy) == expected
    assert ids == list(range(10))


def text_settings(**settings: object) -> TextSettings:
    """The text settings of a table dataset (format and path matter not to the tokenizer)."""
    return TextSettings.model_validate({"format": "table", "path": "-", **settings})


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_normaliser(kind: str) -> None:
    tokenizer, _ = text.new_tokenizer(text_settings(tokenizer=kind))
    normalize = tokenizer.normalizer.normalize_str
    assert normalize("Good.<br /><br />Really<br/>good<br>film") == "good. really good film"
    assert normalize("Cafe\u0301 E\u0301T\u00c9") == "caf\u00e9 \u00e9t\u00e9"
    assert len(normalize("e\u0301")) == 1
    assert normalize("  tabs\tand\n\nnewlines  ") == "tabs and newlines"


def test_normaliser_can_keep_case() -> None:
    tokenizer, _ = text.new_tokenizer(text_settings(lowercase=False))
    assert tokenizer.normalizer.normalize_str("A<br />B e\u0301") == "A B \u00e9"


TOKENIZER_TEXTS = [t for texts in TINY_IMDB.values() for t in texts] * 3 + [
    "the film was good and the acting was great",
    "the film was bad and the plot was awful",
]


def zipf_corpus(reviews: int = 1500, words: int = 3000, seed: int = 0) -> list[str]:
    """Made-up words with Zipf frequencies: merge counts rarely tie, as in real reviews.

    (On tiny corpora with many count ties the upstream WordPiece trainer can still pick different
    merges from run to run: huggingface/tokenizers#1794.)
    """
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(words)]
    p = 1.0 / np.arange(1, words + 1)
    return [" ".join(rng.choice(vocab, size=60, p=p / p.sum())) for _ in range(reviews)]


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_tokenizer_training_is_deterministic(kind: str) -> None:
    corpus = zipf_corpus()
    config = text_settings(tokenizer=kind, vocab_size=300)
    runs = [text.train_tokenizer(list(corpus), config) for _ in range(3)]
    assert runs[0].to_str() == runs[1].to_str() == runs[2].to_str()
    assert runs[0].get_vocab_size() == 300
    assert runs[0].token_to_id(text.PAD) == PAD_ID
    assert runs[0].token_to_id(text.UNK) == UNK_ID
    sample = corpus[0] + " zzqx"
    assert runs[0].encode(sample).ids == runs[2].encode(sample).ids


def test_wordpiece_renumbering_keeps_the_tokenization() -> None:
    corpus = zipf_corpus()
    config = text_settings(tokenizer="wordpiece", vocab_size=300)
    raw, trainer = text.new_tokenizer(config)
    raw.train_from_iterator(corpus, trainer=trainer)  # the trainer's own (run-dependent) ids
    renumbered = text.train_tokenizer(corpus, config)
    assert set(renumbered.get_vocab()) == set(raw.get_vocab())
    for sample in [*corpus[:20], "zzqx unseen words Ω", ""]:
        assert renumbered.encode(sample).tokens == raw.encode(sample).tokens
    assert renumbered.decode(renumbered.encode(corpus[0]).ids) == corpus[0]


def test_splits_are_padded_with_zero_and_carry_their_lengths_and_texts(tmp_path: Path) -> None:
    config = text_settings(vocab_size=120, min_frequency=1, max_len=8, truncation="head")
    config = config.model_copy(update={"word_vectors_dim": 0})
    texts = ["the film was good", "the film was bad and the plot was awful " * 3, "a plot"]

    def split(rows: list[str], prefix: str) -> text.LabelledTexts:
        ids = np.array([f"{prefix}{i}" for i in range(len(rows))])
        column = text.TextColumn(lambda: iter([rows]), np.arange(len(rows)))  # held in memory
        return text.LabelledTexts(ids, np.arange(len(rows)) % 2, column)

    splits = {
        "train": split(TOKENIZER_TEXTS, "a"),
        "val": split(texts, "b"),
        "test": split(texts[:1], "c"),
    }
    card = text.prepare_texts(splits, [], ["neg", "pos"], config, tmp_path, seed=0)
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    full = [len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts]
    with np.load(tmp_path / "val.npz") as val:
        assert val["lengths"].tolist() == [min(n, 8) for n in full]
        assert val["tokens"].shape == (3, 8) and val["tokens"].dtype == np.int32
        first = tokenizer.encode(texts[0], add_special_tokens=False).ids
        assert val["tokens"][0].tolist() == first + [PAD_ID] * (8 - len(first))
        assert val["tokens"][2, full[2] :].tolist() == [PAD_ID] * (8 - full[2])
    assert card["val"]["truncation_rate"] == round(sum(n > 8 for n in full) / 3, 4)
    saved = pd.read_parquet(tmp_path / TEXTS_FILE)
    assert saved[saved["split"] == "val"]["text"].tolist() == texts
    assert saved["row_id"].tolist()[-4:] == ["b0", "b1", "b2", "c0"]


def test_texts_are_read_again_from_their_table_a_batch_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    pd.DataFrame({"body": [f"text {i}" for i in range(10_000)]}).to_csv(path, index=False)
    column = text.TextColumn.in_table(path, "body", np.array([0, 4095, 4096, 9999]))
    assert list(column) == ["text 0", "text 4095", "text 4096", "text 9999"]
    assert list(column.take(np.array([1, 3]))) == ["text 4095", "text 9999"]
    assert list(column) == list(column)  # every pass reads the file again


# --- IMDB prepare ------------------------------------------------------------------------------

# Made-up words that appear only in one part of the data, each many times in total.
TRAIN_WORD, VAL_WORD, TEST_WORD, UNSUP_WORD = "flimflam", "quibblewomp", "zorblaxquux", "snarfle"
POSITIVE = ["good", "great", "wonderful", "moving", "funny", "superb"]
NEGATIVE = ["bad", "awful", "boring", "dull", "silly", "weak"]
SEED, VAL_SIZE = 42, 10


def generated_reviews(count: int, words: list[str], rng: np.random.Generator) -> list[str]:
    return [
        f"The film was {rng.choice(words)} and the acting was {rng.choice(words)}. "
        f"{' '.join(rng.choice(words, size=int(rng.integers(1, 40))))}"
        for _ in range(count)
    ]


def reviews(split: str, extra_per_label: int, rng: np.random.Generator) -> pd.DataFrame:
    """TINY_IMDB's reviews of a split plus generated ones, in the frame format fetch writes."""
    ids: list[str] = []
    labels: list[int] = []
    texts: list[str] = []
    for label, folder, words in ((0, "neg", NEGATIVE), (1, "pos", POSITIVE)):
        folder_texts = TINY_IMDB[(split, folder)] + generated_reviews(extra_per_label, words, rng)
        ids += [f"{split}/{folder}/{i}" for i in range(len(folder_texts))]
        labels += [label] * len(folder_texts)
        texts += folder_texts
    return frame(ids, labels, texts)


@dataclass
class RawImdb:
    folder: Path
    train: pd.DataFrame
    test: pd.DataFrame
    keep: np.ndarray
    val: np.ndarray


@pytest.fixture
def raw_imdb(tmp_path: Path) -> RawImdb:
    """Tiny train/test/unsup parquet files; marker words planted in the train rows that prepare
    keeps, in its validation rows, in the test split and in unsup."""
    rng = np.random.default_rng(0)
    train, test = reviews("train", 20, rng), reviews("test", 20, rng)
    keep, val = stratified_split(train["label"].to_numpy(), VAL_SIZE, SEED)
    texts = train["text"].tolist()
    for row in keep:
        texts[row] += f" {TRAIN_WORD} {TRAIN_WORD}"
    for row in val:
        texts[row] += f" {VAL_WORD}" * 12
    train["text"] = pd.array(texts, dtype="string")
    test["text"] = test["text"] + f" {TEST_WORD} {TEST_WORD} {TEST_WORD} 映画"
    unsup_texts = [f"{t} {UNSUP_WORD} {UNSUP_WORD}" for t in TINY_IMDB[("train", "unsup")] * 20]
    unsup = frame([f"unsup/{i}" for i in range(len(unsup_texts))], [-1] * 80, unsup_texts)
    folder = tmp_path / "raw" / "imdb"
    folder.mkdir(parents=True)
    for split, data in (("train", train), ("test", test), ("unsup", unsup)):
        data.to_parquet(folder / f"{split}.parquet", index=False, engine="pyarrow")
    return RawImdb(folder, train, test, keep, val)


def is_one_token(tokenizer: Tokenizer, word: str) -> bool:
    """Whether `word` is in the vocabulary: encoded as one id that is not [UNK]."""
    ids = tokenizer.encode(word, add_special_tokens=False).ids
    return len(ids) == 1 and ids[0] != UNK_ID


def run_prepare_imdb(raw: RawImdb, out: Path, **overrides: object) -> dict:
    """imdb's prepare of `raw` into `out`; the unlabeled reviews and the word vectors only when
    asked for."""
    settings: dict[str, object] = {
        "format": "imdb",
        "path": str(raw.folder),
        "val_size": VAL_SIZE,
        "vocab_size": 200,
        "max_len": 16,
        "train_on_unsup": False,
        "word_vectors_dim": 0,
    }
    config = ImdbSettings.model_validate({**settings, **overrides})
    return imdb.prepare(config, raw.folder, out, SEED)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_prepare_imdb(raw_imdb: RawImdb, tmp_path: Path, kind: str) -> None:
    out = tmp_path / "prepared" / "imdb"
    card = run_prepare_imdb(raw_imdb, out, tokenizer=kind)

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == card["vocab_size"] <= 200
    assert tokenizer.token_to_id(text.PAD) == PAD_ID
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    assert meta == {
        "inputs": "tokens",
        "dataset": "imdb",
        "num_classes": 2,
        "label_names": ["negative", "positive"],
        "vocab_size": card["vocab_size"],
        "pad_id": PAD_ID,
        "max_len": 16,
        "truncation": "head+tail",
    }
    assert (card["tokenizer"], card["max_len"], card["truncation"]) == (kind, 16, "head+tail")
    assert card["label_names"] == ["negative", "positive"]
    texts_file = pd.read_parquet(out / TEXTS_FILE)
    assert list(texts_file.columns) == ["row_id", "text", "split"]

    frames = {
        "train": raw_imdb.train.iloc[raw_imdb.keep],
        "val": raw_imdb.train.iloc[raw_imdb.val],
        "test": raw_imdb.test,
    }
    for split, source in frames.items():
        arrays = load_npz(out / f"{split}.npz")
        tokens, lengths, labels = arrays["tokens"], arrays["lengths"], arrays["labels"]
        count = len(source)
        assert tokens.dtype == np.int32
        assert tokens.shape == (count, int(lengths.max()))
        assert lengths.shape == labels.shape == (count,)
        assert arrays["row_id"].tolist() == source["review_id"].tolist()
        # The raw texts by row id, for the linear models and the mistakes table.
        rows = texts_file[texts_file["split"] == split]
        assert rows["row_id"].tolist() == source["review_id"].tolist()
        assert rows["text"].tolist() == source["text"].tolist()
        assert labels.tolist() == source["label"].tolist()
        assert np.all(lengths <= 16)
        beyond = np.arange(tokens.shape[1])[None, :] >= lengths[:, None]
        assert np.all(tokens[beyond] == PAD_ID)
        assert np.all(tokens[~beyond] != PAD_ID)

        # The saved tokenizer reproduces the arrays: same normaliser, same vocabulary.
        texts = source["text"].tolist()
        full = np.array([len(e.ids) for e in tokenizer.encode_batch(texts)])
        np.testing.assert_array_equal(lengths, np.minimum(full, 16))
        row = int(np.argmax(full))
        expected = truncate(tokenizer.encode(texts[row]).ids, 16, "head+tail")
        assert tokens[row, : lengths[row]].tolist() == expected

        split_card = card[split]
        assert split_card["count"] == count
        assert split_card["class_counts"] == np.bincount(labels, minlength=2).tolist()
        assert split_card["truncation_rate"] == round(float((full > 16).mean()), 4)
        assert split_card["length_percentiles"] == {
            f"p{p}": int(np.percentile(full, p)) for p in (5, 25, 50, 75, 95, 99)
        }
        unk = int(((tokens == UNK_ID) & ~beyond).sum())
        assert split_card["unk_rate"] == round(unk / int(lengths.sum()), 6)

    assert 0.0 < card["train"]["truncation_rate"] < 1.0
    assert card["train"]["unk_rate"] == 0.0  # every training character is in the vocabulary
    assert card["test"]["unk_rate"] > 0.0  # 映画 never occurs in train
    assert card["val"]["count"] == VAL_SIZE


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_vocabulary_is_learned_from_the_training_rows_only(
    raw_imdb: RawImdb, tmp_path: Path, kind: str
) -> None:
    run_prepare_imdb(raw_imdb, tmp_path / "out", tokenizer=kind)
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert is_one_token(tokenizer, TRAIN_WORD)
    for held_out in (VAL_WORD, TEST_WORD, UNSUP_WORD):
        assert tokenizer.token_to_id(held_out) is None, held_out
        assert not is_one_token(tokenizer, held_out), held_out

    # Control: the held-out words are frequent enough that a leak would have made them tokens.
    everything = [*raw_imdb.train["text"], *raw_imdb.test["text"]]
    config = text_settings(tokenizer=kind, vocab_size=200)
    leaky = text.train_tokenizer(everything, config)
    assert is_one_token(leaky, VAL_WORD)
    assert is_one_token(leaky, TEST_WORD)


def test_train_on_unsup_adds_the_unlabeled_reviews_to_the_vocabulary(
    raw_imdb: RawImdb, tmp_path: Path
) -> None:
    card = run_prepare_imdb(raw_imdb, tmp_path / "out", train_on_unsup=True)
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert is_one_token(tokenizer, UNSUP_WORD)
    assert not is_one_token(tokenizer, TEST_WORD)
    assert card["train"]["count"] == len(raw_imdb.keep)  # unsup adds vocabulary, not rows


def test_max_unlabeled_samples_the_unlabeled_reviews(raw_imdb: RawImdb, tmp_path: Path) -> None:
    card = run_prepare_imdb(
        raw_imdb, tmp_path / "out", train_on_unsup=True, word_vectors_dim=8, max_unlabeled=30
    )
    assert card["word_vectors"]["unlabeled"] == 30
    assert card["word_vectors"]["texts"] == len(raw_imdb.keep) + 30


def test_sample_texts_draws_from_every_column_in_file_order() -> None:
    def column(n: int, name: str) -> text.TextColumn:
        return text.TextColumn(lambda: iter([[f"{name}{i}" for i in range(n)]]), np.arange(n))

    columns = [column(50, "a"), column(150, "b")]
    sample = text.sample_texts(columns, 100, seed=0)
    rows = [list(c) for c in sample]
    assert sum(map(len, rows)) == 100 and all(rows)  # some of each (50 + 150 drawn from)
    assert all(r == sorted(r, key=lambda t: int(t[1:])) for r in rows)
    assert [list(c) for c in text.sample_texts(columns, 100, seed=0)] == rows
    assert text.sample_texts(columns, 0, seed=0) == columns
    assert text.sample_texts(columns, 500, seed=0) == columns


def test_prepare_imdb_is_byte_for_byte_reproducible(raw_imdb: RawImdb, tmp_path: Path) -> None:
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run / "imdb"  # meta.json names the dataset by its folder
        run_prepare_imdb(raw_imdb, out, word_vectors_dim=8)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outputs[0] == outputs[1]
    assert sorted(outputs[0]) == PREPARED_IMDB_FILES


def test_cooccurrence_counts_pairs_within_a_window_and_a_review() -> None:
    counts = text.cooccurrence([np.array([2, 3, 4]), np.array([5, 6])], vocab_size=7, window=2)
    dense = counts.toarray()
    np.testing.assert_array_equal(dense, dense.T)
    assert dense[2, 3] == dense[3, 4] == dense[5, 6] == 1.0
    assert dense[2, 4] == 0.5  # two apart: weighted 1/2
    assert dense[4, 5] == dense[3, 5] == 0.0  # the end of one review and the start of the next
    assert dense.sum() == 2 * (1 + 1 + 0.5 + 1)


def test_word_vectors_place_tokens_used_alike_together() -> None:
    """Reviews drawn from two disjoint sets of tokens: tokens of one set get vectors close to each
    other and far from the other set's; tokens never seen (pad, unk) get zeros."""
    rng = np.random.default_rng(0)
    groups = [np.arange(2, 8), np.arange(8, 14)]
    docs = [rng.choice(groups[i % 2], size=40) for i in range(300)]
    vectors = text.word_vectors(docs, vocab_size=14, dim=2, window=3, seed=0)
    assert vectors.shape == (14, 2) and vectors.dtype == np.float32
    assert not vectors[:2].any()
    unit = vectors[2:] / np.linalg.norm(vectors[2:], axis=1, keepdims=True)
    cosine = unit @ unit.T
    same = np.kron(np.eye(2), np.ones((6, 6))).astype(bool)
    assert cosine[same].min() > 0.8 > 0.2 > cosine[~same].max()
    again = text.word_vectors(docs, vocab_size=14, dim=2, window=3, seed=0)
    assert again.tobytes() == vectors.tobytes()


def test_word_vectors_past_the_vocabularys_rank_are_zero() -> None:
    vectors = text.word_vectors([np.array([2, 3, 2, 3])], vocab_size=4, dim=16, window=1, seed=0)
    assert vectors.shape == (4, 16)
    assert not vectors[:, 3:].any()  # a 4-token vocabulary has at most 3 directions here


def test_prepare_imdb_writes_word_vectors_of_the_tokenizers_reviews(
    raw_imdb: RawImdb, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    card = run_prepare_imdb(raw_imdb, out, train_on_unsup=True, word_vectors_dim=8)
    vectors = np.load(out / WORD_VECTORS_FILE)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert vectors.shape == (tokenizer.get_vocab_size(), 8)
    assert vectors[tokenizer.token_to_id(UNSUP_WORD)].any()  # learned from the unlabelled reviews
    assert not vectors[PAD_ID].any()
    unlabeled = len(TINY_IMDB[("train", "unsup")]) * 20
    assert card["word_vectors"] == {
        "dim": 8,
        "window": 5,
        "texts": len(raw_imdb.keep) + unlabeled,
        "unlabeled": unlabeled,
    }
    assert WORD_VECTORS_FILE in (out / "SHA256SUMS").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("policy", "kept"),
    [("head", slice(0, 16)), ("tail", slice(-16, None)), ("head+tail", None)],
)
def test_prepare_imdb_truncation_policy(
    raw_imdb: RawImdb, tmp_path: Path, policy: str, kept: slice | None
) -> None:
    run_prepare_imdb(raw_imdb, tmp_path / "out", truncation=policy)
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    arrays = load_npz(tmp_path / "out" / "test.npz")
    texts = raw_imdb.test["text"].tolist()
    full = [tokenizer.encode(t).ids for t in texts]
    row = max(range(len(full)), key=lambda i: len(full[i]))
    assert len(full[row]) > 16
    expected = full[row][kept] if kept is not None else full[row][:4] + full[row][-12:]
    assert arrays["tokens"][row, :16].tolist() == expected


def test_prepare_imdb_rejects_bad_labels(raw_imdb: RawImdb, tmp_path: Path) -> None:
    test = raw_imdb.test.copy()
    test.loc[0, "label"] = 2
    test.to_parquet(raw_imdb.folder / "test.parquet", index=False)
    with pytest.raises(DlpipeError, match=r"test\.parquet: labels must be 0 or 1"):
        run_prepare_imdb(raw_imdb, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_imdb_rejects_missing_input(raw_imdb: RawImdb, tmp_path: Path) -> None:
    (raw_imdb.folder / "train.parquet").unlink()
    with pytest.raises(DlpipeError, match=r"train\.parquet: missing; run the fetch stage first"):
        run_prepare_imdb(raw_imdb, tmp_path / "out")


def test_prepare_imdb_rejects_missing_columns(raw_imdb: RawImdb, tmp_path: Path) -> None:
    raw_imdb.test.drop(columns=["text"]).to_parquet(raw_imdb.folder / "test.parquet")
    with pytest.raises(
        DlpipeError, match=r"test\.parquet: no column 'text'; its columns: review_id, label"
    ):
        run_prepare_imdb(raw_imdb, tmp_path / "out")
