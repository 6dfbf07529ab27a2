"""The two no-code formats, `images` (a folder of pictures) and `table` (a table of texts): what
they prepare, and every kind of bad data they refuse in one line (or warn about, with a count in
the data card)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from support.own_data import CLASSES, COLOURS, TOPICS, picture, tickets

from dlpipe.datasets import get_format
from dlpipe.errors import DlpipeError
from dlpipe.family import DataMeta


def image_folder(root: Path, per_class: int = 12, split: str = "") -> Path:
    """`root/[split/]<class>/<n>.{png,jpg}`: colour pictures of several sizes and formats."""
    for c, name in enumerate(CLASSES):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = picture(COLOURS[name], (24 + 4 * (i % 5), 30 + 2 * (i % 3)), seed=100 * c + i)
            if i % 4 == 0:
                image.save(folder / f"{i}.jpg", quality=95)
            elif i % 4 == 1:
                image.convert("L").save(folder / f"{i}.png")  # grayscale files mix in
            elif i % 4 == 2:
                image.convert("RGBA").save(folder / f"{i}.webp")
            else:
                image.save(folder / f"{i}.bmp")
    return root


def settings(fmt: str, path: Path, **extra: Any) -> Any:
    return get_format(fmt).settings.model_validate({"format": fmt, "path": str(path), **extra})


def prepare(fmt: str, path: Path, out: Path, **extra: Any) -> dict[str, Any]:
    found = get_format(fmt)
    result: dict[str, Any] = found.prepare(settings(fmt, path, **extra), path, out, 7)
    return result


def read_meta(out: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((out / "meta.json").read_text())
    return meta


# --- images ------------------------------------------------------------------------------------


def test_an_image_folder_becomes_resized_colour_arrays_with_its_class_names(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "pets")
    card = prepare("images", root, tmp_path / "out", image_size=[20, 24], channels=3)
    meta = read_meta(tmp_path / "out")
    assert meta["inputs"] == "images" and meta["label_names"] == list(CLASSES)
    assert meta["image"] | {"mean": None, "std": None} == {
        "channels": 3,
        "height": 20,
        "width": 24,
        "mean": None,
        "std": None,
        "raw": "resize",
    }
    assert len(meta["image"]["mean"]) == 3 and all(s > 0 for s in meta["image"]["std"])
    counts = {split: card[split]["count"] for split in ("train", "val", "test")}
    assert sum(counts.values()) == 4 * 12 and counts["test"] == round(0.2 * 48)
    for split in ("train", "val", "test"):
        with np.load(tmp_path / "out" / f"{split}.npz") as arrays:
            assert arrays["images"].shape[1:] == (3, 20, 24) and arrays["images"].dtype == np.uint8
            assert set(arrays["labels"]) == {0, 1, 2, 3}  # stratified: every class on every side
    red = DataMeta.from_json(meta)
    assert (red.channels, red.height, red.width, red.num_classes) == (3, 20, 24, 4)


def test_train_and_test_folders_are_kept_as_the_split(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    image_folder(root, per_class=10, split="train")
    image_folder(root, per_class=3, split="test")
    card = prepare("images", root, tmp_path / "out", channels=1, image_size=[18, 18])
    assert card["test"]["count"] == 12 and card["train"]["count"] + card["val"]["count"] == 40
    with np.load(tmp_path / "out" / "train.npz") as arrays:
        assert arrays["images"].shape[1:] == (1, 18, 18)


def test_preparing_the_same_folder_twice_writes_the_same_bytes(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "pets")
    prepare("images", root, tmp_path / "a" / "pets")
    prepare("images", root, tmp_path / "b" / "pets")
    for name in ("train.npz", "val.npz", "test.npz", "meta.json", "SHA256SUMS"):
        first, second = (tmp_path / run / "pets" / name for run in ("a", "b"))
        assert first.read_bytes() == second.read_bytes()


def test_a_truncated_picture_is_named_or_skipped_and_counted(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "pets")
    broken = root / "dog" / "broken.png"
    broken.write_bytes((root / "dog" / "1.png").read_bytes()[:40])
    with pytest.raises(DlpipeError, match=r"broken\.png: not an image.*on_bad_image: skip"):
        prepare("images", root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
    card = prepare("images", root, tmp_path / "out", on_bad_image="skip")
    assert card["skipped_pictures"] == 1


def test_a_file_of_another_type_in_a_class_folder_is_named(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "pets")
    (root / "owl" / "notes.txt").write_text("not a picture")
    with pytest.raises(DlpipeError, match=r"owl/notes\.txt: not a picture file"):
        prepare("images", root, tmp_path / "out")


def test_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DlpipeError, match="no such folder"):
        prepare("images", tmp_path / "nowhere", tmp_path / "out")


def test_a_folder_with_one_class_is_refused(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "pets")
    for name in CLASSES[1:]:
        for file in (root / name).iterdir():
            file.unlink()
        (root / name).rmdir()
    with pytest.raises(DlpipeError, match=r"two or more class folders \(found only .cat.\)"):
        prepare("images", root, tmp_path / "out")


def test_a_class_with_too_few_pictures_for_the_splits_is_named(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "pets")
    for file in sorted((root / "fish").iterdir())[1:]:
        file.unlink()
    with pytest.raises(DlpipeError, match=r"class 'fish' has 1 example"):
        prepare("images", root, tmp_path / "out")


def test_test_classes_unseen_in_training_are_named(tmp_path: Path) -> None:
    root = tmp_path / "pets"
    image_folder(root, per_class=10, split="train")
    image_folder(root, per_class=2, split="test")
    (root / "test" / "yak").mkdir()
    picture((1, 2, 3), (20, 20), 0).save(root / "test" / "yak" / "0.png")
    with pytest.raises(DlpipeError, match=r"classes \['yak'\] have no training pictures"):
        prepare("images", root, tmp_path / "out")


def test_the_same_picture_in_train_and_test_is_counted_as_leakage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "pets"
    image_folder(root, per_class=10, split="train")
    image_folder(root, per_class=2, split="test")  # the same seeds: the same first pictures
    card = prepare("images", root, tmp_path / "out")
    assert card["test_pictures_also_in_train"] >= 4
    assert "also in the training split" in capsys.readouterr().err


def test_an_image_size_too_small_for_the_cnn_names_the_smallest_that_works() -> None:
    from dlpipe.models.cnn import CNN, CNNConfig

    meta = DataMeta(num_classes=4, dataset="pets", channels=3, height=16, width=32)
    with pytest.raises(DlpipeError, match=r"datasets\.pets: 16x32 .* smallest that works is 18x18"):
        CNN(CNNConfig(), meta)


# --- table -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet", ".csv.gz"])
def test_a_table_of_texts_becomes_token_splits_with_its_class_names(
    tmp_path: Path, suffix: str
) -> None:
    frame = tickets()
    path = tmp_path / f"tickets{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    extra = {"text": "body", "label": "category", "vocab_size": 200, "word_vectors_dim": 8}
    card = prepare("table", path, tmp_path / "out", **extra)
    meta = read_meta(tmp_path / "out")
    assert meta["inputs"] == "tokens" and meta["label_names"] == sorted(TOPICS)
    assert card["num_classes"] == 5
    assert sum(card[s]["count"] for s in ("train", "val", "test")) == len(frame)
    texts = pd.read_parquet(tmp_path / "out" / "texts.parquet")
    assert set(texts["split"]) == {"train", "val", "test"} and len(texts) == len(frame)


def test_integer_labels_sort_by_value_and_rows_without_one_are_unlabeled_text(
    tmp_path: Path,
) -> None:
    frame = tickets(20)
    frame["category"] = frame["category"].map({t: 10 - 2 * i for i, t in enumerate(TOPICS)})
    frame.loc[:4, "category"] = None  # five unlabeled rows: vocabulary and word vectors only
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    extra = {"text": "body", "label": "category", "vocab_size": 200, "word_vectors_dim": 8}
    card = prepare("table", path, tmp_path / "out", **extra)
    assert read_meta(tmp_path / "out")["label_names"] == ["2", "4", "6", "8", "10"]
    assert card["word_vectors"]["unlabeled"] == 5
    assert sum(card[s]["count"] for s in ("train", "val", "test")) == len(frame) - 5


def test_a_separate_test_table_is_the_test_split(tmp_path: Path) -> None:
    tickets().to_csv(tmp_path / "train.csv", index=False)
    tickets(3, seed=9).to_csv(tmp_path / "test.csv", index=False)
    extra = {"text": "body", "label": "category", "test": str(tmp_path / "test.csv")}
    card = prepare("table", tmp_path / "train.csv", tmp_path / "out", vocab_size=200, **extra)
    assert card["test"]["count"] == 15


def write_csv(tmp_path: Path, frame: pd.DataFrame, name: str = "t.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


TABLE = {"text": "body", "label": "category", "vocab_size": 200}


def test_a_missing_table_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DlpipeError, match="no such file"):
        prepare("table", tmp_path / "none.csv", tmp_path / "out", **TABLE)


def test_a_misnamed_column_names_the_columns_the_table_has(tmp_path: Path) -> None:
    path = write_csv(tmp_path, tickets())
    with pytest.raises(DlpipeError, match=r"no column 'text' .*its columns: id, body, category"):
        prepare("table", path, tmp_path / "out", label="category")


def test_an_empty_table_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("body,category\n")
    with pytest.raises(DlpipeError, match="no rows"):
        prepare("table", path, tmp_path / "out", **TABLE)


def test_a_table_with_one_class_is_refused(tmp_path: Path) -> None:
    frame = tickets().assign(category="billing")
    with pytest.raises(DlpipeError, match="every row has label 'billing'"):
        prepare("table", write_csv(tmp_path, frame), tmp_path / "out", **TABLE)


def test_a_class_with_too_few_rows_for_the_splits_is_named(tmp_path: Path) -> None:
    frame = tickets()
    frame = pd.concat([frame[frame.category != "bug"], frame[frame.category == "bug"][:1]])
    with pytest.raises(DlpipeError, match=r"class 'bug' has 1 example"):
        prepare("table", write_csv(tmp_path, frame), tmp_path / "out", **TABLE)


def test_test_labels_unseen_in_training_are_named(tmp_path: Path) -> None:
    write_csv(tmp_path, tickets(), "train.csv")
    write_csv(tmp_path, tickets(2).replace({"bug": "spam"}), "test.csv")
    extra = {**TABLE, "test": str(tmp_path / "test.csv")}
    with pytest.raises(DlpipeError, match=r"labels \['spam'\] never occur"):
        prepare("table", tmp_path / "train.csv", tmp_path / "out", **extra)


def test_text_that_is_not_utf8_names_its_line(tmp_path: Path) -> None:
    path = write_csv(tmp_path, tickets())
    lines = path.read_bytes().split(b"\n")
    lines[7] = lines[7].replace(b",", b",caf\xe9 ", 1)
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DlpipeError, match=r"t\.csv: line 8 is not UTF-8"):
        prepare("table", path, tmp_path / "out", **TABLE)


def test_empty_texts_are_named_or_skipped_and_counted(tmp_path: Path) -> None:
    frame = tickets()
    frame.loc[[3, 20], "body"] = "  "
    path = write_csv(tmp_path, frame)
    with pytest.raises(DlpipeError, match=r"2 row\(s\) have an empty 'body', the first is row 4"):
        prepare("table", path, tmp_path / "out", **TABLE)
    card = prepare("table", path, tmp_path / "out", on_empty_text="skip", **TABLE)
    assert card["skipped_rows"] == 2


def test_the_same_text_in_train_and_test_is_counted_as_leakage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_csv(tmp_path, tickets(), "train.csv")
    write_csv(tmp_path, tickets()[:4], "test.csv")  # four of the training texts
    extra = {**TABLE, "test": str(tmp_path / "test.csv")}
    card = prepare("table", tmp_path / "train.csv", tmp_path / "out", **extra)
    assert card["test_texts_also_in_train"] >= 1
    assert "also occur in the training split" in capsys.readouterr().err


def test_an_unknown_table_type_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "t.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(DlpipeError, match="unknown table type '.xlsx'"):
        prepare("table", path, tmp_path / "out", **TABLE)


def test_an_unknown_format_is_one_line() -> None:
    with pytest.raises(DlpipeError, match="unknown dataset format 'excel'.*images or table"):
        get_format("excel")
